"""Local NCC baseline: NCC of identical images, threshold fitting, the fit CLI on a tiny prepared dataset."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from scripts.evaluation.ncc_baseline import (
    class_weights,
    fit,
    fit_thresholds,
    local_ncc,
    ncc_at_points,
    read_thresholds,
    score_classes,
)


def _texture(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (ndimage.gaussian_filter(rng.normal(0, 1, shape), 1.5) * 600 - 700).astype(np.float32)


def test_identical_images_give_ncc_one_and_all_correct():
    image = _texture((24, 24, 24))
    image[:, :, :6] = -2048.0  # flat background: still NCC 1
    ncc = local_ncc(image, image.copy(), 9)
    assert np.allclose(ncc, 1.0, atol=1e-5)
    points = np.array([[12.0, 12.5, 3.0], [5.0, 20.0, 18.2]])
    assert np.allclose(ncc_at_points(image, image, points, 9), 1.0, atol=1e-5)
    assert score_classes(1.0 - ncc.ravel(), (0.05, 0.2)).max() == 0
    shifted = local_ncc(image, np.roll(image, 3, axis=0), 9)
    assert shifted[6:18, 6:18, 10:18].mean() < 0.5  # misaligned texture decorrelates


def test_fit_recovers_thresholds_of_a_monotone_score():
    rng = np.random.default_rng(0)
    magnitude = rng.uniform(0, 10, 6000)
    true = np.digitize(magnitude, (3.0, 6.0))
    score = magnitude / 10 + rng.normal(0, 0.01, magnitude.shape)  # 1 - NCC grows with the error
    t1, t2, mean_f1 = fit_thresholds(score, true)
    assert t1 == pytest.approx(0.3, abs=0.02) and t2 == pytest.approx(0.6, abs=0.02)
    assert mean_f1 > 0.95
    assert (score_classes(score, (t1, t2)) == true).mean() > 0.95
    with pytest.raises(ValueError, match="as many"):
        fit_thresholds(score, true[:-1])


def test_class_weights_favour_a_rare_class():
    rng = np.random.default_rng(1)
    true = np.array([0] * 900 + [1] * 90 + [2] * 10)
    weights = class_weights(true, (0.6, 0.2, 0.2))
    assert np.allclose(weights * np.bincount(true), np.array([0.6, 0.2, 0.2]) * 1000)
    assert np.array_equal(class_weights(true, None), np.ones(3))
    score = np.where(true == 2, 0.8, np.where(true == 1, 0.5, 0.2)) + rng.normal(0, 0.12, true.shape)
    _, t2_plain, _ = fit_thresholds(score, true)
    _, t2_weighted, _ = fit_thresholds(score, true, weights=weights)
    assert t2_weighted <= t2_plain  # "wrong" predicted more readily when it counts as much as in training


def _write(array: np.ndarray, path, spacing=1.0, vector=False) -> str:
    image = sitk.GetImageFromArray(array, isVector=vector)
    image.SetSpacing((spacing,) * 3)
    sitk.WriteImage(image, str(path))
    return path.name


def test_fit_cli_on_a_tiny_prepared_dataset(tmp_path):
    shape = (32, 32, 32)
    fixed = _texture(shape, 1)
    coarse = (17, 17, 17)  # DVF samples on every 2nd voxel
    dvf = np.zeros(coarse + (3,), dtype=np.float32)  # components x, y, z
    dvf[..., 0] = np.linspace(0, 9, coarse[2])[None, None, :]  # |u| grows along x from 0 to 9 mm
    dense_x = np.interp(np.arange(32), np.arange(17) * 2, dvf[0, 0, :, 0])
    z, y, x = np.mgrid[:32, :32, :32].astype(float)
    deformed = ndimage.map_coordinates(fixed, [z, y, x + dense_x[None, None, :]], order=1, mode="nearest")  # F(x+u)
    lung = np.zeros(shape, dtype=np.uint8)
    lung[4:28, 4:28, 2:30] = 1
    entry = {
        "fixed": _write(fixed, tmp_path / "fixed.nii.gz"),
        "deformed": _write(deformed.astype(np.float32), tmp_path / "deformed.nii.gz"),
        "dvf": _write(dvf, tmp_path / "dvf.nii.gz", spacing=2.0, vector=True),
        "body_mask": _write(np.ones(shape, np.uint8), tmp_path / "body.nii.gz"),
        "lung_mask": _write(lung, tmp_path / "lung.nii.gz"),
        "scan": "toy",
        "index": 0,
    }
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [entry], "validation": [entry]}))
    out = tmp_path / "ncc_thresholds.json"
    result = fit(str(tmp_path / "datalist.json"), str(out), windows_mm="5,7", samples_per_pair=2000)
    window, (t1, t2) = read_thresholds(out)
    assert window in (5, 7) and result["window_mm"] == window
    assert 0.0 <= t1 <= t2 and result["mean_f1_on_training_pairs"] > 0.5
    assert sum(result["class_counts"]) == result["voxels"] > 500
    assert "Never tuned on the benchmark" in json.loads(out.read_text())["how"]


def test_thresholds_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="none.json"):
        read_thresholds(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"window_mm": 9}))
    with pytest.raises(ValueError, match="bad.json"):
        read_thresholds(bad)
