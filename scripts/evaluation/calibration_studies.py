"""Studies of the re-registration's calibration on registered training pairs, kept to reproduce the figures of
docs/reregistration.md: estimator settings side by side (``compare_settings``) and whether adapting the decision to
each pair's class mix would help (``compare_priors``). Nothing here is used at inference.

    python -m scripts.evaluation.calibration_studies compare_settings --datalist <work_dir>/registered/datalist.json \
        --suffixes residual_estimate,residual_estimate_other --output docs/reregistration/settings_comparison.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from scripts.registration.calibration import class_scores, fit_isotonic, load_samples, sample_voxels, true_classes
from scripts.registration.reregistration import ReregistrationOptions
from scripts.utils.atomic_write import atomic_write_text


def compare_settings(
    datalist: str,
    suffixes: str | tuple[str, ...] = ("residual_estimate",),
    per_pair: int = 20000,
    seed: int = 0,
    output: str = "",
) -> dict:
    """Estimator settings side by side on the TRAINING pairs that have every estimate in ``suffixes`` (written by
    ``registered_pairs estimate --suffix S ...``): |r| against the truth at lung voxels (MAE, Spearman, mean F1 and
    kappa of |r| thresholds and of leave-one-scan-out isotonic calibration) and the median seconds per pair.

    Args:
        datalist: registered-pairs datalist (JSON, one path).
        suffixes: record keys of the estimates to compare, a comma-separated string or a tuple.
        per_pair: lung voxels drawn per pair (the same voxels for every setting).
        seed: seed of the voxel choice.
        output: JSON file to write; "" writes nothing.

    Returns:
        Dict with ``pairs`` and per suffix ``mae_mm``, ``spearman``, ``thresholds``, ``calibrated_leave_one_scan_out``
        and ``median_seconds``.

    Raises:
        ValueError: when no training pair has every estimate.
    """
    from scipy.stats import spearmanr

    names = suffixes.split(",") if isinstance(suffixes, str) else list(suffixes)
    records = [
        r
        for r in json.loads(Path(datalist).read_text())["training"]
        if all(isinstance(r.get(s), dict) and Path(r[s]["path"]).is_file() for s in names)
    ]
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
    library offers it). Returns the adapted posteriors and the estimated priors.

    Args:
        probabilities: ``[N, 3]`` posteriors.
        fitted_priors: ``[3]`` class priors the posteriors were fitted under.
        iterations: maximum number of EM iterations.
        tolerance: stop when no estimated prior changes by more than this.

    Returns:
        Tuple ``(adapted, priors)``: ``[N, 3]`` adapted posteriors and ``[3]`` estimated priors.
    """
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


def compare_priors(datalist: str, per_pair: int = 20000, seed: int = 0, output: str = "") -> dict:
    """Is a pair's class mix what the calibrated decision gets wrong? Leave-one-scan-out on the TRAINING pairs: on each
    held-out pair the calibrated argmax and mean-F1 decision, the argmax after EM prior adaptation to the pair
    (``adapt_priors``), and after its TRUE class mix (an oracle no user has), beside |r| thresholds; mean F1 and kappa
    over all held-out voxels pooled (as ``fit`` reports them), and per scan averaged over the scans.

    Args:
        datalist: registered-pairs datalist (JSON), or several separated by commas.
        per_pair: lung voxels drawn per training pair.
        seed: seed of the voxel choice.
        output: JSON file to write; "" writes nothing.

    Returns:
        Dict with the datalist, voxels per pair, pair count, scans and per decision the ``pooled`` and
        ``mean_over_scans`` class scores.
    """
    options = ReregistrationOptions()
    magnitude, error, scans, pair_of = load_samples(datalist, "training", per_pair, seed, options)
    labels = true_classes(error)
    names = (
        "thresholds",
        "calibrated argmax",
        "calibrated, mean-F1 decision",
        "EM-adapted priors, argmax",
        "true class mix (oracle), argmax",
    )
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
        "datalist": str(datalist),
        "voxels_per_pair": per_pair,
        "pairs": int(np.unique(pair_of).size),
        "scans": sorted(set(scans.tolist())),
        **{
            n: {
                "pooled": {k: round(v, 4) for k, v in class_scores(labels, pooled[n]).items()},
                "mean_over_scans": {k: round(float(np.mean([s[k] for s in per_scan[n]])), 4) for k in per_scan[n][0]},
            }
            for n in names
        },
    }
    if output:
        atomic_write_text(Path(output), json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    import fire

    fire.Fire({"compare_settings": compare_settings, "compare_priors": compare_priors})
