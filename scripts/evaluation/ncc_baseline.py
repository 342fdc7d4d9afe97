"""Local normalised cross-correlation (NCC) surrogate baseline: ``1 - NCC`` of the fixed and the registered moving
image in a cubic window, thresholded into correct / poor / wrong.

The two thresholds (and the window, from a short list) are chosen ONLY on generated training pairs (the prepared
dataset's ``training`` entries: fixed, deformed and the known DVF), never on the benchmark: voxels are drawn at random
inside the lungs (on the DVF's coarse-grid voxels, where |u| is exact), their true class is that of |u| (3 / 6 mm),
and the pair (t1, t2) with the highest mean F1 of the three classes is kept. The result is a small JSON file
(``models/ncc_thresholds.json``) that says how it was chosen.

NCC in a window W: ``(cov + eps) / sqrt((var_F + eps) (var_M + eps))`` with local moments from
``scipy.ndimage.uniform_filter`` (``eps`` = 1 HU^2 keeps flat regions defined: identical images give exactly 1).
Arrays are (z, y, x) on 1 mm grids; points are continuous 1 mm voxel coordinates (z, y, x).

CLI::

    python -m scripts.evaluation.ncc_baseline fit --datalist /work/data/misalignment_small/datalist.json \\
        --output models/ncc_thresholds.json [--windows_mm 9,11,15] [--samples_per_pair 20000]
    python -m scripts.evaluation.ncc_baseline predict --fixed F --moving REG --landmarks P.csv --output_dir D
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from sklearn.metrics import f1_score

from scripts.data.baseline_pairs import OneMillimetreFixed, write_class_predictions
from scripts.data.patch_sampling import MISALIGNMENT_PROBABILITIES, magnitude_at, magnitude_classes, read_datalist
from scripts.transforms.artificial_dvf import dvf_from_sitk
from scripts.utils.atomic_write import atomic_write_text

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_THRESHOLDS = "models/ncc_thresholds.json"
DEFAULT_WINDOWS_MM = (9, 11, 15)
BALANCE = {"training": MISALIGNMENT_PROBABILITIES, "none": None}  # class mix the thresholds are fitted for
NCC_EPSILON = 1.0  # HU^2


def local_ncc(fixed: np.ndarray, moving: np.ndarray, window: int, epsilon: float = NCC_EPSILON) -> np.ndarray:
    """Local NCC (float32, in [-1, 1]) of two (z, y, x) arrays in a ``window``^3 voxel box (float64 moments).

    Args:
        fixed: ``(z, y, x)`` fixed image, HU.
        moving: ``(z, y, x)`` moving image of the same shape, HU.
        window: edge of the cubic window, voxels.
        epsilon: added to the covariance and both variances, HU^2 (default ``NCC_EPSILON``).

    Returns:
        float32 array of the same shape, values in [-1, 1].

    Raises:
        ValueError: when the two arrays differ in shape.
    """
    if fixed.shape != moving.shape:
        raise ValueError(f"local NCC needs arrays of one shape, got {fixed.shape} and {moving.shape}")
    f = np.asarray(fixed, dtype=np.float64)
    m = np.asarray(moving, dtype=np.float64)
    mean_f = ndimage.uniform_filter(f, window, mode="nearest")
    mean_m = ndimage.uniform_filter(m, window, mode="nearest")
    var_f = np.maximum(ndimage.uniform_filter(f * f, window, mode="nearest") - mean_f**2, 0.0)
    var_m = np.maximum(ndimage.uniform_filter(m * m, window, mode="nearest") - mean_m**2, 0.0)
    cov = ndimage.uniform_filter(f * m, window, mode="nearest") - mean_f * mean_m
    ncc = (cov + epsilon) / np.sqrt((var_f + epsilon) * (var_m + epsilon))
    return np.clip(ncc, -1.0, 1.0).astype(np.float32)


def _box(points: np.ndarray, shape: tuple[int, ...], margin: int) -> tuple[slice, ...]:
    low = np.maximum(np.floor(points.min(axis=0)).astype(int) - margin, 0)
    high = np.minimum(np.ceil(points.max(axis=0)).astype(int) + margin + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def ncc_at_points(fixed: np.ndarray, moving: np.ndarray, points: np.ndarray, window: int) -> np.ndarray:
    """Local NCC ``[N]`` at 1 mm points ``[N, 3]`` (z, y, x), linear between voxels; computed only on the points'
    bounding box plus the window.

    Args:
        fixed: ``(z, y, x)`` fixed image on a 1 mm grid, HU.
        moving: ``(z, y, x)`` moving image on the same grid, HU.
        points: ``[N, 3]`` continuous voxel coordinates, z-y-x order.
        window: edge of the cubic window, voxels (1 mm).

    Returns:
        float array ``[N]`` of local NCC values.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    box = _box(points, fixed.shape, window // 2 + 2)
    ncc = local_ncc(fixed[box], moving[box], window)
    local = points - np.array([b.start for b in box])
    return ndimage.map_coordinates(ncc, local.T, order=1, mode="nearest")


def score_classes(score: np.ndarray, thresholds: tuple[float, float]) -> np.ndarray:
    """Correct (0) / poor (1) / wrong (2) of a dissimilarity ``score`` (1 - NCC): below t1, [t1, t2), from t2 on.

    Args:
        score: dissimilarity values (1 - NCC), any shape.
        thresholds: ``(t1, t2)`` with ``t1 <= t2``.

    Returns:
        int64 array of the same shape with classes 0, 1, 2.
    """
    return magnitude_classes(np.asarray(score, dtype=np.float64), thresholds).astype(np.int64)


def class_weights(true: np.ndarray, proportions: tuple[float, ...] | None) -> np.ndarray:
    """Per-class sample weights ``[3]`` that make the classes of ``true`` count in ``proportions`` (None: all 1).

    Args:
        true: true classes (0, 1, 2), any shape.
        proportions: target share of each class (three numbers), or None for unit weights.

    Returns:
        float64 array ``[3]``; 0 for a class absent from ``true``.
    """
    counts = np.bincount(np.asarray(true, dtype=np.int64).ravel(), minlength=3).astype(np.float64)
    if proportions is None:
        return np.ones(3)
    return np.divide(
        np.asarray(proportions, dtype=np.float64) * counts.sum(), counts, out=np.zeros(3), where=counts > 0
    )


def fit_thresholds(
    score: np.ndarray, true: np.ndarray, candidates: int = 200, weights: np.ndarray | None = None
) -> tuple[float, float, float]:
    """Thresholds ``t1 <= t2`` on ``score`` maximising the mean F1 of the 3 classes ``true`` (each sample of class
    k weighted ``weights[k]``); returns (t1, t2, mean F1). Candidates are score quantiles; all pairs are scored at
    once from per-class cumulative counts (own code: exact, and ~1000x faster than calling sklearn's f1_score per
    pair, which checks the winner).

    Args:
        score: dissimilarity per sample (1 - NCC).
        true: true class (0, 1, 2) per sample, as many as ``score``.
        candidates: number of quantile steps from which the candidate thresholds are taken.
        weights: per-class sample weights ``[3]`` (see ``class_weights``); None weighs every sample 1.

    Returns:
        Tuple ``(t1, t2, mean_f1)``: the thresholds and sklearn's weighted macro F1 of the resulting classes.

    Raises:
        ValueError: when there are no scores or the numbers of scores and classes differ.
    """
    score = np.asarray(score, dtype=np.float64).ravel()
    true = np.asarray(true, dtype=np.int64).ravel()
    if score.size == 0 or score.size != true.size:
        raise ValueError(f"need as many scores as classes (got {score.size} and {true.size})")
    w = np.ones(3) if weights is None else np.asarray(weights, dtype=np.float64)
    cuts = np.unique(np.quantile(score, np.linspace(0, 1, candidates + 1)))
    cuts = np.concatenate([cuts, [np.nextafter(cuts[-1], np.inf)]])  # a threshold above every score
    below = np.stack([np.searchsorted(np.sort(score[true == k]), cuts, side="left") * w[k] for k in range(3)])
    n = np.array([(true == k).sum() * w[k] for k in range(3)])
    i, j = np.triu_indices(len(cuts))  # t1 = cuts[i] <= t2 = cuts[j]
    tp = np.stack([below[0, i], below[1, j] - below[1, i], n[2] - below[2, j]])
    predicted = np.stack([below[:, i].sum(0), (below[:, j] - below[:, i]).sum(0), n.sum() - below[:, j].sum(0)])
    denominator = predicted + n[:, None]
    f1 = np.divide(2 * tp, denominator, out=np.zeros(tp.shape), where=denominator > 0)
    best = int(np.argmax(f1.mean(axis=0)))
    t1, t2 = float(cuts[i[best]]), float(cuts[j[best]])
    predicted_classes = score_classes(score, (t1, t2))
    check = f1_score(true, predicted_classes, labels=[0, 1, 2], average="macro", sample_weight=w[true], zero_division=0)
    return t1, t2, float(check)


def training_samples(
    entry: dict, windows: tuple[int, ...], count: int, rng: np.random.Generator
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """``1 - NCC`` per window and |u| (mm) at ``count`` random lung voxels of one prepared pair (voxels on the DVF's
    coarse grid, where |u| is the exact sample).

    Args:
        entry: prepared datalist entry with ``fixed``, ``deformed``, ``lung_mask`` and ``dvf`` paths.
        windows: NCC window edges, voxels (1 mm).
        count: number of lung voxels to draw (fewer if the lung has fewer coarse-grid voxels).
        rng: random generator that picks the voxels.

    Returns:
        Tuple ``(scores, magnitude)``: dict window -> ``[n]`` array of 1 - NCC, and float32 ``[n]`` |u| in mm.

    Raises:
        ValueError: when the images and lung mask differ in shape or the lung mask is empty.
    """
    fixed_image = sitk.ReadImage(entry["fixed"])
    fixed = sitk.GetArrayFromImage(fixed_image).astype(np.float32)
    deformed = sitk.GetArrayFromImage(sitk.ReadImage(entry["deformed"])).astype(np.float32)
    lung = sitk.GetArrayFromImage(sitk.ReadImage(entry["lung_mask"])) > 0
    dvf_image = sitk.ReadImage(entry["dvf"])
    factor = int(round(dvf_image.GetSpacing()[0] / fixed_image.GetSpacing()[0]))
    if fixed.shape != deformed.shape or fixed.shape != lung.shape:
        raise ValueError(f"{entry['deformed']}: shape {deformed.shape} differs from {entry['fixed']} {fixed.shape}")
    voxels = np.argwhere(lung[::factor, ::factor, ::factor]) * factor
    if len(voxels) == 0:
        raise ValueError(f"{entry['lung_mask']}: empty lung mask")
    voxels = voxels[rng.choice(len(voxels), size=min(count, len(voxels)), replace=False)]
    magnitude = magnitude_at(dvf_from_sitk(dvf_image), factor, voxels)
    scores = {w: 1.0 - ncc_at_points(fixed, deformed, voxels.astype(np.float64), w) for w in windows}
    return scores, magnitude


def _windows(windows_mm) -> tuple[int, ...]:
    values = windows_mm.split(",") if isinstance(windows_mm, str) else windows_mm
    values = [values] if isinstance(values, (int, float)) else values
    out = tuple(int(v) for v in values)
    if not out or any(w < 3 or w % 2 == 0 for w in out):
        raise ValueError(f"windows must be odd sizes >= 3 (1 mm voxels), got {windows_mm}")
    return out


def fit(
    datalist: str = "/work/data/misalignment_small/datalist.json",
    output: str = DEFAULT_THRESHOLDS,
    windows_mm: str | tuple[int, ...] = "9,11,15",
    samples_per_pair: int = 20000,
    seed: int = 0,
    balance: str = "training",
) -> dict:
    """Choose the window and the two thresholds on the datalist's ``training`` pairs (mean F1 at random lung voxels,
    classes weighted to the misalignment network's training proportions 60/20/20 with ``balance="training"``, as
    drawn with ``"none"``) and write them with how they were chosen to ``output`` (JSON); returns that dictionary.

    Args:
        datalist: prepare_data datalist (JSON) whose ``training`` entries are used.
        output: JSON file to write.
        windows_mm: candidate window edges in 1 mm voxels (odd, at least 3), a comma-separated string or a tuple.
        samples_per_pair: random lung voxels per training pair.
        seed: seed of the random voxel choice.
        balance: "training" (classes weighted to ``MISALIGNMENT_PROBABILITIES``) or "none" (as drawn).

    Returns:
        The written dict: ``window_mm``, ``thresholds``, ``mean_f1_on_training_pairs``, per-window results and how
        they were chosen.

    Raises:
        ValueError: for an unknown ``balance``, bad windows or an unusable training pair.
        FileNotFoundError: when the datalist does not exist.
    """
    if balance not in BALANCE:
        raise ValueError(f"balance must be one of {sorted(BALANCE)}, got {balance!r}")
    start = time.perf_counter()
    windows = _windows(windows_mm)
    entries = read_datalist(datalist, "training")
    rng = np.random.default_rng(seed)
    scores: dict[int, list[np.ndarray]] = {w: [] for w in windows}
    magnitudes = []
    for entry in entries:
        pair_scores, magnitude = training_samples(entry, windows, samples_per_pair, rng)
        for w in windows:
            scores[w].append(pair_scores[w])
        magnitudes.append(magnitude)
    true = magnitude_classes(np.concatenate(magnitudes))
    weights = class_weights(true, BALANCE[balance])
    per_window = {}
    for w in windows:
        t1, t2, mean_f1 = fit_thresholds(np.concatenate(scores[w]), true, weights=weights)
        per_window[str(w)] = {"thresholds": [t1, t2], "mean_f1": mean_f1}
    best = max(per_window, key=lambda w: per_window[w]["mean_f1"])
    result = {
        "score": "1 - local NCC of fixed and registered moving (HU, 1 mm grid, background -2048 outside the body)",
        "window_mm": int(best),
        "thresholds": per_window[best]["thresholds"],
        "rule": "correct if score < thresholds[0], poor if below thresholds[1], wrong otherwise",
        "mean_f1_on_training_pairs": per_window[best]["mean_f1"],
        "epsilon_hu2": NCC_EPSILON,
        "how": (
            f"{samples_per_pair} random lung voxels per training pair (DVF grid voxels, true class from |u| at 3 / 6 "
            "mm); thresholds maximise the mean F1 of correct/poor/wrong over all voxels (quantile candidates), "
            f"classes weighted {'as drawn' if balance == 'none' else 'to 60/20/20 (the misalignment training mix)'}; "
            "the window with the best mean F1 is kept. Never tuned on the benchmark."
        ),
        "balance": balance,
        "class_weights": weights.tolist(),
        "per_window": per_window,
        "datalist": str(datalist),
        "pairs": [f"{e.get('scan')}#{e.get('index')} ({e.get('dvf_type')})" for e in entries],
        "voxels": int(len(true)),
        "class_counts": np.bincount(true, minlength=3).tolist(),
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 1),
    }
    atomic_write_text(output, json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("window_mm", "thresholds", "mean_f1_on_training_pairs")}))
    return result


def read_thresholds(path: str | os.PathLike = DEFAULT_THRESHOLDS) -> tuple[int, tuple[float, float]]:
    """Window (voxels at 1 mm) and thresholds from a fitted JSON; clear errors naming the file."""
    path = Path(path)
    path = path if path.is_absolute() else BUNDLE_ROOT / path
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: NCC thresholds not fitted yet (python -m scripts.evaluation.ncc_baseline fit)"
        )
    try:
        data = json.loads(path.read_text())
        window, (t1, t2) = int(data["window_mm"]), (float(v) for v in data["thresholds"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not an NCC thresholds file ({err})") from None
    if t2 < t1:
        raise ValueError(f"{path}: thresholds must be ordered, got {[t1, t2]}")
    return window, (t1, t2)


def predict_settings(
    fixed: str | os.PathLike,
    pairs: dict[str, tuple[str | os.PathLike, str | os.PathLike]],
    output_dir: str | os.PathLike,
    thresholds_file: str | os.PathLike = DEFAULT_THRESHOLDS,
) -> dict[str, tuple[Path, float]]:
    """The NCC baseline on every ``setting -> (registered moving image, landmark CSV)``; writes
    ``<moving stem>_landmarks.csv`` (input columns + pred, one-hot p_*, ``ncc``) and returns ``setting -> (csv,
    seconds)`` (the fixed image's loading is counted in the first setting).

    Args:
        fixed: fixed image file.
        pairs: setting name -> (registered moving image file, landmark CSV of fixed-image points).
        output_dir: folder of the written CSV files.
        thresholds_file: fitted JSON (``fit``); a relative path is taken from the bundle root.

    Returns:
        Dict setting -> (path of the written CSV, seconds).

    Raises:
        FileNotFoundError: when the thresholds file does not exist.
        ValueError: when it is not a valid thresholds file.
    """
    start = time.perf_counter()
    window, thresholds = read_thresholds(thresholds_file)
    reference = OneMillimetreFixed(fixed)
    out = {}
    for setting, (moving_path, landmarks_path) in pairs.items():
        table, points = reference.landmarks(landmarks_path)
        ncc = ncc_at_points(reference.hu, reference.moving(moving_path), points, window)
        classes = score_classes(1.0 - ncc, thresholds)
        csv = write_class_predictions(table, classes, moving_path, output_dir, {"ncc": ncc})
        out[setting] = (csv, time.perf_counter() - start)
        start = time.perf_counter()
    return out


def predict(
    fixed: str, moving: str, landmarks: str, output_dir: str, thresholds_file: str = DEFAULT_THRESHOLDS
) -> None:
    """CLI: NCC classes at the landmarks of one (fixed, registered moving) pair.

    Args:
        fixed: fixed image file.
        moving: registered moving image file.
        landmarks: landmark CSV of fixed-image points.
        output_dir: folder of the written CSV.
        thresholds_file: fitted JSON (``fit``); a relative path is taken from the bundle root.
    """
    ((csv, seconds),) = predict_settings(fixed, {"pair": (moving, landmarks)}, output_dir, thresholds_file).values()
    print(f"{csv} ({seconds:.1f} s)")


if __name__ == "__main__":
    import fire

    fire.Fire({"fit": fit, "predict": predict}, serialize=lambda result: None)  # fit prints its summary
