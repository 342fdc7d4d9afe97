"""Reading, checking, resampling and atomic writing of the inference images (scripts.data.image_io)."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from scripts.data.image_io import (
    Grid,
    InputError,
    MissingInputError,
    image_stem,
    isotropic_grid,
    load_pair,
    read_image,
    to_fixed_grid,
)
from scripts.utils.atomic_write import atomic_output
from scripts.utils.constants import BACKGROUND_HU, UNASSESSED_LABEL
from tests.helpers.synthetic_pair import image_from_array, phantom_hu, write_pair


def test_read_image_errors_name_the_file_and_the_problem(tmp_path):
    hu = phantom_hu((12, 12, 12)).astype(np.int16)
    cases = {
        "absent.nii.gz": (None, MissingInputError, "file not found"),
        "garbage.nii.gz": (b"not an image", InputError, "cannot be read"),
        "slice.nii.gz": (image_from_array(hu[0]), InputError, "2-D image"),
        "thin.nii.gz": (image_from_array(hu[:1]), InputError, "a 2-D slice"),
        "series.nii.gz": (sitk.JoinSeries([image_from_array(hu)] * 2), InputError, "4-D image"),
        "vector.mha": (sitk.Compose([image_from_array(hu)] * 2), InputError, "scalar image"),
    }
    for name, (content, error, problem) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            sitk.WriteImage(content, str(path))
        with pytest.raises(error, match=problem) as info:
            read_image(path, "fixed image")
        assert str(path) in str(info.value) and str(info.value).startswith("fixed image")


def test_nan_is_found_in_mha_and_in_nifti(tmp_path):
    """ITK's NIfTI reader turns NaN into 0, so NIfTI files are checked with nibabel as well."""
    values = phantom_hu((10, 10, 10)).astype(np.float32)
    values[3, 4, 5] = np.nan
    sitk.WriteImage(image_from_array(values), str(tmp_path / "nan.mha"))
    nib.save(nib.Nifti1Image(values.transpose(2, 1, 0), np.eye(4)), str(tmp_path / "nan.nii.gz"))
    for name in ("nan.mha", "nan.nii.gz"):
        with pytest.raises(InputError, match=f"{name}: the image holds NaN"):
            read_image(tmp_path / name, "moving image")


def test_singleton_fourth_axis_is_read_as_3d(tmp_path):
    hu = phantom_hu((10, 10, 10)).astype(np.int16)
    sitk.WriteImage(sitk.JoinSeries([image_from_array(hu)]), str(tmp_path / "one.nii.gz"))
    image = read_image(tmp_path / "one.nii.gz")
    assert image.GetDimension() == 3 and np.array_equal(sitk.GetArrayFromImage(image), hu.astype(np.float32))


def test_pair_without_overlap_names_both_files(tmp_path):
    paths = write_pair(tmp_path)
    far = image_from_array(phantom_hu().astype(np.int16), origin=(500.0, 0.0, 0.0))
    sitk.WriteImage(far, str(tmp_path / "far.nii.gz"))
    with pytest.raises(InputError, match="far.nii.gz does not overlap the fixed image .*fixed.nii.gz"):
        load_pair(paths["fixed"], tmp_path / "far.nii.gz")


def test_load_pair_resamples_to_1mm_lps_whatever_the_orientation(tmp_path):
    """The same anatomy stored with flipped x/y axes (RAS-like) gives the same 1 mm LPS arrays."""
    paths = write_pair(tmp_path)
    fixed = sitk.ReadImage(str(paths["fixed"]))
    flipped = sitk.Flip(fixed, [True, True, False])  # keeps the physical content, flips the direction
    assert flipped.GetDirection() != fixed.GetDirection()
    sitk.WriteImage(flipped, str(tmp_path / "flipped.nii.gz"))
    plain = load_pair(paths["fixed"], paths["moving"])
    other = load_pair(tmp_path / "flipped.nii.gz", paths["moving"])
    assert plain.image.shape == (2, 35, 35, 35)  # 24 voxels of 1.5 mm span 34.5 mm -> 35 voxels of 1 mm
    assert plain.grid.spacing == (1.0, 1.0, 1.0) and np.allclose(other.grid.direction, np.eye(3).ravel())
    np.testing.assert_allclose(other.image, plain.image, atol=1e-2)
    assert plain.mask.any() and (plain.image[0][~plain.mask] == BACKGROUND_HU).all()  # background outside the body


def test_moving_on_another_grid_is_resampled_and_logged(tmp_path, caplog):
    paths = write_pair(tmp_path)
    moving = sitk.ReadImage(str(paths["moving"]))
    coarse = sitk.Resample(
        moving,
        [16, 16, 16],
        sitk.Transform(),
        sitk.sitkLinear,
        moving.GetOrigin(),
        (2.25, 2.25, 2.25),
        moving.GetDirection(),
        -1000.0,
    )
    sitk.WriteImage(coarse, str(tmp_path / "coarse.nii.gz"))
    with caplog.at_level(logging.WARNING, logger="scripts.data.image_io"):
        pair = load_pair(paths["fixed"], tmp_path / "coarse.nii.gz")
    assert "not on the fixed image's grid" in caplog.text and "coarse.nii.gz" in caplog.text
    reference = load_pair(paths["fixed"], paths["moving"])
    a, b = pair.image[1], reference.image[1]
    inside = (a > BACKGROUND_HU) & (b > BACKGROUND_HU)
    assert inside.mean() > 0.3 and np.corrcoef(a[inside], b[inside])[0, 1] > 0.75  # same anatomy, same place


def test_mask_file_restricts_the_prediction_region(tmp_path):
    paths = write_pair(tmp_path)
    mask = np.zeros((24, 24, 24), dtype=np.uint8)
    mask[8:16, 8:16, 8:16] = 1
    sitk.WriteImage(image_from_array(mask), str(tmp_path / "mask.nii.gz"))
    pair = load_pair(paths["fixed"], paths["moving"], tmp_path / "mask.nii.gz")
    assert 0 < pair.mask.sum() < 0.2 * load_pair(paths["fixed"], paths["moving"]).mask.sum()
    sitk.WriteImage(image_from_array(np.zeros_like(mask)), str(tmp_path / "empty.nii.gz"))
    with pytest.raises(InputError, match="empty.nii.gz: no voxel of the mask"):
        load_pair(paths["fixed"], paths["moving"], tmp_path / "empty.nii.gz")


def test_to_fixed_grid_gives_normalised_probabilities_and_labels(tmp_path):
    paths = write_pair(tmp_path)
    pair = load_pair(paths["fixed"], paths["moving"])
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet([1.0, 1.0, 1.0], size=pair.mask.shape).transpose(3, 0, 1, 2)
    probabilities = (probabilities * pair.mask).astype(np.float32)
    probs, labels, mask = to_fixed_grid(probabilities, pair.mask, pair.grid, pair.fixed_grid)
    assert probs.shape == (24, 24, 24, 3) and labels.dtype == np.uint8
    np.testing.assert_allclose(probs[mask].sum(axis=-1), 1.0, atol=1e-5)
    assert (probs[~mask] == 0).all() and (labels[~mask] == UNASSESSED_LABEL).all()  # outside: never "correct"
    assert np.array_equal(labels[mask], probs[mask].argmax(axis=-1))
    weights = [1.0, 1.0, 3.0]  # a decision that favours "wrong": the probabilities stay, the labels move
    probs_w, labels_w, _ = to_fixed_grid(probabilities, pair.mask, pair.grid, pair.fixed_grid, weights)
    np.testing.assert_array_equal(probs_w, probs)
    assert np.array_equal(labels_w[mask], (probs[mask] * np.array(weights)).argmax(axis=-1))
    assert (labels_w[mask] == 2).sum() > (labels[mask] == 2).sum()


def test_grid_geometry_helpers():
    grid = Grid((10, 20, 30), (1.0, 2.0, 3.0), (2.0, 1.0, 0.5), tuple(np.eye(3).ravel()))
    lower, upper = grid.bounds()
    np.testing.assert_allclose(lower, [0.0, 1.5, 2.75])
    np.testing.assert_allclose(upper, [20.0, 21.5, 17.75])
    assert grid.contains(np.array([[1.0, 2.0, 3.0], [25.0, 2.0, 3.0]])).tolist() == [True, False]
    assert isotropic_grid(image_from_array(np.zeros((4, 5, 6), np.int16), spacing=1.5)).size == (8, 7, 5)
    assert image_stem("/a/b/case_01.nii.gz") == "case_01" and image_stem("x.mha") == "x"


def test_atomic_output_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out" / "map.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert list((tmp_path / "out").iterdir()) == []
    with atomic_output(target) as temporary:
        temporary.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and len(list((tmp_path / "out").iterdir())) == 1
