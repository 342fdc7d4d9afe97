"""Body and lung masks (scripts.transforms.ct_masks) on a synthetic chest, and their errors for bad inputs."""

import numpy as np
import pytest
import SimpleITK as sitk

from scripts.evaluation.crop_coverage import scan_coverage
from scripts.transforms.ct_masks import body_mask_array, ct_masks
from tests.helpers.chest_phantom import chest_phantom_arrays, to_image


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


def test_lungs_cut_by_a_crop_stay_in_the_body_and_outside_air_does_not():
    hu, body, lungs = chest_phantom_arrays((64, 96, 96), gas=False)
    hu = np.where(body | lungs, hu, -1000.0 + np.random.default_rng(1).normal(0.0, 25.0, hu.shape)).astype(np.float32)
    crop = (slice(None), slice(30, 66), slice(8, 40))  # one lung, cut on four sides
    assert lungs[crop].mean() > 0.3
    kept = body_mask_array(hu[crop], (2.0, 2.0, 2.0))
    assert kept[lungs[crop]].mean() > 0.99
    whole = body_mask_array(hu, (2.0, 2.0, 2.0))
    assert whole[lungs].all() and not whole[~(body | lungs)].any()  # noisy outside air stays out


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.parametrize("scan", ["thorax_lungpetctdx_A0002", "thorax_lidc_idri_0001"])
def test_crops_through_the_lungs_of_real_scans_keep_them(scan, shared_ct_dir):
    """The region's body mask keeps at least 99 % of the whole scan's lung voxels inside every crop box (one lung,
    cuts in x and y, top or bottom cut, inside the lungs' box, the whole scan): 8 mm and 2.5 mm slices."""
    path = shared_ct_dir / f"{scan}.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    coverage = scan_coverage(path)
    assert len(coverage) >= 5
    kept = {crop: row["lung_voxels_kept"] for crop, row in coverage.items()}
    assert min(kept.values()) >= 0.99, kept
    assert coverage["whole scan"]["volume_over_whole_scan_mask"] == 1.0
