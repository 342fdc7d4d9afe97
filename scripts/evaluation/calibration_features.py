"""Does the re-registration's calibration gain from cheap local features beside |r|?

On lung voxels of registered artificial pairs (``scripts.registration.registered_pairs``) the script computes, beside
|r|: the largest |r| within 4 mm, the Jacobian determinant of x + r(x), local NCC and the mean absolute difference of
the fixed and the registered image (7^3 windows), the fixed image's gradient magnitude (texture) and the distance to
the lung boundary. It compares gradient boosting on |r| alone with gradient boosting on all features, leave-one-scan-
out on the TRAINING pairs (mean F1, kappa, ECE, log loss), and scores both, fitted on all training pairs, on the
VALIDATION pairs (judging only: nothing is chosen there). The shipped calibration stays the isotonic |r| table unless
this shows a clear gain::

    python -m scripts.evaluation.calibration_features \
        --datalist <work_dir>/registered/datalist.json,<work_dir>/registered_val2/datalist.json \
        --output docs/reregistration/calibration_features.json
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from scripts.registration.calibration import probability_scores, true_classes
from scripts.registration.views import local_ncc
from scripts.utils.atomic_write import atomic_write_text

logger = logging.getLogger(__name__)

FEATURES = (
    "log1p_r",
    "max_r_4mm",
    "jacobian_r",
    "local_ncc",
    "local_abs_difference_hu",
    "fixed_gradient_hu_per_mm",
    "lung_depth_mm",
)
WINDOW = 7  # voxels (1 mm grid) of the local NCC and difference windows


def _array(path: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(path))  # a copy: a view would outlive its image


def jacobian_at(field: np.ndarray, points: np.ndarray, spacing_zyx: np.ndarray) -> np.ndarray:
    """det(I + dr/dx) at ``points`` [N, 3] (z, y, x) of a displacement ``field`` [z, y, x, 3] (x, y, z in mm), by
    central differences; the points must lie at least one voxel inside the grid.

    Args:
        field: ``[z, y, x, 3]`` displacement field (components x-y-z), mm.
        points: ``[N, 3]`` integer voxel indices, z-y-x order.
        spacing_zyx: voxel spacing in mm, z-y-x order.

    Returns:
        float array ``[N]`` of determinants.
    """
    gradient = np.zeros((len(points), 3, 3))
    for axis in range(3):  # array axis z, y, x -> physical axis 2, 1, 0
        step = np.zeros(3, dtype=int)
        step[axis] = 1
        ahead, behind = points + step, points - step
        diff = field[tuple(ahead.T)] - field[tuple(behind.T)]
        gradient[:, :, 2 - axis] = diff / (2 * spacing_zyx[axis])
    return np.linalg.det(np.eye(3)[None] + gradient)


def pair_features(record: dict, per_pair: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Features ``[N, len(FEATURES)]`` and true |e| (mm) at ``per_pair`` random lung voxels of one pair.

    Args:
        record: registered-pair record with ``fixed``, ``registered``, ``lung_mask``, ``residual_true`` paths and
            ``residual_estimate`` (its ``path``).
        per_pair: number of lung voxels to draw (from those at least one voxel inside the grid).
        rng: random generator that picks the voxels.

    Returns:
        Tuple ``(features, e)``: ``[n, len(FEATURES)]`` features and ``[n]`` true |e| in mm.
    """
    image = sitk.ReadImage(record["fixed"])
    spacing_zyx = np.array(image.GetSpacing()[::-1])
    fixed = sitk.GetArrayFromImage(image).astype(np.float32)
    registered = _array(record["registered"]).astype(np.float32)
    lung = _array(record["lung_mask"]) > 0
    estimate = _array(record["residual_estimate"]["path"]).astype(np.float32)
    truth = _array(record["residual_true"])
    inner = np.zeros_like(lung)
    inner[1:-1, 1:-1, 1:-1] = lung[1:-1, 1:-1, 1:-1]
    idx = np.flatnonzero(inner)
    points = np.stack(np.unravel_index(rng.choice(idx, size=min(per_pair, idx.size), replace=False), lung.shape), 1)
    at = tuple(points.T)
    magnitude = np.linalg.norm(estimate, axis=-1)
    radius = np.maximum(1, np.round(4.0 / spacing_zyx).astype(int))
    columns = {
        "log1p_r": np.log1p(magnitude[at]),
        "max_r_4mm": ndimage.maximum_filter(magnitude, size=tuple(2 * radius + 1))[at],
        "jacobian_r": jacobian_at(estimate, points, spacing_zyx),
        "local_ncc": local_ncc(fixed, registered, (WINDOW,) * 3)[at],
        "local_abs_difference_hu": ndimage.uniform_filter(np.abs(fixed - registered), WINDOW)[at],
        "fixed_gradient_hu_per_mm": ndimage.gaussian_gradient_magnitude(fixed, 1.0)[at] / spacing_zyx.mean(),
        "lung_depth_mm": ndimage.distance_transform_edt(lung, sampling=spacing_zyx)[at],
    }
    return np.stack([columns[name] for name in FEATURES], 1), np.linalg.norm(truth[at], axis=-1)


def _fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.ensemble import HistGradientBoostingClassifier

    clf = HistGradientBoostingClassifier(max_iter=200, random_state=seed).fit(x_train, y_train)
    probs = np.zeros((len(x_test), 3))
    probs[:, clf.classes_] = clf.predict_proba(x_test)
    return probs


def compare(
    datalist: str,
    per_pair: int = 20000,
    seed: int = 0,
    output: str = "",
) -> dict:
    """Gradient boosting on |r| alone against |r| + local features (see the module); ``datalist``: one path or
    several separated by commas.

    Args:
        datalist: registered-pairs datalist (JSON), or several separated by commas.
        per_pair: lung voxels drawn per pair.
        seed: seed of the voxel choice and the models.
        output: JSON file to write; "" writes nothing.

    Returns:
        Dict of the features, voxel and class counts, per feature set the leave-one-scan-out and validation scores,
        permutation importances and seconds.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(message)s")
    start = time.perf_counter()
    data: dict[str, dict[str, list]] = {}
    for split in ("training", "validation"):
        records = [r for name in str(datalist).split(",") if name for r in json.loads(Path(name).read_text())[split]]
        rng = np.random.default_rng(seed)
        found: dict[str, list] = {"x": [], "e": [], "scan": []}
        for record in records:
            x, e = pair_features(record, per_pair, rng)
            found["x"].append(x)
            found["e"].append(e)
            found["scan"] += [record["scan"]] * len(e)
            logger.info("%s: %s features", split, record["record"])
        data[split] = {
            "x": np.concatenate(found["x"]),
            "e": np.concatenate(found["e"]),
            "scan": np.array(found["scan"]),
        }
    train, val = data["training"], data["validation"]
    labels = true_classes(train["e"])
    sets = {"|r| only": [0], "|r| + local features": list(range(len(FEATURES)))}
    results: dict = {
        "features": list(FEATURES),
        "voxels": {"training": int(labels.size), "validation": int(val["e"].size)},
        "class_counts": {
            "training": np.bincount(labels, minlength=3).tolist(),
            "validation": np.bincount(true_classes(val["e"]), minlength=3).tolist(),
        },
    }
    for name, columns in sets.items():
        probs = np.zeros((labels.size, 3))
        for scan in np.unique(train["scan"]):
            test = train["scan"] == scan
            probs[test] = _fit_predict(train["x"][~test][:, columns], labels[~test], train["x"][test][:, columns], seed)
        validation = _fit_predict(train["x"][:, columns], labels, val["x"][:, columns], seed)
        results[name] = {
            "leave_one_scan_out": probability_scores(labels, probs),
            "validation": probability_scores(true_classes(val["e"]), validation),
        }
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.inspection import permutation_importance

    subset = np.random.default_rng(seed).choice(labels.size, size=min(50000, labels.size), replace=False)
    clf = HistGradientBoostingClassifier(max_iter=200, random_state=seed).fit(train["x"], labels)
    importance = permutation_importance(clf, train["x"][subset], labels[subset], n_repeats=3, random_state=seed)
    results["permutation_importance_training"] = dict(zip(FEATURES, np.round(importance.importances_mean, 4).tolist()))
    results["seconds"] = round(time.perf_counter() - start, 1)
    if output:
        atomic_write_text(Path(output), json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    import fire

    fire.Fire(compare)
