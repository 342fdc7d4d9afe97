"""elastix protocol settings on a small synthetic pair with a known fixed-to-moving mapping."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from scripts.data.landmark_csv import read_landmarks, table_from_points, write_landmarks
from scripts.registration.elastix import (
    ELASTIX_PARAMETER_DIR,
    SETTINGS,
    ElastixPair,
    RegistrationOptions,
    affine_parameter_map,
    bspline_parameter_map,
    parse_settings,
    read_parameter_file,
    register_pair,
    resample_to_working_grid,
)
from scripts.registration.reregistration import ReregistrationOptions

SIZE = 48
SPACING = 2.0
SHIFT_MM = np.array([3.0, -2.0, 1.5])  # (x, y, z)
BUMP_MM = np.array([0.0, 0.0, 3.0])
BUMP_SIGMA_MM = 12.0


def _fixed_image() -> sitk.Image:
    rng = np.random.default_rng(0)
    texture = ndimage.gaussian_filter(rng.normal(size=(SIZE,) * 3), 1.5)
    image = sitk.GetImageFromArray((texture / texture.std() * 250 - 400).astype(np.float32))
    image.SetSpacing([SPACING] * 3)
    image.SetOrigin((-40.0, -30.0, 10.0))
    return image


def _phi(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Known mapping from fixed to moving space: a translation plus a smooth local bump."""
    weight = np.exp(-np.sum((points - centre) ** 2, axis=-1) / (2 * BUMP_SIGMA_MM**2))[..., None]
    return points + SHIFT_MM + weight * BUMP_MM


@pytest.fixture(scope="module")
def synthetic_pair(tmp_path_factory) -> dict:
    """Fixed texture, moving = fixed seen through phi^-1 (so the true partner of x_F is phi(x_F)), landmarks."""
    folder = tmp_path_factory.mktemp("pair")
    fixed = _fixed_image()
    origin = np.array(fixed.GetOrigin())
    centre = origin + SPACING * (SIZE - 1) / 2
    grid = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij"), -1)[..., ::-1].reshape(-1, 3)  # x,y,z
    moving_points = origin + SPACING * grid
    source = moving_points.copy()
    for _ in range(20):  # fixed-point inversion of phi (displacement is small and smooth)
        source = moving_points - (_phi(source, centre) - source)
    voxel = (source - origin) / SPACING
    fixed_array = sitk.GetArrayFromImage(fixed)
    moving_array = ndimage.map_coordinates(fixed_array, voxel[:, ::-1].T, order=3, mode="nearest")
    moving = sitk.GetImageFromArray(moving_array.reshape((SIZE,) * 3).astype(np.float32))
    moving.CopyInformation(fixed)
    sitk.WriteImage(sitk.Cast(fixed, sitk.sitkInt16), str(folder / "fixed.nii.gz"))
    sitk.WriteImage(sitk.Cast(moving, sitk.sitkInt16), str(folder / "moving.nii.gz"))
    points = origin + np.random.default_rng(1).uniform(14, 34, (20, 3)) * SPACING
    write_landmarks(table_from_points(points), folder / "fixed_points.csv")
    write_landmarks(table_from_points(_phi(points, centre)), folder / "moving_points.csv")
    return {
        "folder": folder,
        "fixed": fixed,
        "moving": moving,
        "initial_tre": np.linalg.norm(_phi(points, centre) - points, axis=1),
    }


def test_parse_settings():
    assert parse_settings("all") == list(SETTINGS)
    assert parse_settings("bspline500,affine") == ["affine", "bspline500"]
    assert parse_settings(("bspline20",)) == ["bspline20"]
    with pytest.raises(ValueError, match="bspline42"):
        parse_settings("bspline42")


def test_parameter_maps_follow_the_protocol():
    options = RegistrationOptions()
    affine = affine_parameter_map(options)
    bspline = bspline_parameter_map(2000, options)
    for m in (affine, bspline):
        assert m["Metric"] == ["AdvancedMattesMutualInformation"]
        assert m["Optimizer"] == ["AdaptiveStochasticGradientDescent"]
        assert m["NumberOfResolutions"] == ["3"]
        assert m["RandomSeed"] == [str(options.random_seed)]
        assert m["ASGDParameterEstimationMethod"] == ["DisplacementDistribution"]
    assert bspline["MaximumNumberOfIterations"] == ["2000"]
    assert bspline["GridSpacingSchedule"] == ["4.0", "2.0", "1.0"]
    assert affine["Transform"] == ["AffineTransform"] and bspline["Transform"] == ["BSplineTransform"]


@pytest.mark.slow
def test_affine_then_bspline_reduces_error(synthetic_pair, tmp_path):
    folder: Path = synthetic_pair["folder"]
    options = RegistrationOptions(affine_iterations=200, number_of_spatial_samples=2000, grid_spacing_mm=12.0)
    log = register_pair(
        folder / "fixed.nii.gz",
        folder / "moving.nii.gz",
        tmp_path,
        "affine,bspline100",
        folder / "fixed_points.csv",
        folder / "moving_points.csv",
        options=options,
    )
    fixed_array = sitk.GetArrayFromImage(synthetic_pair["fixed"])
    inner = (slice(8, -8),) * 3

    def residual(image: sitk.Image) -> float:
        return float(np.abs(sitk.GetArrayFromImage(image).astype(float) - fixed_array)[inner].mean())

    before = residual(synthetic_pair["moving"])
    after = {}
    for name in ("affine", "bspline100"):
        entry = log["settings"][name]
        deformed = sitk.ReadImage(entry["image"])
        assert deformed.GetPixelID() == sitk.sitkInt16
        assert deformed.GetSize() == synthetic_pair["fixed"].GetSize()
        assert np.allclose(deformed.GetOrigin(), synthetic_pair["fixed"].GetOrigin())
        after[name] = residual(deformed)
        table = read_landmarks(
            entry["points"], required=("id", "x", "y", "z", "x_moving", "y_moving", "z_moving", "tre")
        )
        assert len(table) == 20
        assert entry["registration_s"] > 0
    assert after["bspline100"] < after["affine"] < 0.5 * before
    initial_tre = synthetic_pair["initial_tre"].mean()
    assert initial_tre > 4.0
    assert log["settings"]["affine"]["tre_mean_mm"] < 0.4 * initial_tre
    assert log["settings"]["bspline100"]["tre_mean_mm"] < log["settings"]["affine"]["tre_mean_mm"]
    # T(x_F) lands on the known partner phi(x_F): transformix maps fixed points into moving space
    table = read_landmarks(log["settings"]["bspline100"]["points"])
    truth = read_landmarks(folder / "moving_points.csv").points()
    mapped = table.float_columns(["x_moving", "y_moving", "z_moving"])
    assert np.linalg.norm(mapped - truth, axis=1).max() < 1.0


def test_ants_syn_setting_writes_what_elastix_settings_write(synthetic_pair, tmp_path):
    """The protocol's ``ants_syn`` setting: the registered image on the fixed grid, T(x_F) of every landmark on its
    known partner, the TREs in the log and the field beside them, as the elastix settings write them."""
    folder: Path = synthetic_pair["folder"]
    log = register_pair(
        folder / "fixed.nii.gz",
        folder / "moving.nii.gz",
        tmp_path,
        "ants_syn",
        folder / "fixed_points.csv",
        folder / "moving_points.csv",
        options=RegistrationOptions(working_spacing_mm=None),
    )
    entry = log["settings"]["ants_syn"]
    deformed = sitk.ReadImage(entry["image"])
    assert deformed.GetPixelID() == sitk.sitkInt16
    assert deformed.GetSize() == synthetic_pair["fixed"].GetSize()
    table = read_landmarks(entry["points"], required=("id", "x", "y", "z", "x_moving", "y_moving", "z_moving", "tre"))
    truth = read_landmarks(folder / "moving_points.csv").points()
    mapped = table.float_columns(["x_moving", "y_moving", "z_moving"])
    assert np.linalg.norm(mapped - truth, axis=1).max() < 1.0
    assert entry["tre_mean_mm"] < 0.2 * synthetic_pair["initial_tre"].mean()
    assert entry["tre_median_mm"] <= np.max(table.float_columns(["tre"]))
    field = sitk.ReadImage(entry["transform"])
    assert field.GetNumberOfComponentsPerPixel() == 3 and field.GetSize() == synthetic_pair["fixed"].GetSize()
    assert Path(tmp_path / "moving_registration.json").is_file()


def test_same_seed_same_result(synthetic_pair):
    options = RegistrationOptions(affine_iterations=50, number_of_spatial_samples=1000)
    pair = ElastixPair(synthetic_pair["fixed"], synthetic_pair["moving"], options)
    first = pair.register([affine_parameter_map(options)])[-1]["TransformParameters"]
    second = pair.register([affine_parameter_map(options)])[-1]["TransformParameters"]
    assert first == second


def test_landmark_count_mismatch_is_a_clear_error(synthetic_pair, tmp_path):
    folder: Path = synthetic_pair["folder"]
    write_landmarks(table_from_points(np.zeros((3, 3))), tmp_path / "three.csv")
    with pytest.raises(ValueError, match="three.csv.*3 moving landmarks"):
        register_pair(
            folder / "fixed.nii.gz",
            folder / "moving.nii.gz",
            tmp_path,
            "affine",
            folder / "fixed_points.csv",
            tmp_path / "three.csv",
        )
    with pytest.raises(FileNotFoundError, match="nothere.nii.gz"):
        register_pair(folder / "fixed.nii.gz", tmp_path / "nothere.nii.gz", tmp_path, "affine")


def test_working_grid_keeps_the_extent(synthetic_pair):
    coarse = resample_to_working_grid(synthetic_pair["fixed"], 4.0)
    assert coarse.GetSize() == (24, 24, 24)
    fixed = synthetic_pair["fixed"]
    corner = np.array(fixed.GetOrigin()) - SPACING / 2
    assert np.allclose(np.array(coarse.GetOrigin()) - 2.0, corner)


@pytest.mark.parametrize(
    "options", [RegistrationOptions(), ReregistrationOptions()], ids=["protocol", "reregistration"]
)
def test_the_parameter_files_are_what_runs_by_default(options):
    """configs/elastix/*.txt, read by elastix's own command line, are exactly the maps the code runs with the default
    options; options change only the parameters they name."""
    family = options.parameter_family
    iterations = 500 if family == "protocol" else options.bspline_iterations
    assert affine_parameter_map(options) == read_parameter_file(ELASTIX_PARAMETER_DIR / f"{family}_affine.txt")
    assert bspline_parameter_map(iterations, options) == read_parameter_file(
        ELASTIX_PARAMETER_DIR / f"{family}_bspline.txt"
    )
    changed = replace(options, number_of_spatial_samples=999)
    differs = {k for k, v in affine_parameter_map(changed).items() if affine_parameter_map(options)[k] != v}
    assert differs == {"NumberOfSpatialSamples"}
