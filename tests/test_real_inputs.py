"""Inputs as users have them, made from the shipped sample pair (a real registered chest CT pair, 2 mm): crops through
the lungs, thick and anisotropic slices, RAS storage, an oblique direction, a moving image with a smaller field of
view, integer storage with slope/intercept, a table under the patient.

For each variant the region covers the lungs (the network's 1 mm input too, with the lungs not blanked), and the
re-registration, run end to end through configs/inference.json, finds the residual |r| of the whole pair at the lung
voxels: within 0.5 mm (median; 1 mm after resampling to other slices), and with the same label at most of the voxels
whose |r| on the whole pair lies more than 0.5 mm from a class limit (the sample pair's lungs sit near 3 mm, where a
0.2 mm change flips a label): 95 % for the same voxels stored another way, 75 % inside a crop (a crop is another
registration problem), 60 % after resampling. The re-registration runs with fewer iterations and samples than the
default to keep the suite short, which adds noise: these tests check the handling of the inputs, not the
registration's accuracy; docs/real_inputs.md has the agreement with the default settings."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from monai.bundle import ConfigWorkflow

from scripts.data.image_io import Grid, InputError, load_pair, read_image
from scripts.transforms.ct_masks import ct_masks
from scripts.utils.constants import BACKGROUND_HU, CLASS_THRESHOLDS_MM, UNASSESSED_ERROR_MM, UNASSESSED_LABEL
from tests.helpers.chest_phantom import chest_phantom_arrays, to_image
from tests.helpers.fast_elastix import FAST_ELASTIX

pytestmark = pytest.mark.slow  # subprocesses, servers or whole pairs: pytest -m 'not slow' skips them

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "sample_data"
DECISIVE_MARGIN_MM = 0.5  # lung voxels whose |r| on the whole pair lies this far from 3 and 6 mm are compared
LABEL_AGREEMENT = 0.95  # of those voxels, the fraction with the same label: the same voxels stored another way
CROP_LABEL_AGREEMENT = 0.75  # a crop is another registration problem (less context, another affine stage)
RESAMPLED_LABEL_AGREEMENT = 0.6  # other slice thickness: the images themselves differ
RESIDUAL_TOLERANCE_MM = 0.5  # median | |r| - |r| on the whole pair | at the lung voxels
RESAMPLED_TOLERANCE_MM = 1.0  # other slice thickness: the images themselves differ, so does the registration
REGION_COVERAGE = 0.99  # lung voxels of the whole scan inside a crop that the region keeps


def write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(sitk.Cast(sitk.Round(image), sitk.sitkInt16), str(path))
    return path


def lung_box(lung: np.ndarray) -> list[tuple[int, int]]:
    """(first, last + 1) voxel of the lungs along x, y, z (SimpleITK index order)."""
    out = []
    for axis in (2, 1, 0):  # numpy (z, y, x) -> x, y, z
        found = np.nonzero(lung.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        out.append((int(found[0]), int(found[-1]) + 1))
    return out


def crop(image: sitk.Image, box: list[tuple[int, int]]) -> sitk.Image:
    (x0, x1), (y0, y1), (z0, z1) = box
    return image[x0:x1, y0:y1, z0:z1]


def resampled(image: sitk.Image, spacing: tuple[float, float, float]) -> sitk.Image:
    size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    return sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        spacing,
        image.GetDirection(),
        BACKGROUND_HU,
        sitk.sitkFloat32,
    )


def rotated_about_centre(image: sitk.Image, degrees: float) -> sitk.Image:
    """The same voxels with a direction rotated about z (an oblique acquisition), the centre kept in place."""
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    centre_index = [(n - 1) / 2 for n in image.GetSize()]
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(centre_index))
    out = sitk.Image(image)
    direction = rotation @ np.asarray(image.GetDirection()).reshape(3, 3)
    out.SetDirection(direction.ravel().tolist())
    offset = direction @ (np.asarray(centre_index) * np.asarray(image.GetSpacing()))
    out.SetOrigin((centre - offset).tolist())
    return out


def with_table(image: sitk.Image, gap_voxels: int = 3, table_voxels: int = 3, pad_voxels: int = 14) -> sitk.Image:
    """The image padded posteriorly (+y) with air and a carbon-fibre table (+150 HU) a few mm under the back."""
    hu = sitk.GetArrayFromImage(image)
    padded = np.concatenate([hu, np.full((hu.shape[0], pad_voxels, hu.shape[2]), -1024.0, np.float32)], axis=1)
    back = hu.shape[1]
    padded[:, back + gap_voxels : back + gap_voxels + table_voxels, 5:-5] = 150.0
    out = sitk.GetImageFromArray(padded)
    out.SetSpacing(image.GetSpacing())
    out.SetOrigin(image.GetOrigin())
    out.SetDirection(image.GetDirection())
    return out


def write_slope_intercept(image: sitk.Image, path: Path) -> Path:
    """NIfTI with unsigned integers and scl_slope 1, scl_inter -1024 (HU = stored - 1024)."""
    hu = np.round(sitk.GetArrayFromImage(image)).astype(np.int32)
    stored = np.clip(hu + 1024, 0, 65535).astype(np.uint16).transpose(2, 1, 0)  # (x, y, z)
    affine = np.diag([-s for s in image.GetSpacing()[:2]] + [image.GetSpacing()[2], 1.0])
    origin = np.array(image.GetOrigin())
    affine[:3, 3] = [-origin[0], -origin[1], origin[2]]  # LPS origin -> RAS
    nifti = nib.Nifti1Image(stored, affine)
    nifti.header.set_slope_inter(1.0, -1024.0)
    nifti.header.set_qform(affine, code=1)
    nifti.header.set_sform(affine, code=1)
    nib.save(nifti, str(path))
    return path


@pytest.fixture(scope="module")
def sample():
    """The sample pair, its lung mask and lung box."""
    fixed = read_image(SAMPLE_DIR / "fixed.nii.gz", "fixed image")
    moving = read_image(SAMPLE_DIR / "moving.nii.gz", "moving image")
    _, lung = ct_masks(fixed, "sample fixed image")
    lung_array = sitk.GetArrayFromImage(lung) > 0
    return {"fixed": fixed, "moving": moving, "lung": lung, "box": lung_box(lung_array)}


def crop_boxes(sample: dict) -> dict[str, list[tuple[int, int]]]:
    """Crop boxes (x, y, z voxel ranges) that cut through the lungs, as crops made for registration do."""
    (x0, x1), (y0, y1), (z0, z1) = sample["box"]
    size = sample["fixed"].GetSize()
    xm, zt = (x0 + x1) // 2, (z1 - z0) // 3
    return {
        "one_lung": [(x0 + 6, xm), (y0 + 8, y1 - 5), (0, size[2])],
        "every_face": [(x0 + 6, x1 - 6), (y0 + 8, y1 - 5), (z0 + 4, z1 - 4)],
        "top_cut": [(0, size[0]), (0, size[1]), (0, z1 - zt)],
        "bottom_cut": [(0, size[0]), (0, size[1]), (z0 + zt, size[2])],
    }


def run_reregistration(fixed: Path, moving: Path, out: Path) -> dict[str, sitk.Image]:
    """configs/inference.json, default method (uncalibrated: E[e] = |r|, fast elastix): the label map and |r|."""
    workflow = ConfigWorkflow(
        config_file=str(REPO_ROOT / "configs" / "inference.json"),
        meta_file=str(REPO_ROOT / "configs" / "metadata.json"),
        logging_file=str(REPO_ROOT / "configs" / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(REPO_ROOT),
        fixed_image=str(fixed),
        moving_image=str(moving),
        output_dir=str(out),
        calibration_file="",
        progress=False,
        **{"reregistration_inferer#elastix_options": FAST_ELASTIX},
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    stem = moving.name.split(".")[0]
    return {k: sitk.ReadImage(str(out / f"{stem}_{k}.nii.gz")) for k in ("misalignment", "error_mm")}


def on_grid(image: sitk.Image, reference: sitk.Image, default: float) -> np.ndarray:
    """``image`` resampled (nearest neighbour) onto ``reference``'s grid, as an array."""
    return sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, default))


@pytest.fixture(scope="module")
def whole_run(sample, tmp_path_factory):
    """The whole sample pair through the re-registration: the reference labels."""
    folder = tmp_path_factory.mktemp("whole")
    fixed, moving = write(sample["fixed"], folder / "fixed.nii.gz"), write(sample["moving"], folder / "moving.nii.gz")
    return run_reregistration(fixed, moving, folder / "out")


def assert_agrees(
    run: dict,
    whole: dict,
    lung: sitk.Image,
    tolerance_mm: float = RESIDUAL_TOLERANCE_MM,
    label_agreement: float = LABEL_AGREEMENT,
) -> None:
    """The whole pair's lung voxels that lie in ``run``'s image are assessed, their |r| is within ``tolerance_mm``
    (median) of the whole pair's, and their labels agree where the whole pair's |r| is not at a class limit."""
    labels = sitk.GetArrayFromImage(run["misalignment"])
    lungs = on_grid(lung, run["misalignment"], 0) > 0
    assert (labels[lungs] != UNASSESSED_LABEL).mean() >= REGION_COVERAGE  # the lungs are assessed
    reference = on_grid(whole["misalignment"], run["misalignment"], UNASSESSED_LABEL)[lungs]
    residual = on_grid(whole["error_mm"], run["error_mm"], UNASSESSED_ERROR_MM)[lungs]
    difference = np.abs(sitk.GetArrayFromImage(run["error_mm"])[lungs] - residual)[residual >= 0]
    assert np.median(difference) <= tolerance_mm, f"median | |r| - |r| of the whole pair | {np.median(difference):.2f}"
    decisive = np.min(np.abs(residual[:, None] - np.array(CLASS_THRESHOLDS_MM)), axis=1) > DECISIVE_MARGIN_MM
    agree = (labels[lungs][decisive] == reference[decisive]).mean()
    assert agree >= label_agreement, f"labels agree at {agree:.3f} of the decisive lung voxels"


def network_input_covers_the_lungs(fixed: Path, moving: Path, lung: sitk.Image) -> None:
    """The network's loading (1 mm, background replaced outside each body): the region keeps the lungs and neither
    image's lungs are blanked."""
    pair = load_pair(fixed, moving, None, 1.0, True, require_lung=True)
    lungs = on_grid(lung, pair.grid.image(pair.mask.astype(np.uint8)), 0) > 0
    assert pair.mask[lungs].mean() >= REGION_COVERAGE
    assert (pair.image[:, lungs] > BACKGROUND_HU).mean() >= REGION_COVERAGE


@pytest.mark.parametrize("name", ["one_lung", "every_face", "top_cut", "bottom_cut"])
def test_crops_through_the_lungs(name, sample, whole_run, tmp_path):
    box = crop_boxes(sample)[name]
    fixed = write(crop(sample["fixed"], box), tmp_path / "fixed.nii.gz")
    moving = write(crop(sample["moving"], box), tmp_path / "moving.nii.gz")
    network_input_covers_the_lungs(fixed, moving, sample["lung"])
    run = run_reregistration(fixed, moving, tmp_path / "out")
    assert_agrees(run, whole_run, sample["lung"], label_agreement=CROP_LABEL_AGREEMENT)


@pytest.mark.parametrize("name", ["ras", "oblique", "slope_intercept"])
def test_the_same_voxels_stored_another_way(name, sample, whole_run, tmp_path):
    fixed_path, moving_path = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
    if name == "ras":
        write(sitk.DICOMOrient(sample["fixed"], "RAS"), fixed_path)
        write(sitk.DICOMOrient(sample["moving"], "RAS"), moving_path)
    elif name == "oblique":
        write(rotated_about_centre(sample["fixed"], 12.0), fixed_path)
        write(rotated_about_centre(sample["moving"], 12.0), moving_path)
    else:
        write_slope_intercept(sample["fixed"], fixed_path)
        write_slope_intercept(sample["moving"], moving_path)
        np.testing.assert_allclose(
            sitk.GetArrayFromImage(read_image(fixed_path)), sitk.GetArrayFromImage(sample["fixed"]), atol=0.5
        )
    network_input_covers_the_lungs(fixed_path, moving_path, sample["lung"])
    run = run_reregistration(fixed_path, moving_path, tmp_path / "out")
    if name == "oblique":  # the same voxels, rotated in space with the lungs: compare voxel by voxel
        for image in run.values():
            image.CopyInformation(sample["fixed"])
    assert_agrees(run, whole_run, sample["lung"])


@pytest.mark.parametrize("spacing", [(2.0, 2.0, 5.0), (0.7, 0.7, 2.5)])
def test_thick_and_anisotropic_slices(spacing, sample, whole_run, tmp_path):
    box = crop_boxes(sample)["one_lung"] if spacing[0] < 1 else [(0, n) for n in sample["fixed"].GetSize()]
    fixed = write(resampled(crop(sample["fixed"], box), spacing), tmp_path / "fixed.nii.gz")
    moving = write(resampled(crop(sample["moving"], box), spacing), tmp_path / "moving.nii.gz")
    network_input_covers_the_lungs(fixed, moving, sample["lung"])
    run = run_reregistration(fixed, moving, tmp_path / "out")
    assert np.allclose(run["misalignment"].GetSpacing(), spacing)  # outputs on the fixed image's own grid
    assert_agrees(run, whole_run, sample["lung"], RESAMPLED_TOLERANCE_MM, RESAMPLED_LABEL_AGREEMENT)


def test_moving_image_with_a_smaller_field_of_view(sample, whole_run, tmp_path, caplog):
    size = sample["fixed"].GetSize()
    fixed = write(sample["fixed"], tmp_path / "fixed.nii.gz")
    moving = write(
        crop(sample["moving"], [(0, size[0]), (0, size[1]), (size[2] // 3, size[2])]), tmp_path / "moving.nii.gz"
    )
    run = run_reregistration(fixed, moving, tmp_path / "out")
    labels = sitk.GetArrayFromImage(run["misalignment"])
    assert (labels[: size[2] // 3] == UNASSESSED_LABEL).all()  # outside the moving image: not assessed, never "correct"
    assert (sitk.GetArrayFromImage(run["error_mm"])[: size[2] // 3] == UNASSESSED_ERROR_MM).all()
    lung = sitk.GetArrayFromImage(sample["lung"])
    lung[: size[2] // 3] = 0  # the slices the moving image still has
    covered = sitk.GetImageFromArray(lung)
    covered.CopyInformation(sample["lung"])
    assert_agrees(run, whole_run, covered, label_agreement=CROP_LABEL_AGREEMENT)


def test_a_table_under_the_patient(sample, whole_run, tmp_path):
    fixed = write(with_table(sample["fixed"]), tmp_path / "fixed.nii.gz")
    moving = write(with_table(sample["moving"]), tmp_path / "moving.nii.gz")
    pair = load_pair(fixed, moving, None, None, False)
    back = sample["fixed"].GetSize()[1]
    assert not pair.region[:, back:].any()  # the table is not part of the region
    run = run_reregistration(fixed, moving, tmp_path / "out")
    assert_agrees(run, whole_run, sample["lung"], label_agreement=CROP_LABEL_AGREEMENT)


def test_a_crop_without_lung_is_refused_for_the_network_and_warned_for_the_reregistration(tmp_path, caplog):
    hu, _, lungs = chest_phantom_arrays((64, 64, 64), gas=False)
    hu[lungs] = 30.0  # an abdomen-like crop: tissue, no lung
    fixed = write(to_image(hu), tmp_path / "fixed.nii.gz")
    moving = write(to_image(np.roll(hu, 1, axis=2)), tmp_path / "moving.nii.gz")
    with pytest.raises(InputError, match="fixed.nii.gz: no lung in view"):
        load_pair(fixed, moving, None, 1.0, True, require_lung=True)
    load_pair(fixed, moving, None, None, False)
    assert "no lung in view" in caplog.text


def test_region_of_a_cropped_moving_image_warns_with_the_covered_fraction(sample, tmp_path, caplog):
    size = sample["fixed"].GetSize()
    fixed = write(sample["fixed"], tmp_path / "fixed.nii.gz")
    moving = write(crop(sample["moving"], [(0, size[0]), (0, size[1]), (0, size[2] // 3)]), tmp_path / "moving.nii.gz")
    pair = load_pair(fixed, moving, None, None, False)
    assert "moving image" in caplog.text and "covers only" in caplog.text
    assert not pair.mask[size[2] // 3 + 1 :].any() and Grid.of(sample["fixed"]).same_as(pair.grid)
