"""The re-registration estimator (scripts.registration.reregistration), its calibration and the bundle's
``--method reregistration`` contract, on small synthetic pairs with a known misalignment."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from scipy import ndimage

from scripts.evaluation.calibration_studies import adapt_priors
from scripts.inferers.io_transforms import BadInputExit
from scripts.inferers.methods import method_inferer
from scripts.inferers.reregistration_inferer import ReregistrationInferer
from scripts.registration.calibration import expected_calibration_error, fit_isotonic
from scripts.registration.calibration_tables import ResidualCalibration, options_sha256
from scripts.registration.registered_pairs import true_residual
from scripts.registration.reregistration import (
    RegistrationError,
    ReregistrationOptions,
    residual_field_on_pair,
)
from tests.helpers.chest_phantom import chest_phantom_arrays
from tests.helpers.synthetic_pair import image_from_array

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPE = (56, 64, 64)  # (z, y, x) at 1 mm: large enough for elastix's 3 resolutions
FAST = ReregistrationOptions(bspline_iterations=200, grid_spacing_mm=16.0, number_of_spatial_samples=2000)


def phantom() -> tuple[np.ndarray, np.ndarray]:
    """A textured 1 mm chest phantom (HU) and its body mask."""
    hu, body, _ = chest_phantom_arrays(SHAPE, seed=3, gas=False)
    return hu.astype(np.float32), body


def warp(hu: np.ndarray, displacement_zyx: np.ndarray) -> np.ndarray:
    """``D(x) = F(x + u(x))`` for a displacement ``[3, z, y, x]`` in voxels (z, y, x components), cubic."""
    grid = np.indices(hu.shape).astype(np.float64) + displacement_zyx
    return ndimage.map_coordinates(hu, grid, order=3, mode="nearest").astype(np.float32)


def textured(hu: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Voxels well inside the body with a strong local gradient: where a registration can see motion."""
    gradient = ndimage.gaussian_gradient_magnitude(hu, 1.0)
    inner = ndimage.binary_erosion(body, iterations=8)
    return inner & (gradient > np.percentile(gradient[inner], 50))


@pytest.mark.slow
def test_known_translation_is_found_within_half_a_millimetre():
    hu, body = phantom()
    shift = np.zeros((3,) + SHAPE)
    shift[2] = 2.5  # x: D(x) = F(x + 2.5 mm)
    image = np.stack([hu, warp(hu, shift)])
    r = residual_field_on_pair(image, body, 1.0, FAST)
    assert r.shape == (3,) + SHAPE and r.dtype == np.float32
    sel = textured(hu, body)
    # D shows F(x + 2.5 mm) at x, so F(x) lies at x - 2.5 mm in D: r = T2(x) - x = (-2.5, 0, 0) (x, y, z order)
    error = np.linalg.norm(r[:, sel] - np.array([-2.5, 0.0, 0.0])[:, None], axis=0)
    assert np.median(error) < 0.5 and np.percentile(error, 90) < 0.5


@pytest.mark.slow
def test_known_smooth_deformation_is_found_within_half_a_millimetre():
    hu, body = phantom()
    z, y, x = np.indices(SHAPE).astype(np.float64)
    u = np.stack(
        [
            2.0 * np.sin(2 * np.pi * y / SHAPE[1]),  # z
            1.5 * np.cos(2 * np.pi * z / SHAPE[0]),  # y
            3.0 * np.sin(2 * np.pi * z / SHAPE[0]) * np.cos(np.pi * y / SHAPE[1]),  # x
        ]
    )
    image = np.stack([hu, warp(hu, u)])
    r = residual_field_on_pair(image, body, 1.0, ReregistrationOptions(bspline_iterations=300, grid_spacing_mm=12.0))
    truth_xyz = -u[::-1]  # r ~ -u (see the translation test), components x, y, z
    sel = textured(hu, body)
    error = np.linalg.norm(r[:, sel] - truth_xyz[:, sel], axis=0)
    assert np.median(error) < 0.5
    # and it is a real estimate: the truth is far from zero there
    assert np.median(np.linalg.norm(truth_xyz[:, sel], axis=0)) > 1.5


def test_a_failed_registration_is_one_clear_error_naming_the_pair():
    hu, body = phantom()
    empty = np.full_like(hu, -1024.0)  # nothing to register: no sample of the mask maps into any structure
    with pytest.raises(RegistrationError, match="pair with moving image m.nii.gz: re-registration"):
        residual_field_on_pair(
            np.stack([hu, empty]), np.zeros_like(body), 1.0, FAST, name="pair with moving image m.nii.gz"
        )


def test_true_residual_composes_the_deformation_with_the_registration():
    """e(x) = t(x) + u(x + t(x)): no registration gives e = u; a found transform that undoes u gives e = 0."""
    reference = sitk.Image([20, 20, 20], sitk.sitkFloat32)
    u = sitk.Compose([sitk.Image([20, 20, 20], sitk.sitkFloat64) + v for v in (3.0, 0.0, -1.0)])
    e = true_residual(u, None, reference)
    np.testing.assert_allclose(e[:, 5:15, 5:15, 5:15].reshape(3, -1).mean(axis=1), [3.0, 0.0, -1.0], atol=1e-5)
    maps = [
        {
            "Transform": ["TranslationTransform"],
            "NumberOfParameters": ["3"],
            "TransformParameters": ["-3", "0", "1"],
            "InitialTransformParameterFileName": ["NoInitialTransform"],
            "HowToCombineTransforms": ["Compose"],
            "FixedImageDimension": ["3"],
            "MovingImageDimension": ["3"],
            "FixedInternalImagePixelType": ["float"],
            "MovingInternalImagePixelType": ["float"],
            "Size": ["20", "20", "20"],
            "Index": ["0", "0", "0"],
            "Spacing": ["1", "1", "1"],
            "Origin": ["0", "0", "0"],
            "Direction": ["1", "0", "0", "0", "1", "0", "0", "0", "1"],
            "UseDirectionCosines": ["true"],
            "ResampleInterpolator": ["FinalLinearInterpolator"],
            "Resampler": ["DefaultResampler"],
            "DefaultPixelValue": ["0"],
            "ResultImagePixelType": ["float"],
        }
    ]
    e = true_residual(u, maps, reference)
    assert np.abs(e[:, 5:15, 5:15, 5:15]).max() < 1e-4


def test_calibration_is_monotone_and_under_calls_are_corrected(tmp_path):
    rng = np.random.default_rng(0)
    error = rng.gamma(2.0, 2.0, 20000)  # true misalignment (mm)
    magnitude = np.clip(0.6 * error + rng.normal(0, 0.5, error.size), 0, None)  # the estimator finds 60 %
    calibration = fit_isotonic(magnitude, error, "abc")
    grid = np.linspace(0, 15, 300)
    probs, expected = calibration.predict(grid)
    assert probs.shape == (3, 300)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-6)
    assert (probs >= -1e-6).all()
    assert np.all(np.diff(1 - probs[0]) >= -1e-9) and np.all(np.diff(probs[2]) >= -1e-9)  # P(>=3), P(>=6) rise
    assert np.all(np.diff(expected) >= -1e-9)
    # thresholding |r| under-calls; the calibration moves the decision: |r| = 2.5 mm is mostly >= 3 mm truth
    assert ResidualCalibration.thresholds().predict(np.array([2.5]))[0].argmax() == 0
    assert calibration.predict(np.array([2.5]))[0][:, 0].argmax() != 0
    assert 3.5 < float(calibration.predict(np.array([2.5]))[1][0]) < 5.5
    # calibrated probabilities are better calibrated than one-hot thresholds
    labels = np.digitize(error, (3.0, 6.0))
    ece = expected_calibration_error(calibration.predict(magnitude)[0].T, labels)
    assert ece < 0.05 < expected_calibration_error(ResidualCalibration.thresholds().predict(magnitude)[0].T, labels)

    path = tmp_path / "c.json"
    path.write_text(calibration.to_json(note="x"))
    again = ResidualCalibration.read(path)
    np.testing.assert_allclose(again.predict(grid)[0], probs)


def test_mean_f1_decision_of_the_calibration_keeps_its_probabilities(tmp_path, monkeypatch):
    """``fit_isotonic(..., labels=)`` adds class weights whose decision has a higher mean F1 than the argmax on
    the fit's voxels (a rare 'wrong' class, as in real registrations); the file keeps them; the inferer returns them
    with the calibrated probabilities unchanged, and its "argmax" decision does not."""
    from scripts.utils.class_decision import mean_f1_of_decisions

    rng = np.random.default_rng(1)
    error = rng.gamma(1.2, 1.6, 30000)
    magnitude = np.clip(0.7 * error + rng.normal(0, 0.8, error.size), 0, None)
    labels = np.digitize(error, (3.0, 6.0))
    calibration = fit_isotonic(magnitude, error, "", labels=labels)
    weights = calibration.class_weights
    assert weights is not None and len(weights) == 3 and weights[0] == 1.0 and min(weights) > 0
    probabilities = calibration.predict(magnitude)[0]
    plain = mean_f1_of_decisions(labels, probabilities.argmax(axis=0))
    assert mean_f1_of_decisions(labels, calibration.decide(probabilities)) > plain + 0.005
    path = tmp_path / "weighted.json"
    path.write_text(calibration.to_json())
    assert ResidualCalibration.read(path).class_weights == weights
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "class_weights": [1.0, -1.0, 2.0]}))
    with pytest.raises(ValueError, match="weighted.json: class_weights must be 3 positive numbers"):
        ResidualCalibration.read(path)

    path.write_text(calibration.to_json())
    residual = np.zeros((3, 8, 8, 8), dtype=np.float32)
    residual[0] = np.linspace(0, 9, 8)[None, None, :]  # |r| from 0 to 9 mm along x
    monkeypatch.setattr(
        "scripts.inferers.reregistration_inferer.residual_field_on_pair", lambda *a, **k: residual.astype(np.float64)
    )
    inputs = torch.zeros((1, 2, 8, 8, 8))
    weighted = ReregistrationInferer(calibration_file=path)(inputs)
    plain_out = ReregistrationInferer(calibration_file=path, decision="argmax")(inputs)
    np.testing.assert_allclose(weighted["class_weights"].numpy(), [weights], rtol=1e-6)
    assert "class_weights" not in plain_out
    torch.testing.assert_close(weighted["probabilities"], plain_out["probabilities"])
    expected = calibration.predict(np.linalg.norm(residual, axis=0))[0]
    np.testing.assert_allclose(weighted["probabilities"][0].numpy(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="unknown decision 'vote'"):
        ReregistrationInferer(decision="vote")


def test_prior_adaptation_recovers_a_shifted_class_mix():
    """``adapt_priors`` (EM): exact posteriors of three Gaussian classes under equal priors, on voxels drawn 80/15/5,
    move to about 80/15/5, and their argmax gains accuracy; posteriors fitted under the true mix stay where they are."""
    rng = np.random.default_rng(0)
    truth = np.array([0.8, 0.15, 0.05])
    labels = rng.choice(3, size=40000, p=truth)
    x = rng.normal(np.array([0.0, 1.5, 3.0])[labels], 1.0)
    likelihood = np.exp(-0.5 * (x[:, None] - np.array([0.0, 1.5, 3.0])[None]) ** 2)
    equal = likelihood / likelihood.sum(axis=1, keepdims=True)
    adapted, priors = adapt_priors(equal, np.full(3, 1 / 3))
    np.testing.assert_allclose(priors, truth, atol=0.02)
    assert (adapted.argmax(axis=1) == labels).mean() > (equal.argmax(axis=1) == labels).mean() + 0.05
    fitted = likelihood * truth / (likelihood * truth).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(adapt_priors(fitted, truth)[1], truth, atol=0.02)


def test_calibration_file_errors_and_settings_check(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="missing.json: calibration file not found"):
        ResidualCalibration.read(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"knots_mm": [0, 1]}')
    with pytest.raises(ValueError, match="bad.json: not a calibration file"):
        ResidualCalibration.read(bad)
    bad.write_text(
        json.dumps({"knots_mm": [1, 0], "p_at_least_3": [0, 1], "p_at_least_6": [0, 1], "expected_mm": [0, 1]})
    )
    with pytest.raises(ValueError, match="increasing knot"):
        ResidualCalibration.read(bad)
    other = tmp_path / "other.json"
    calibration = fit_isotonic(np.linspace(0, 10, 100), np.linspace(0, 12, 100), options_sha256(FAST))
    other.write_text(calibration.to_json())
    assert ResidualCalibration.read(other, FAST).knots_mm == calibration.knots_mm
    with caplog.at_level(logging.WARNING):
        fallback = ResidualCalibration.read(other, ReregistrationOptions())
    assert "other re-registration settings" in caplog.text
    assert fallback == ResidualCalibration.thresholds()


def test_the_method_factory_picks_the_inferer_and_its_batch_keys():
    from scripts.inferers.methods import batch_keys
    from scripts.inferers.reregistration_inferer import ResidualNetworkInferer

    network, rereg = object(), object()
    assert method_inferer("reregistration", network, rereg) is rereg
    assert method_inferer("network", network, rereg) is network
    chained = method_inferer("network", network, rereg, residual_input="lstm_prior")
    assert isinstance(chained, ResidualNetworkInferer) and chained.network_inferer is network
    assert batch_keys("network") == {"mask": "mask"}
    assert (
        set(batch_keys("network", "lstm_prior"))
        == set(batch_keys("reregistration"))
        == {"mask", "name", "region", "spacing"}
    )
    with pytest.raises(
        ValueError, match="unknown --method 'regnet'; choose one of: reregistration, network, multiview"
    ):
        method_inferer("regnet", network, rereg)


def write_phantom_pair(folder: Path) -> dict[str, Path]:
    """fixed/moving NIfTI (1.5 mm, moving = fixed shifted 3 mm along x, a misalignment in the 'poor' class) and five
    landmarks inside the body."""
    folder.mkdir(parents=True, exist_ok=True)
    hu, body = phantom()
    shift = np.zeros((3,) + SHAPE)
    shift[2] = 4.0 / 1.5
    paths = {k: folder / f"{k}.nii.gz" for k in ("fixed", "moving")}
    sitk.WriteImage(image_from_array(hu.astype(np.int16)), str(paths["fixed"]))
    sitk.WriteImage(image_from_array(warp(hu, shift).astype(np.int16)), str(paths["moving"]))
    fixed = sitk.ReadImage(str(paths["fixed"]))
    rows = ["id,x,y,z,tre"]
    for i, (z, y, x) in enumerate([(28, 32, 20), (28, 32, 44), (20, 28, 32), (36, 36, 32), (28, 20, 32)]):
        p = fixed.TransformContinuousIndexToPhysicalPoint((x, y, z))
        rows.append(f"{i},{p[0]:.3f},{p[1]:.3f},{p[2]:.3f},4.0")
    paths["landmarks"] = folder / "landmarks.csv"
    paths["landmarks"].write_text("\n".join(rows) + "\n")
    return paths


def reregistration_workflow(paths: dict[str, Path], out: Path) -> ConfigWorkflow:
    """configs/inference.json with ``--method reregistration`` (uncalibrated) on a phantom pair."""
    return ConfigWorkflow(
        config_file=str(REPO_ROOT / "configs" / "inference.json"),
        meta_file=str(REPO_ROOT / "configs" / "metadata.json"),
        logging_file=str(REPO_ROOT / "configs" / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(REPO_ROOT),
        method="reregistration",
        calibration_file="",
        fixed_image=str(paths["fixed"]),
        moving_image=str(paths["moving"]),
        landmarks=str(paths["landmarks"]),
        output_dir=str(out),
        progress=False,
    )


def test_a_failed_registration_ends_the_run_with_one_message_and_no_output(tmp_path, monkeypatch):
    """elastix failing inside a bundle run (the real failure is tested above): one message naming the pair."""
    import scripts.registration.reregistration as reregistration

    def failing(fixed, deformed, options=None, fixed_mask=None, name="pair"):
        raise RegistrationError(f"{name}: re-registration with elastix failed (test)")

    monkeypatch.setattr(reregistration, "residual_field", failing)
    paths = write_phantom_pair(tmp_path / "data")
    workflow = reregistration_workflow(paths, tmp_path / "out")
    workflow.initialize()
    with pytest.raises(BadInputExit, match="pair with moving image .*moving.nii.gz: re-registration with elastix"):
        workflow.run()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_method_reregistration_writes_the_contract_files(tmp_path):
    paths = write_phantom_pair(tmp_path / "data")
    out = tmp_path / "out"
    workflow = reregistration_workflow(paths, out)
    workflow.initialize()
    assert not workflow.check_properties()
    assert isinstance(workflow.parser.get_parsed_content("inferer"), ReregistrationInferer)
    workflow.run()
    workflow.finalize()
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        f"moving_{s}"
        for s in (
            "misalignment.nii.gz",
            "probabilities.nii.gz",
            "error_mm.nii.gz",
            "overlay.png",
            "landmarks.csv",
            "run.json",
        )
    )
    fixed = sitk.ReadImage(str(paths["fixed"]))
    error = sitk.ReadImage(str(out / "moving_error_mm.nii.gz"))
    assert error.GetPixelID() == sitk.sitkFloat32 and error.GetSize() == fixed.GetSize()
    np.testing.assert_allclose(error.GetSpacing(), fixed.GetSpacing())
    with open(out / "moving_landmarks.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = ["id", "x", "y", "z", "tre", "inside", "pred", "p_correct", "p_poor", "p_wrong", "error_mm"]
    assert list(rows[0]) == columns + ["residual_mm"] and all(r["inside"] == "1" for r in rows)
    assert all(float(r["error_mm"]) == float(r["residual_mm"]) for r in rows)  # uncalibrated: E[e] = |r|
    # uncalibrated: |r| thresholded; the 4 mm shift is found within 0.5 mm at these textured landmarks -> poor
    found = [float(r["error_mm"]) for r in rows]
    assert np.median(np.abs(np.array(found) - 4.0)) < 0.5
    assert sum(int(r["pred"]) == 1 for r in rows) >= 4


def test_displacement_field_writes_nothing_in_the_working_folder(tmp_path, monkeypatch):
    """transformix writes its deformation field to disk too: into a temporary folder, never the caller's cwd."""
    monkeypatch.chdir(tmp_path)
    hu, body = phantom()
    residual_field_on_pair(
        np.stack([hu, hu]), body, 1.0, ReregistrationOptions(linear="translation", bspline_iterations=0)
    )
    assert list(tmp_path.iterdir()) == []


def test_local_features_of_the_calibration_experiment():
    """Jacobian of x + r for a linear field, local NCC of an image with itself and with its negative."""
    from scripts.evaluation.calibration_features import jacobian_at, local_ncc

    shape = (12, 12, 12)
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    spacing_zyx = np.array([2.0, 1.0, 1.0])
    field = np.zeros(shape + (3,), dtype=np.float32)
    field[..., 0] = 0.1 * xx * spacing_zyx[2]  # r_x = 0.1 x (mm): stretch along x
    field[..., 2] = -0.2 * zz * spacing_zyx[0]  # r_z = -0.2 z: compression along z
    points = np.array([[5, 5, 5], [3, 7, 2]])
    np.testing.assert_allclose(jacobian_at(field, points, spacing_zyx), [1.1 * 0.8] * 2, rtol=1e-5)

    image = np.random.default_rng(0).normal(size=shape).astype(np.float32) * 100
    assert np.allclose(local_ncc(image, image)[3:-3, 3:-3, 3:-3], 1.0, atol=1e-3)
    assert np.allclose(local_ncc(image, -image)[3:-3, 3:-3, 3:-3], -1.0, atol=1e-3)
    assert np.all(local_ncc(np.zeros(shape), image) == 0.0)  # a flat window has no correlation


def test_shipped_calibrations_were_fitted_for_the_settings_the_config_runs():
    """The default method's calibration is fitted for ``ReregistrationOptions()`` (the fixed image's grid, own HU);
    the residual networks' for their 1 mm, background-replaced pair and former elastix settings: the settings hashes
    in the files match what configs/inference.json builds, so neither falls back to thresholds."""
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "configs" / "inference.json"))
    parser["bundle_root"] = str(REPO_ROOT)
    for method, residual_input in (("reregistration", "none"), ("network", "lstm_prior")):
        parser["method"], parser["residual_input"] = method, residual_input
        inferer = parser.get_parsed_content("reregistration_inferer", instantiate=True, lazy=False)
        recorded = json.loads(Path(inferer.calibration_file).read_text())["options_sha256"]
        assert recorded == options_sha256(inferer.options), (method, inferer.calibration_file)
    assert ReregistrationInferer().options == ReregistrationOptions()
