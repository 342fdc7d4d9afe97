"""Calibration of the re-registration estimator: from the residual a second registration finds, |r|, to class
probabilities P(correct), P(poor), P(wrong) and an expected misalignment in mm.

A second registration under-calls (it finds part of what the first missed), so thresholding |r| at 3 and 6 mm
calls too many voxels correct. The calibration is fitted with scikit-learn on voxels of registered artificial pairs
of the TRAINING scans (``scripts.registration.registered_pairs``) whose true misalignment is known exactly:

- ``P(e >= 3 | |r|)`` and ``P(e >= 6 | |r|)`` by isotonic regression (increasing in |r|, so the map is monotone),
  ``P(correct) = 1 - P(>=3)``, ``P(poor) = P(>=3) - P(>=6)``, ``P(wrong) = P(>=6)``;
- ``E[e | |r|]`` by isotonic regression;
- the class weights of the mean-F1 decision, labels = argmax(w * p) (``scripts.utils.class_decision``), on the same
  voxels: the probabilities stay calibrated, the labels favour the rarer classes as the mean F1 asks.

Both are stored as piecewise-linear tables in ``models/reregistration_calibration.json`` with the estimator settings
they were fitted for (and their sha256). ``python -m scripts.registration.calibration fit`` compares the isotonic
tables with logistic regression and gradient boosting (leave-one-scan-out) and writes the file; ``... report`` draws
the reliability diagram and the expected calibration error on registered pairs of the validation scan. Inference
reads the tables with ``scripts.registration.calibration_tables``; studies of other settings and decisions are in
``scripts.evaluation.calibration_studies``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from scripts.registration.calibration_tables import ResidualCalibration, options_sha256
from scripts.registration.reregistration import ReregistrationOptions
from scripts.utils.atomic_write import atomic_write_text
from scripts.utils.class_decision import fit_class_weights
from scripts.utils.constants import CLASS_NAMES, CLASS_THRESHOLDS_MM

logger = logging.getLogger(__name__)

TABLE_POINTS = 200  # knots kept of each fitted isotonic step function


def _table(x: np.ndarray, y: np.ndarray, increasing: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """An isotonic fit of y on x (scikit-learn) sampled at ``TABLE_POINTS`` quantile knots of x."""
    from sklearn.isotonic import IsotonicRegression

    model = IsotonicRegression(increasing=increasing, out_of_bounds="clip").fit(x, y)
    knots = np.unique(np.quantile(x, np.linspace(0.0, 1.0, TABLE_POINTS)))
    return knots, model.predict(knots)


def fit_isotonic(
    magnitude: np.ndarray, error: np.ndarray, options_digest: str = "", labels: np.ndarray | None = None
) -> ResidualCalibration:
    """The calibration tables from voxel samples of |r| and the true misalignment |e| (mm); with ``labels`` (the
    true classes of the samples) also the mean-F1 class weights of its probabilities on them.

    Args:
        magnitude: ``[N]`` residual magnitudes |r| found by the second registration, mm.
        error: ``[N]`` true misalignments |e| at the same voxels, mm.
        options_digest: sha256 of the estimator settings the samples come from (stored with the tables).
        labels: optional ``[N]`` true classes (0, 1, 2); given, the mean-F1 class weights are fitted too.

    Returns:
        A ``ResidualCalibration`` with knots, P(>=3 mm), P(>=6 mm), expected error and, with ``labels``, class weights.
    """
    lo, hi = CLASS_THRESHOLDS_MM
    knots, p3 = _table(magnitude, (error >= lo).astype(float))
    p6 = np.interp(knots, *_table(magnitude, (error >= hi).astype(float)))
    expected = np.interp(knots, *_table(magnitude, error))
    out = ResidualCalibration(
        knots.tolist(), p3.tolist(), np.minimum(p6, p3).tolist(), expected.tolist(), options_digest
    )
    if labels is not None:
        out.class_weights = fit_class_weights(labels, out.predict(magnitude)[0].T)[0]
    return out


def true_classes(error: np.ndarray) -> np.ndarray:
    """Correct (0), poor (1), wrong (2) of misalignments in mm."""
    return np.digitize(error, CLASS_THRESHOLDS_MM)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Top-label ECE: the |accuracy - confidence| of the predicted class, averaged over confidence bins by count.

    Args:
        probabilities: ``[N, C]`` class probabilities.
        labels: ``[N]`` true classes.
        bins: number of equal-width confidence bins on [0, 1].

    Returns:
        The ECE, a float in [0, 1].
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = index == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(total)


def sample_voxels(record: dict, per_pair: int, rng: np.random.Generator, region: str = "lung_mask"):
    """|r| and |e| (mm) at ``per_pair`` random voxels of a registered pair's ``region`` mask.

    Args:
        record: registered-pair record with ``residual_estimate``, ``residual_true`` and ``region`` image paths.
        per_pair: number of voxels to draw (fewer if the region has fewer).
        rng: random generator that picks the voxels.
        region: record key of the mask the voxels are drawn from.

    Returns:
        Tuple ``(r, e)`` of float ``[n]`` arrays: |r| and |e| in mm.
    """
    region_mask = sitk.GetArrayFromImage(sitk.ReadImage(record[region])) > 0  # a copy: a view would outlive its image
    idx = np.flatnonzero(region_mask)
    idx = rng.choice(idx, size=min(per_pair, idx.size), replace=False)
    out = []
    for key in ("residual_estimate", "residual_true"):
        field = sitk.GetArrayFromImage(sitk.ReadImage(record[key])).reshape(-1, 3)
        out.append(np.linalg.norm(field[idx], axis=1))
    return out[0], out[1]


def class_scores(labels: np.ndarray, predicted: np.ndarray) -> dict:
    """Mean F1 (macro over the three classes), accuracy and Cohen's kappa (scikit-learn).

    Args:
        labels: ``[N]`` true classes (0, 1, 2).
        predicted: ``[N]`` predicted classes.

    Returns:
        Dict with float ``mean_f1``, ``accuracy`` and ``kappa``.
    """
    from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score

    return {
        "mean_f1": float(f1_score(labels, predicted, labels=[0, 1, 2], average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(labels, predicted)),
        "kappa": float(cohen_kappa_score(labels, predicted, labels=[0, 1, 2])),
    }


def probability_scores(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """``class_scores`` of the argmax of ``probabilities [N, 3]``, their log loss (clipped at 1e-6) and ECE.

    Args:
        labels: ``[N]`` true classes (0, 1, 2).
        probabilities: ``[N, 3]`` class probabilities.

    Returns:
        Dict with ``mean_f1``, ``accuracy``, ``kappa``, ``log_loss`` and ``ece`` (floats).
    """
    from sklearn.metrics import log_loss

    scores = class_scores(labels, probabilities.argmax(axis=1))
    clipped = np.clip(probabilities, 1e-6, 1)
    scores["log_loss"] = float(log_loss(labels, clipped / clipped.sum(axis=1, keepdims=True), labels=[0, 1, 2]))
    scores["ece"] = expected_calibration_error(probabilities, labels)
    return scores


def load_samples(
    datalist: str | Path, split: str, per_pair: int, seed: int, options: ReregistrationOptions
) -> tuple[np.ndarray, ...]:
    """|r|, |e|, the scan name and the pair index of voxel samples of the ``split`` pairs, whose estimates must be of
    ``options``; ``datalist``: one path, or several separated by commas (their pairs are pooled).

    Args:
        datalist: registered-pairs datalist (JSON), or several separated by commas.
        split: datalist key, e.g. "training" or "validation".
        per_pair: voxels drawn per pair (from its lung mask).
        seed: seed of the voxel choice.
        options: re-registration settings the pairs' estimates must have been computed with.

    Returns:
        Tuple ``(r, e, scans, pairs)`` of ``[N]`` arrays: |r| and |e| (mm), scan name and pair index per voxel.

    Raises:
        ValueError: when the datalists hold no ``split`` pairs or a pair has no estimate for ``options``.
        FileNotFoundError: when a pair's estimate, true residual or lung mask file is missing.
    """
    names = [d for d in str(datalist).split(",") if d]
    records = [r for name in names for r in json.loads(Path(name).read_text()).get(split, [])]
    if not records:
        raise ValueError(f"{datalist}: no {split} pairs")
    digest = options_sha256(options)
    other = [r.get("record") for r in records if r.get("residual_estimate", {}).get("options_sha256") != digest]
    if other:
        raise ValueError(
            f"{datalist}: {len(other)} pairs (e.g. {other[0]}) have no estimate for these settings; run "
            "python -m scripts.registration.registered_pairs estimate with the same settings"
        )
    rng = np.random.default_rng(seed)
    r, e, scans, pairs = [], [], [], []
    for index, record in enumerate(records):
        estimate = record.get("residual_estimate", {}).get("path", "")
        for key, path in (
            ("residual_estimate", estimate),
            ("residual_true", record["residual_true"]),
            ("lung_mask", record["lung_mask"]),
        ):
            if not path or not Path(path).is_file():
                raise FileNotFoundError(
                    f"{datalist}: pair {record.get('record')} has no {key} file {path!r}; run registered_pairs "
                    "make / estimate"
                )
        a, b = sample_voxels({**record, "residual_estimate": estimate}, per_pair, rng)
        r.append(a)
        e.append(b)
        scans += [record["scan"]] * a.size
        pairs += [index] * a.size
    return np.concatenate(r), np.concatenate(e), np.array(scans), np.array(pairs)


def compare_models(magnitude: np.ndarray, error: np.ndarray, scans: np.ndarray, seed: int = 0) -> dict:
    """Leave-one-scan-out scores of |r| thresholds, isotonic tables, logistic regression and gradient boosting
    (both on log1p|r|): mean F1 of the argmax, kappa, log loss, ECE and the MAE of the expected error.

    Args:
        magnitude: ``[N]`` residual magnitudes |r|, mm.
        error: ``[N]`` true misalignments |e|, mm.
        scans: ``[N]`` scan name per sample (the leave-one-out groups).
        seed: random state of the gradient-boosting models.

    Returns:
        Dict model name -> scores (``probability_scores`` plus ``error_mae_mm``), and the class scores of the isotonic
        tables with the mean-F1 decision.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.linear_model import LinearRegression, LogisticRegression

    labels = true_classes(error)
    x = np.log1p(magnitude)[:, None]
    results: dict[str, dict] = {}
    weighted_labels = np.zeros(labels.size, dtype=int)  # isotonic + the mean-F1 decision fitted on the same folds
    for name in ("thresholds", "isotonic", "logistic", "gradient_boosting"):
        probs = np.zeros((labels.size, 3))
        expected = np.zeros(labels.size)
        for scan in np.unique(scans):
            test = scans == scan
            train = ~test
            if name == "thresholds":
                p, ex = ResidualCalibration.thresholds().predict(magnitude[test])
                probs[test], expected[test] = p.T, ex
            elif name == "isotonic":
                fitted = fit_isotonic(magnitude[train], error[train], labels=labels[train])
                p, ex = fitted.predict(magnitude[test])
                probs[test], expected[test] = p.T, ex
                weighted_labels[test] = fitted.decide(p)
            else:
                if name == "logistic":
                    clf = LogisticRegression(max_iter=500).fit(x[train], labels[train])
                    reg = LinearRegression().fit(x[train], error[train])
                else:
                    clf = HistGradientBoostingClassifier(max_iter=100, random_state=seed).fit(x[train], labels[train])
                    reg = HistGradientBoostingRegressor(max_iter=100, random_state=seed).fit(x[train], error[train])
                p = np.zeros((test.sum(), 3))
                p[:, clf.classes_] = clf.predict_proba(x[test])
                probs[test], expected[test] = p, reg.predict(x[test])
        scores = probability_scores(labels, probs)
        scores["error_mae_mm"] = float(np.abs(expected - error).mean())
        results[name] = scores
    results["isotonic, mean-F1 decision"] = class_scores(labels, weighted_labels)
    return results


def fit(
    datalist: str,
    output: str = "models/reregistration_calibration.json",
    per_pair: int = 20000,
    seed: int = 0,
    **changes,
) -> dict:
    """Fit the isotonic tables on the training pairs of ``datalist`` (estimates of the default settings, or of
    ``changes`` to them), compare models leave-one-scan-out, write ``output`` (with the comparison); returns it.

    Args:
        datalist: registered-pairs datalist (JSON), or several separated by commas.
        output: calibration JSON file to write.
        per_pair: voxels drawn per training pair.
        seed: seed of the voxel choice and of the compared models.
        **changes: ``ReregistrationOptions`` fields that differ from the defaults.

    Returns:
        The extra content written with the tables: ``fitted_on``, ``estimator_options`` and ``leave_one_scan_out``.

    Raises:
        ValueError: when the datalists hold no training pairs or their estimates are of other settings.
        FileNotFoundError: when a pair's files are missing.
    """
    options = ReregistrationOptions(**changes)
    magnitude, error, scans, _ = load_samples(datalist, "training", per_pair, seed, options)
    comparison = compare_models(magnitude, error, scans, seed)
    calibration = fit_isotonic(magnitude, error, options_sha256(options), labels=true_classes(error))
    counts = np.bincount(true_classes(error), minlength=3)
    extra = {
        "fitted_on": {
            "datalist": str(datalist),
            "scans": sorted(set(scans.tolist())),
            "voxels": int(error.size),
            "class_counts": dict(zip(CLASS_NAMES, counts.tolist())),
        },
        "estimator_options": {k: v for k, v in asdict(options).items() if k != "threads"},
        "leave_one_scan_out": comparison,
    }
    atomic_write_text(Path(output), calibration.to_json(**extra))
    print(json.dumps(extra, indent=1))
    return extra


def report(
    datalist: str,
    calibration_file: str = "models/reregistration_calibration.json",
    output_dir: str = "docs/reregistration",
    per_pair: int = 20000,
    seed: int = 1,
) -> dict:
    """Reliability diagram (PNG) and scores of the calibration on the VALIDATION pairs of ``datalist`` (one path, or
    several separated by commas).

    Args:
        datalist: registered-pairs datalist (JSON), or several separated by commas.
        calibration_file: calibration JSON written by ``fit``.
        output_dir: folder of ``reliability.png`` and ``calibration_validation.json``.
        per_pair: voxels drawn per validation pair.
        seed: seed of the voxel choice.

    Returns:
        The scores written to ``calibration_validation.json`` (voxel and class counts, thresholds, calibrated and
        mean-F1 decision scores).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    options = ReregistrationOptions()
    magnitude, error, _, _ = load_samples(datalist, "validation", per_pair, seed, options)
    labels = true_classes(error)
    calibration = ResidualCalibration.read(calibration_file, options)
    probs, expected = calibration.predict(magnitude)
    probs = probs.T
    out = {
        "voxels": int(labels.size),
        "class_counts": dict(zip(CLASS_NAMES, np.bincount(labels, minlength=3).tolist())),
    }
    for name, (p, ex) in {
        "thresholds": ResidualCalibration.thresholds().predict(magnitude),
        "calibrated": (probs.T, expected),
    }.items():
        p = p.T
        out[name] = {
            **class_scores(labels, p.argmax(axis=1)),
            "ece": expected_calibration_error(p, labels),
            "error_mae_mm": float(np.abs(ex - error).mean()),
        }
    from scipy.stats import spearmanr

    out["calibrated"]["error_spearman"] = float(spearmanr(expected, error).statistic)
    out["calibrated, mean-F1 decision"] = {
        **class_scores(labels, calibration.decide(probs, axis=1)),
        "class_weights": calibration.class_weights,
    }

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    edges = np.linspace(0, 1, 11)
    for c, (name, colour) in enumerate(zip(CLASS_NAMES, ("tab:green", "gold", "tab:red"))):
        index = np.clip(np.digitize(probs[:, c], edges[1:-1]), 0, 9)
        xs, ys = [], []
        for b in range(10):
            sel = index == b
            if sel.sum() >= 50:
                xs.append(probs[sel, c].mean())
                ys.append((labels[sel] == c).mean())
        axes[0].plot(xs, ys, "o-", color=colour, label=f"P({name})")
    axes[0].plot([0, 1], [0, 1], "k--", lw=1)
    axes[0].set_xlabel("predicted probability")
    axes[0].set_ylabel("observed frequency")
    axes[0].set_title(f"reliability, validation pairs (ECE {out['calibrated']['ece']:.3f})")
    axes[0].legend()
    order = np.argsort(expected)
    bins = np.array_split(order, 20)
    axes[1].plot([expected[b].mean() for b in bins], [error[b].mean() for b in bins], "o-", label="calibrated E[e]")
    order = np.argsort(magnitude)
    bins = np.array_split(order, 20)
    axes[1].plot([magnitude[b].mean() for b in bins], [error[b].mean() for b in bins], "s-", label="|r| as is")
    top = float(np.percentile(error, 99))
    axes[1].plot([0, top], [0, top], "k--", lw=1)
    axes[1].set_xlabel("estimated misalignment (mm)")
    axes[1].set_ylabel("true misalignment (mm)")
    axes[1].set_title("expected error vs truth (20 quantile bins)")
    axes[1].legend()
    fig.tight_layout()
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    fig.savefig(path / "reliability.png", dpi=110)
    plt.close(fig)
    atomic_write_text(path / "calibration_validation.json", json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    import fire

    fire.Fire({"fit": fit, "report": report})
