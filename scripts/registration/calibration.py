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
they were fitted for (and their sha256); applied with ``numpy.interp``, so inference needs neither scikit-learn
nor a pickle. ``python -m scripts.registration.calibration fit`` compares it with logistic regression and gradient
boosting (leave-one-scan-out) and writes the file; ``... report`` draws the reliability diagram and the expected
calibration error on registered pairs of the validation scan; ``... compare_priors`` asks whether adapting the
decision to each pair's class mix would help (leave-one-scan-out on the training pairs).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from scripts.registration.reregistration import ReregistrationOptions
from scripts.utils.atomic_write import atomic_write_text
from scripts.utils.class_decision import fit_class_weights, weighted_argmax
from scripts.utils.constants import CLASS_NAMES, CLASS_THRESHOLDS_MM

logger = logging.getLogger(__name__)

TABLE_POINTS = 200  # knots kept of each fitted isotonic step function


def options_sha256(options: ReregistrationOptions) -> str:
    """A digest of the estimator settings that change r (the thread count does not)."""
    settings = {k: v for k, v in sorted(asdict(options).items()) if k != "threads"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass
class ResidualCalibration:
    """Piecewise-linear maps of |r| (mm): ``p_at_least`` for the 3 and 6 mm thresholds, and ``expected_mm``.

    Args:
        knots_mm: increasing |r| values of the tables.
        p_at_least_3: P(e >= 3 mm) at the knots (increasing).
        p_at_least_6: P(e >= 6 mm) at the knots (increasing, <= p_at_least_3).
        expected_mm: E[e] at the knots (increasing).
        options_sha256: digest of the estimator settings the tables were fitted for ("" if none).
        class_weights: ``[1, w_poor, w_wrong]`` of the mean-F1 decision labels = argmax(w * p), fitted on the same
            training voxels (``scripts.utils.class_decision``); None: the plain argmax. The probabilities stay as
            calibrated; only the labels use the weights.
    """

    knots_mm: list[float]
    p_at_least_3: list[float]
    p_at_least_6: list[float]
    expected_mm: list[float]
    options_sha256: str = ""
    class_weights: list[float] | None = None

    @classmethod
    def thresholds(cls) -> "ResidualCalibration":
        """No calibration: |r| thresholded at 3 and 6 mm (one-hot probabilities) and E[e] = |r|."""
        lo, hi = CLASS_THRESHOLDS_MM
        eps = 1e-6
        return cls([0.0, lo - eps, lo, hi - eps, hi, 1000.0], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1],
                   [0.0, lo - eps, lo, hi - eps, hi, 1000.0])  # fmt: skip

    def decide(self, probabilities: np.ndarray, axis: int = 0) -> np.ndarray:
        """Labels of ``probabilities`` (classes along ``axis``): argmax(class_weights * p), or the plain argmax."""
        return weighted_argmax(probabilities, self.class_weights, axis)

    def predict(self, magnitude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities ``[3, *magnitude.shape]`` (correct, poor, wrong) and expected error (mm) of ``|r|``."""
        x = np.asarray(magnitude, dtype=np.float64)
        p3 = np.interp(x, self.knots_mm, self.p_at_least_3)
        p6 = np.minimum(np.interp(x, self.knots_mm, self.p_at_least_6), p3)
        probabilities = np.stack([1.0 - p3, p3 - p6, p6]).astype(np.float32)
        return probabilities, np.interp(x, self.knots_mm, self.expected_mm).astype(np.float32)

    def to_json(self, **extra) -> str:
        """The JSON record (tables + ``extra`` fields such as the fit's scores)."""
        return json.dumps({**asdict(self), **extra}, indent=1)

    @classmethod
    def read(cls, path: str | Path, options: ReregistrationOptions | None = None) -> "ResidualCalibration":
        """The calibration of a JSON file; a clear error names a missing or malformed file. A file fitted for other
        estimator settings than ``options`` is refused with a warning: plain thresholds are used instead."""
        path = Path(path)
        try:
            record = json.loads(path.read_text())
            tables = [list(map(float, record[k])) for k in ("knots_mm", "p_at_least_3", "p_at_least_6", "expected_mm")]
            weights = record.get("class_weights")
            weights = None if weights is None else [float(w) for w in weights]
            out = cls(*tables, str(record.get("options_sha256", "")), weights)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{path}: calibration file not found (--calibration_file '' for thresholds)"
            ) from err
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a calibration file ({type(err).__name__}: {err})") from err
        lengths = {len(out.knots_mm), len(out.p_at_least_3), len(out.p_at_least_6), len(out.expected_mm)}
        if len(lengths) != 1 or len(out.knots_mm) < 2 or np.any(np.diff(out.knots_mm) < 0):
            raise ValueError(f"{path}: the calibration tables must have one increasing knot per value")
        if out.class_weights is not None and (
            len(out.class_weights) != len(CLASS_NAMES) or not all(np.isfinite(w) and w > 0 for w in out.class_weights)
        ):
            raise ValueError(
                f"{path}: class_weights must be {len(CLASS_NAMES)} positive numbers, got {out.class_weights}"
            )
        if options is not None and out.options_sha256 and out.options_sha256 != options_sha256(options):
            logger.warning("%s was fitted for other re-registration settings: ignored, |r| is thresholded", path)
            return cls.thresholds()
        return out


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
    true classes of the samples) also the mean-F1 class weights of its probabilities on them."""
    lo, hi = CLASS_THRESHOLDS_MM
    knots, p3 = _table(magnitude, (error >= lo).astype(float))
    p6 = np.interp(knots, *_table(magnitude, (error >= hi).astype(float)))
    expected = np.interp(knots, *_table(magnitude, error))
    out = ResidualCalibration(knots.tolist(), p3.tolist(), np.minimum(p6, p3).tolist(), expected.tolist(),
                              options_digest)  # fmt: skip
    if labels is not None:
        out.class_weights = fit_class_weights(labels, out.predict(magnitude)[0].T)[0]
    return out


def true_classes(error: np.ndarray) -> np.ndarray:
    """Correct (0), poor (1), wrong (2) of misalignments in mm."""
    return np.digitize(error, CLASS_THRESHOLDS_MM)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Top-label ECE: the |accuracy - confidence| of the predicted class, averaged over confidence bins by count."""
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
    """|r| and |e| (mm) at ``per_pair`` random voxels of a registered pair's ``region`` mask."""
    region_mask = sitk.GetArrayFromImage(sitk.ReadImage(record[region])) > 0  # a copy: a view would outlive its image
    idx = np.flatnonzero(region_mask)
    idx = rng.choice(idx, size=min(per_pair, idx.size), replace=False)
    out = []
    for key in ("residual_estimate", "residual_true"):
        field = sitk.GetArrayFromImage(sitk.ReadImage(record[key])).reshape(-1, 3)
        out.append(np.linalg.norm(field[idx], axis=1))
    return out[0], out[1]


def class_scores(labels: np.ndarray, predicted: np.ndarray) -> dict:
    """Mean F1 (macro over the three classes), accuracy and Cohen's kappa (scikit-learn)."""
    from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score

    return {
        "mean_f1": float(f1_score(labels, predicted, labels=[0, 1, 2], average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(labels, predicted)),
        "kappa": float(cohen_kappa_score(labels, predicted, labels=[0, 1, 2])),
    }


def probability_scores(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """``class_scores`` of the argmax of ``probabilities [N, 3]``, their log loss (clipped at 1e-6) and ECE."""
    from sklearn.metrics import log_loss

    scores = class_scores(labels, probabilities.argmax(axis=1))
    clipped = np.clip(probabilities, 1e-6, 1)
    scores["log_loss"] = float(log_loss(labels, clipped / clipped.sum(axis=1, keepdims=True), labels=[0, 1, 2]))
    scores["ece"] = expected_calibration_error(probabilities, labels)
    return scores


def _load(
    datalist: str | Path, split: str, per_pair: int, seed: int, options: ReregistrationOptions
) -> tuple[np.ndarray, ...]:
    """|r|, |e|, the scan name and the pair index of voxel samples of the ``split`` pairs, whose estimates must be of
    ``options``; ``datalist``: one path, or several separated by commas (their pairs are pooled)."""
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
        for key, path in (("residual_estimate", estimate), ("residual_true", record["residual_true"]),
                          ("lung_mask", record["lung_mask"])):  # fmt: skip
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
    (both on log1p|r|): mean F1 of the argmax, kappa, log loss, ECE and the MAE of the expected error."""
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


def compare_settings(
    datalist: str = "../data/registered/datalist.json",
    suffixes: str | tuple[str, ...] = ("residual_estimate",),
    per_pair: int = 20000,
    seed: int = 0,
    output: str = "",
) -> dict:
    """Estimator settings side by side on the TRAINING pairs that have every estimate in ``suffixes`` (written by
    ``registered_pairs estimate --suffix S ...``): |r| against the truth at lung voxels (MAE, Spearman, mean F1 and
    kappa of |r| thresholds and of leave-one-scan-out isotonic calibration) and the median seconds per pair."""
    from scipy.stats import spearmanr

    names = suffixes.split(",") if isinstance(suffixes, str) else list(suffixes)
    records = [r for r in json.loads(Path(datalist).read_text())["training"]
               if all(isinstance(r.get(s), dict) and Path(r[s]["path"]).is_file() for s in names)]  # fmt: skip
    if not records:
        raise ValueError(f"{datalist}: no training pair has all of the estimates {names}")
    out: dict = {"pairs": [r["record"] for r in records]}
    for name in names:
        rng = np.random.default_rng(seed)  # the same voxels for every setting
        samples = [sample_voxels({**r, "residual_estimate": r[name]["path"]}, per_pair, rng) for r in records]
        magnitude = np.concatenate([s[0] for s in samples])
        error = np.concatenate([s[1] for s in samples])
        scans = np.concatenate([[r["scan"]] * s[0].size for r, s in zip(records, samples)])
        labels = true_classes(error)
        calibrated = np.zeros(labels.size, dtype=int)
        for scan in np.unique(scans):
            test = scans == scan
            fitted = fit_isotonic(magnitude[~test], error[~test]) if (~test).any() else fit_isotonic(magnitude, error)
            calibrated[test] = fitted.predict(magnitude[test])[0].argmax(axis=0)
        out[name] = {
            "mae_mm": float(np.abs(magnitude - error).mean()),
            "spearman": float(spearmanr(magnitude, error).statistic),
            "thresholds": class_scores(labels, true_classes(magnitude)),
            "calibrated_leave_one_scan_out": class_scores(labels, calibrated),
            "median_seconds": float(np.median([r[name]["seconds"] for r in records])),
        }
    if output:
        atomic_write_text(Path(output), json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return out


def adapt_priors(
    probabilities: np.ndarray, fitted_priors: np.ndarray, iterations: int = 100, tolerance: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """Posteriors ``[N, 3]`` fitted under class priors ``fitted_priors`` moved to the class priors of these very
    voxels, estimated from them by EM (Saerens, Latinne and Decaestecker, Neural Computation 2002; a few lines, no
    library offers it). Returns the adapted posteriors and the estimated priors."""
    fitted_priors = np.asarray(fitted_priors, dtype=np.float64).clip(1e-9)
    priors = fitted_priors.copy()
    adapted = probabilities
    for _ in range(iterations):
        adapted = probabilities * (priors / fitted_priors)
        adapted = adapted / adapted.sum(axis=1, keepdims=True).clip(1e-12)
        estimate = adapted.mean(axis=0)
        converged = np.abs(estimate - priors).max() < tolerance
        priors = estimate
        if converged:
            break
    return adapted, priors


def compare_priors(
    datalist: str = "../data/registered/datalist.json", per_pair: int = 20000, seed: int = 0, output: str = ""
) -> dict:
    """Is a pair's class mix what the calibrated decision gets wrong? Leave-one-scan-out on the TRAINING pairs: on each
    held-out pair the calibrated argmax and mean-F1 decision, the argmax after EM prior adaptation to the pair
    (``adapt_priors``), and after its TRUE class mix (an oracle no user has), beside |r| thresholds; mean F1 and kappa
    over all held-out voxels pooled (as ``fit`` reports them), and per scan averaged over the scans."""
    options = ReregistrationOptions()
    magnitude, error, scans, pair_of = _load(datalist, "training", per_pair, seed, options)
    labels = true_classes(error)
    names = ("thresholds", "calibrated argmax", "calibrated, mean-F1 decision", "EM-adapted priors, argmax",
             "true class mix (oracle), argmax")  # fmt: skip
    per_scan: dict[str, list[dict]] = {n: [] for n in names}
    pooled: dict[str, np.ndarray] = {n: np.zeros(labels.size, dtype=int) for n in names}
    for scan in np.unique(scans):
        test = scans == scan
        fitted = fit_isotonic(magnitude[~test], error[~test], labels=labels[~test])
        fitted_priors = np.bincount(labels[~test], minlength=3) / (~test).sum()
        predicted: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for pair in np.unique(pair_of[test]):
            voxels = test & (pair_of == pair)
            p = fitted.predict(magnitude[voxels])[0].T
            true_mix = np.bincount(labels[voxels], minlength=3) / voxels.sum()
            oracle = p * (true_mix / fitted_priors)
            predicted["thresholds"].append(true_classes(magnitude[voxels]))
            predicted["calibrated argmax"].append(p.argmax(axis=1))
            predicted["calibrated, mean-F1 decision"].append(fitted.decide(p, axis=1))
            predicted["EM-adapted priors, argmax"].append(adapt_priors(p, fitted_priors)[0].argmax(axis=1))
            predicted["true class mix (oracle), argmax"].append(oracle.argmax(axis=1))
        for name in names:
            pooled[name][test] = np.concatenate(predicted[name])  # _load orders voxels by pair, as here
            per_scan[name].append(class_scores(labels[test], pooled[name][test]))
    out = {
        "datalist": str(datalist), "voxels_per_pair": per_pair, "pairs": int(np.unique(pair_of).size),
        "scans": sorted(set(scans.tolist())),
        **{n: {"pooled": {k: round(v, 4) for k, v in class_scores(labels, pooled[n]).items()},
               "mean_over_scans": {k: round(float(np.mean([s[k] for s in per_scan[n]])), 4) for k in per_scan[n][0]}}
           for n in names},
    }  # fmt: skip
    if output:
        atomic_write_text(Path(output), json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return out


def fit(
    datalist: str = "../data/registered/datalist.json",
    output: str = "models/reregistration_calibration.json",
    per_pair: int = 20000,
    seed: int = 0,
    **changes,
) -> dict:
    """Fit the isotonic tables on the training pairs of ``datalist`` (estimates of the default settings, or of
    ``changes`` to them), compare models leave-one-scan-out, write ``output`` (with the comparison); returns it."""
    options = ReregistrationOptions(**changes)
    magnitude, error, scans, _ = _load(datalist, "training", per_pair, seed, options)
    comparison = compare_models(magnitude, error, scans, seed)
    calibration = fit_isotonic(magnitude, error, options_sha256(options), labels=true_classes(error))
    counts = np.bincount(true_classes(error), minlength=3)
    extra = {
        "fitted_on": {"datalist": str(datalist), "scans": sorted(set(scans.tolist())), "voxels": int(error.size),
                      "class_counts": dict(zip(CLASS_NAMES, counts.tolist()))},  # fmt: skip
        "estimator_options": {k: v for k, v in asdict(options).items() if k != "threads"},
        "leave_one_scan_out": comparison,
    }
    atomic_write_text(Path(output), calibration.to_json(**extra))
    print(json.dumps(extra, indent=1))
    return extra


def report(
    datalist: str = "../data/registered/datalist.json",
    calibration_file: str = "models/reregistration_calibration.json",
    output_dir: str = "docs/reregistration",
    per_pair: int = 20000,
    seed: int = 1,
) -> dict:
    """Reliability diagram (PNG) and scores of the calibration on the VALIDATION pairs of ``datalist`` (one path, or
    several separated by commas)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    options = ReregistrationOptions()
    magnitude, error, _, _ = _load(datalist, "validation", per_pair, seed, options)
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
        out[name] = {**class_scores(labels, p.argmax(axis=1)), "ece": expected_calibration_error(p, labels),
                     "error_mae_mm": float(np.abs(ex - error).mean())}  # fmt: skip
    from scipy.stats import spearmanr

    out["calibrated"]["error_spearman"] = float(spearmanr(expected, error).statistic)
    out["calibrated, mean-F1 decision"] = {**class_scores(labels, calibration.decide(probs, axis=1)),
                                           "class_weights": calibration.class_weights}  # fmt: skip

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

    fire.Fire({"fit": fit, "report": report, "compare": compare_settings, "compare_priors": compare_priors})
