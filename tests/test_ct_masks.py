"""Body and lung masks (scripts.transforms.ct_masks) on a synthetic chest, and their errors for bad inputs."""

import numpy as np
import pytest
import SimpleITK as sitk

from scripts.transforms.ct_masks import ct_masks
from tests.chest_phantom import chest_phantom_arrays, to_image


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_masks_match_the_phantom():
    hu, body, lungs = chest_phantom_arrays()
    body_mask, lung_mask = (sitk.GetArrayFromImage(m) > 0 for m in ct_masks(to_image(hu), "phantom"))
    assert _dice(body_mask, body) > 0.97
    assert _dice(lung_mask, lungs) > 0.9  # vessels inside the lungs are filled in
    assert not (lung_mask & ~body_mask).any()
    gas = hu == -950.0
    assert not (lung_mask & gas).any(), "gas below the lungs must not count as lung"


def test_masks_keep_the_geometry():
    image = to_image(chest_phantom_arrays()[0])
    body, lung = ct_masks(image, "phantom")
    for mask in (body, lung):
        assert mask.GetSize() == image.GetSize() and mask.GetSpacing() == image.GetSpacing()
        assert mask.GetOrigin() == image.GetOrigin() and mask.GetPixelID() == sitk.sitkUInt8


@pytest.mark.parametrize(
    "image, message",
    [
        (sitk.Image([64, 64], sitk.sitkFloat32), "3-D"),
        (to_image(np.zeros((2, 64, 64), np.float32)), "not a 3-D volume"),
        (to_image(np.full((64, 64, 64), -1024.0, np.float32)), "empty or all-air"),
        (to_image(np.where(chest_phantom_arrays()[1], 20.0, -1024.0).astype(np.float32)), "no lung"),
    ],
)
def test_bad_inputs_give_clear_errors(image, message):
    with pytest.raises(ValueError, match=message) as info:
        ct_masks(image, "scan_x.nii.gz")
    assert "scan_x.nii.gz" in str(info.value)
