"""Fit the multiview combiner (``scripts.registration.combiner``) on registered artificial pairs, and measure it.

On lung voxels of the registered pairs (``scripts.registration.registered_pairs``, with their re-registration
estimates) the views (``scripts.registration.views``) are computed as inference computes them, sampled, and cached
beside each pair. ``fit`` trains LightGBM with a monotone constraint on |r| leave-one-training-scan-out, calibrates the
out-of-fold probabilities (isotonic), fits the mean-F1 class weights on them, refits on every training pair and writes
the combiner file; its scores (LOSO, against the calibrated |r| alone on the same voxels) and the validation scan's
scores (reported, never used to choose) go with it, pooled and per protocol kind of the pairs. ``--views`` picks the
views, ``--expected_target log_ratio_to_r`` fits the regressor as a correction of |r| (``combiner.EXPECTED_TARGETS``).
``ablation`` repeats the LOSO fit with each view removed::

    python -m scripts.registration.combiner_fit fit --datalist <work_dir>/registered/datalist.json \\
        --output models/multiview_combiner.json --report docs/multiview/fit.json
    python -m scripts.registration.combiner_fit ablation --datalist <work_dir>/registered/datalist.json \\
        --output docs/multiview/ablation.json
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import fire
import numpy as np
import SimpleITK as sitk

from scripts.data.image_io import load_pair
from scripts.registration.calibration import fit_isotonic, probability_scores, true_classes
from scripts.registration.calibration_tables import options_sha256
from scripts.registration.combiner import EXPECTED_TARGETS, MODELS, ViewCombiner, expected_error
from scripts.registration.reregistration import ReregistrationOptions
from scripts.registration.views import MONOTONE_FEATURES, VIEW_FEATURES, VIEWS, ViewOptions, compute_views
from scripts.utils.atomic_write import atomic_write_text
from scripts.utils.class_decision import fit_class_weights, weighted_argmax
from scripts.utils.constants import CLASS_THRESHOLDS_MM

logger = logging.getLogger(__name__)

ERROR_CAP_MM = 30.0  # the regressor's target is capped: a few folded voxels would otherwise dominate its L2 loss
TABLE_POINTS = 200


def lightgbm_parameters(
    objective: str,
    features: list[str],
    seed: int = 0,
    threads: int | None = None,
    monotone: tuple[str, ...] = MONOTONE_FEATURES,
) -> dict:
    """LightGBM settings of one model: monotone increasing in the ``monotone`` features, otherwise unconstrained.

    Args:
        objective: "binary" or "regression".
        features: feature names (their order sets the constraint vector).
        seed: random seed.
        threads: LightGBM threads.
        monotone: the features the output may only grow with.

    Returns:
        The parameter dict.
    """
    return {
        "objective": objective,
        "learning_rate": 0.1,
        "num_leaves": 15,
        "min_data_in_leaf": 200,
        "max_bin": 63,
        "bagging_fraction": 0.5,
        "bagging_freq": 1,
        "lambda_l2": 1.0,
        "monotone_constraints": [1 if name in monotone else 0 for name in features],
        "num_threads": threads or THREADS,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "verbose": -1,
    }


ROUNDS = 150
ON_REQUEST = ("ants", "matching")  # cached only when asked for, so adding them leaves the other caches valid
THREADS = 1  # one thread: OpenMP threads on 2 busy cores spent most of their time waiting for each other


def pair_samples(
    record: dict, options: ViewOptions, per_pair: int, seed: int, cache: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Features ``[n, len(options.features)]`` and true |e| (mm) at ``per_pair`` random lung voxels of one pair,
    computed as inference computes them (the pair on the fixed image's own grid, the default re-registration's r).
    Every view but those ``ON_REQUEST`` and not asked for is computed and cached
    (``<stem>_views_<digest>_<per_pair>_<seed>.npz``), whichever are asked for: views are independent, so any subset
    of them (a fit, an ablation) reads its columns from one cache.

    Args:
        record: registered-pair record (``fixed``, ``registered``, ``lung_mask``, ``residual_true``,
            ``residual_estimate``).
        options: view settings.
        per_pair: voxels drawn.
        seed: seed of the draw (with the pair's own seed).
        cache: read and write the cache file.

    Returns:
        Tuple ``(features, e)``.

    Raises:
        ValueError: when the pair's estimate was made with other re-registration settings than the defaults.
    """
    estimate = record["residual_estimate"]
    if estimate["options_sha256"] != options_sha256(ReregistrationOptions()):
        raise ValueError(f"{record['record']}: its re-registration estimate is not of the default settings")
    computed = replace(options, views=tuple(v for v in VIEWS if v not in ON_REQUEST or v in options.views))
    columns = [computed.features.index(name) for name in options.features]
    digest = computed.sha256()[:12]
    path = Path(record["registered"].replace("_registered.nii.gz", f"_views_{digest}_{per_pair}_{seed}.npz"))
    if cache and path.is_file():
        with np.load(path) as stored:
            return stored["features"][:, columns], stored["error"]
    pair = load_pair(record["fixed"], record["registered"], None, None, False)
    residual = np.moveaxis(sitk.GetArrayFromImage(sitk.ReadImage(estimate["path"])), -1, 0)
    features, _ = compute_views(pair.image, residual, pair.region, pair.grid.spacing, computed, name=record["record"])
    lung = sitk.GetArrayFromImage(sitk.ReadImage(record["lung_mask"])) > 0
    rng = np.random.default_rng([seed, int(record["seed"])])
    idx = np.flatnonzero(lung)
    idx = np.sort(rng.choice(idx, size=min(per_pair, idx.size), replace=False))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(record["residual_true"])).reshape(-1, 3)
    x = features.reshape(len(features), -1)[:, idx].T.astype(np.float32)
    e = np.linalg.norm(truth[idx], axis=1).astype(np.float32)
    if cache:  # written whole, then renamed: an interrupted run leaves no broken cache
        partial = path.with_name(f".{path.name}.partial")
        with open(partial, "wb") as handle:
            np.savez(handle, features=x, error=e)
        partial.replace(path)
    return x[:, columns], e


def collect(datalist: str, options: ViewOptions, per_pair: int = 10000, seed: int = 0) -> dict[str, dict]:
    """The samples of every pair of the datalist(s) (comma-separated), by split: ``x``, ``e``, ``scan``, ``pair``
    (index into ``records``) and ``records``."""
    out = {}
    for split in ("training", "validation"):
        records = [r for name in str(datalist).split(",") if name for r in json.loads(Path(name).read_text())[split]]
        xs, es, scans, pairs = [], [], [], []
        for k, record in enumerate(records):
            x, e = pair_samples(record, options, per_pair, seed)
            xs.append(x)
            es.append(e)
            scans += [record["scan"]] * len(e)
            pairs += [k] * len(e)
            logger.info("%s: %s (%d voxels)", split, record["record"], len(e))
        out[split] = {
            "x": np.concatenate(xs),
            "e": np.concatenate(es),
            "scan": np.array(scans),
            "pair": np.array(pairs),
            "records": records,
        }
    return out


def regression_target(x: np.ndarray, e: np.ndarray, features: list[str], expected_target: str) -> np.ndarray:
    """What the ``expected_mm`` regressor learns for ``expected_target`` (``EXPECTED_TARGETS``): e capped at
    ``ERROR_CAP_MM``, or log(1 + e) - log(1 + |r|) (``expected_error`` inverts both)."""
    if expected_target == "error_mm":
        return np.minimum(e, ERROR_CAP_MM)
    if expected_target == "log_ratio_to_r":
        return np.log1p(np.asarray(e, dtype=np.float64)) - x[:, features.index("log1p_r")]
    raise ValueError(f"unknown expected-error target {expected_target!r}; choose one of {EXPECTED_TARGETS}")


def train_models(
    x: np.ndarray,
    e: np.ndarray,
    features: list[str],
    seed: int = 0,
    regressor: bool = True,
    expected_target: str = "error_mm",
) -> dict:
    """The three LightGBM models (two binary classifiers at 3 and 6 mm, the expected-error regressor for
    ``expected_target``) as boosters. A correction of |r| is not constrained in |r| (it may shrink as |r| grows)."""
    import lightgbm

    lo, hi = CLASS_THRESHOLDS_MM
    targets = {"at_least_3": (e >= lo).astype(float), "at_least_6": (e >= hi).astype(float)}
    if regressor:
        targets["expected_mm"] = regression_target(x, e, features, expected_target)
    boosters = {}
    for name, y in targets.items():
        monotone = MONOTONE_FEATURES
        if name == "expected_mm" and expected_target != "error_mm":
            monotone = tuple(f for f in MONOTONE_FEATURES if f != "log1p_r")
        objective = "regression" if name == "expected_mm" else "binary"
        params = lightgbm_parameters(objective, features, seed, monotone=monotone)
        data = lightgbm.Dataset(x, y, feature_name=list(features), free_raw_data=True)
        boosters[name] = lightgbm.train(params, data, num_boost_round=ROUNDS)
    return boosters


def isotonic_table(raw: np.ndarray, y: np.ndarray) -> dict[str, list[float]]:
    """An increasing isotonic map from raw outputs to frequencies, sampled at quantile knots."""
    from sklearn.isotonic import IsotonicRegression

    model = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(raw, y)
    knots = np.unique(np.quantile(raw, np.linspace(0.0, 1.0, TABLE_POINTS)))
    return {"knots": knots.tolist(), "values": model.predict(knots).tolist()}


def calibrate(raw: dict[str, np.ndarray], e: np.ndarray) -> dict[str, dict]:
    """Isotonic tables of the two probabilities from raw (out-of-fold) outputs and true errors."""
    lo, hi = CLASS_THRESHOLDS_MM
    return {
        "at_least_3": isotonic_table(raw["at_least_3"], (e >= lo).astype(float)),
        "at_least_6": isotonic_table(raw["at_least_6"], (e >= hi).astype(float)),
    }


def _probabilities(raw: dict[str, np.ndarray], tables: dict) -> np.ndarray:
    p3 = np.interp(raw["at_least_3"], tables["at_least_3"]["knots"], tables["at_least_3"]["values"])
    p6 = np.minimum(np.interp(raw["at_least_6"], tables["at_least_6"]["knots"], tables["at_least_6"]["values"]), p3)
    return np.stack([1 - p3, p3 - p6, p6], axis=1)


def _weights(labels: np.ndarray, probabilities: np.ndarray, seed: int = 0, size: int = 100_000) -> list[float]:
    pick = np.random.default_rng(seed).choice(labels.size, size=min(size, labels.size), replace=False)
    return fit_class_weights(labels[pick], probabilities[pick])[0]


def scores(e: np.ndarray, probabilities: np.ndarray, weights, expected: np.ndarray | None = None) -> dict:
    """``decision_scores`` of the mean-F1 decision argmax(weights * p) (the plain argmax without weights)."""
    return decision_scores(e, probabilities, weighted_argmax(probabilities, weights, axis=1), expected)


def leave_one_scan_out(
    x: np.ndarray,
    e: np.ndarray,
    scan: np.ndarray,
    features: list[str],
    seed: int = 0,
    regressor: bool = True,
    expected_target: str = "error_mm",
) -> dict[str, np.ndarray]:
    """Out-of-fold raw outputs: each training scan predicted by models fitted on the others."""
    raw = {name: np.zeros(len(e)) for name in (MODELS if regressor else MODELS[:2])}
    for held in np.unique(scan):
        test = scan == held
        boosters = train_models(x[~test], e[~test], features, seed, regressor, expected_target)
        for name, booster in boosters.items():
            raw[name][test] = booster.predict(x[test], num_threads=THREADS)
        logger.info("leave-one-scan-out: %s done", held)
    return raw


def cross_decisions(raw: dict, e: np.ndarray, scan: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold probabilities and mean-F1 decisions where each held-out scan's calibration tables and class
    weights come from the OTHER scans' out-of-fold outputs (no voxel calibrates its own prediction)."""
    probabilities = np.zeros((len(e), 3))
    labels_all = true_classes(e)
    decided = np.zeros(len(e), dtype=int)
    for held in np.unique(scan):
        test = scan == held
        tables = calibrate({k: v[~test] for k, v in raw.items()}, e[~test])
        weights = _weights(labels_all[~test], _probabilities({k: v[~test] for k, v in raw.items()}, tables), seed)
        probabilities[test] = _probabilities({k: v[test] for k, v in raw.items()}, tables)
        decided[test] = weighted_argmax(probabilities[test], weights, axis=1)
    return probabilities, decided


def decision_scores(e: np.ndarray, probabilities: np.ndarray, decided: np.ndarray, expected=None) -> dict:
    """Mean F1, kappa, accuracy and confusions of the decisions ``decided``, log loss and ECE of the probabilities,
    and the MAE and Spearman correlation of the ``expected`` error (mm) when given."""
    from scipy.stats import spearmanr

    from scripts.registration.calibration import class_scores

    labels = true_classes(e)
    out = probability_scores(labels, probabilities)
    out.update({f"decision_{k}": v for k, v in class_scores(labels, decided).items()})
    confusion = np.bincount(labels * 3 + decided, minlength=9).reshape(3, 3)
    out["confusion"] = confusion.tolist()
    out["correct_wrong_confusions_percent"] = float(100 * (confusion[0, 2] + confusion[2, 0]) / max(labels.size, 1))
    if expected is not None:
        out["error_mae_mm"] = float(np.mean(np.abs(expected - e)))
        out["error_spearman"] = float(spearmanr(expected, e)[0])
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def residual_only_scores(train: dict, validation: dict, seed: int = 0) -> dict:
    """The shipped single-view estimator on the same voxels: isotonic |r| tables and class weights fitted on the
    other scans (LOSO) or on every training voxel (validation); with the decisions per protocol kind."""
    r_train, r_val = np.expm1(train["x"][:, 0]), np.expm1(validation["x"][:, 0])
    labels = true_classes(train["e"])
    probabilities, expected, decided = np.zeros((len(r_train), 3)), np.zeros(len(r_train)), np.zeros(len(r_train), int)
    for held in np.unique(train["scan"]):
        test = train["scan"] == held
        tables = fit_isotonic(r_train[~test], train["e"][~test], labels=labels[~test])
        p, expected[test] = tables.predict(r_train[test])
        probabilities[test] = p.T
        decided[test] = tables.decide(p, axis=0)
    tables = fit_isotonic(r_train, train["e"], labels=labels)
    p, expected_val = tables.predict(r_val)
    return {
        "leave_one_scan_out": decision_scores(train["e"], probabilities, decided, expected),
        "validation": scores(validation["e"], p.T, tables.class_weights, expected_val),
        "per_protocol_loso": per_protocol(train, decided, expected),
        "per_protocol_validation": per_protocol(
            validation, weighted_argmax(p.T, tables.class_weights, axis=1), expected_val
        ),
    }


def fit(
    datalist: str,
    output: str = "models/multiview_combiner.json",
    report: str = "",
    per_pair: int = 10000,
    seed: int = 0,
    views: str | tuple[str, ...] = ViewOptions.views,
    expected_target: str = "error_mm",
    score_on: str = "",
) -> dict:
    """Fit the combiner (see the module) and write it with its scores.

    Args:
        datalist: registered-pairs datalist(s), comma-separated.
        output: combiner JSON to write.
        report: scores JSON to write beside ("" writes none).
        per_pair: lung voxels sampled per pair.
        seed: seed of the sampling and the trees.
        views: the views used (comma-separated or a tuple).
        expected_target: what the expected-error regressor predicts (``EXPECTED_TARGETS``).
        score_on: optional datalist(s), comma-separated: the LOSO scores are also reported on its training pairs
            alone (``leave_one_scan_out_on``), so that fits on more pairs compare on the voxels of a fit on fewer.

    Returns:
        The scores.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(message)s")
    start = time.perf_counter()
    options = ViewOptions(views=tuple(views.split(",")) if isinstance(views, str) else tuple(views))
    data = collect(datalist, options, per_pair, seed)
    train, validation = data["training"], data["validation"]
    features = list(options.features)
    raw = leave_one_scan_out(train["x"], train["e"], train["scan"], features, seed, expected_target=expected_target)
    probabilities_oof, decided_oof = cross_decisions(raw, train["e"], train["scan"], seed)
    expected_oof = expected_error(raw["expected_mm"], train["x"][:, features.index("log1p_r")], expected_target)
    tables = calibrate(raw, train["e"])
    labels = true_classes(train["e"])
    weights = _weights(labels, _probabilities(raw, tables), seed)
    boosters = train_models(train["x"], train["e"], features, seed, expected_target=expected_target)
    combiner = ViewCombiner(
        features=features,
        models={name: booster.model_to_string() for name, booster in boosters.items()},
        calibration=tables,
        view_options=json.loads(json.dumps(asdict(options), default=list)),
        views_sha256=options.sha256(),
        reregistration_sha256=options_sha256(ReregistrationOptions()),
        class_weights=weights,
        expected_target=expected_target,
    )
    p_val, expected_val = combiner.predict(validation["x"])
    results = {
        "views": list(options.views),
        "features": features,
        "expected_target": expected_target,
        "pairs": {"training": len(train["records"]), "validation": len(validation["records"])},
        "voxels": {"training": int(len(train["e"])), "validation": int(len(validation["e"]))},
        "class_counts": {
            "training": np.bincount(labels, minlength=3).tolist(),
            "validation": np.bincount(true_classes(validation["e"]), minlength=3).tolist(),
        },
        "multiview": {
            "leave_one_scan_out": decision_scores(train["e"], probabilities_oof, decided_oof, expected_oof),
            "validation": scores(validation["e"], p_val, weights, expected_val),
            "per_protocol_loso": per_protocol(train, decided_oof, expected_oof),
            "per_protocol_validation": per_protocol(validation, weighted_argmax(p_val, weights, axis=1), expected_val),
        },
        "reregistration": residual_only_scores(train, validation, seed),
        "importance_gain": {
            name: dict(
                zip(features, np.round(b.feature_importance("gain") / b.feature_importance("gain").sum(), 4).tolist())
            )
            for name, b in boosters.items()
        },
        "reliability_loso": reliability(probabilities_oof, labels),
        "class_weights": weights,
    }
    if score_on:
        results["multiview"]["leave_one_scan_out_on"] = subset_scores(
            train, score_on, probabilities_oof, decided_oof, expected_oof
        )
    combiner.scores = {k: results[k] for k in ("pairs", "voxels", "class_counts", "multiview")}
    results["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_text(Path(output), combiner.to_json())
    if report:
        atomic_write_text(Path(report), json.dumps(results, indent=1))
        reliability_figure(results["reliability_loso"], Path(report).with_name("reliability.png"))
    print(json.dumps({k: v for k, v in results.items() if k not in ("importance_gain", "reliability_loso")}, indent=1))
    return results


def subset_scores(
    split: dict, datalist: str, probabilities: np.ndarray, decided: np.ndarray, expected: np.ndarray
) -> dict:
    """``decision_scores`` on the voxels of ``split``'s pairs that ``datalist`` (comma-separated) lists as training
    pairs (matched by record path).

    Raises:
        ValueError: when ``datalist`` lists a training pair that ``split`` lacks.
    """
    listed = {
        r["record"] for name in datalist.split(",") if name for r in json.loads(Path(name).read_text())["training"]
    }
    pairs = [k for k, record in enumerate(split["records"]) if record["record"] in listed]
    if len(pairs) != len(listed):
        raise ValueError(f"{datalist}: {len(listed) - len(pairs)} of its training pairs are not among the fitted pairs")
    sel = np.isin(split["pair"], pairs)
    return {
        "datalist": datalist,
        "pairs": len(pairs),
        **decision_scores(split["e"][sel], probabilities[sel], decided[sel], expected[sel]),
    }


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict:
    """Top-label reliability: per confidence bin the count, mean confidence and accuracy."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    index = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    rows = []
    for b in range(bins):
        sel = index == b
        if sel.any():
            rows.append(
                [b, int(sel.sum()), round(float(confidence[sel].mean()), 4), round(float(correct[sel].mean()), 4)]
            )
    return {"columns": ["bin", "voxels", "confidence", "accuracy"], "rows": rows}


def reliability_figure(table: dict, path: Path) -> Path:
    """The reliability diagram of ``reliability``'s table (accuracy against confidence, bar width ~ voxels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = np.array(table["rows"], dtype=float)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    ax.plot(rows[:, 2], rows[:, 3], marker="o", label="multiview, leave-one-scan-out")
    share = rows[:, 1] / rows[:, 1].sum()
    ax.bar((rows[:, 0] + 0.5) / 10, share, width=0.09, alpha=0.3, color="tab:orange", label="share of voxels")
    ax.set_xlabel("confidence of the predicted class")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial.png")
    fig.savefig(temporary)
    plt.close(fig)
    temporary.replace(path)
    return path


def per_protocol(split: dict, decided: np.ndarray, expected: np.ndarray | None = None) -> dict:
    """Class counts and scores of the decisions ``decided`` (and the MAE of the ``expected`` error) per user-side
    protocol kind and input variant of the pairs: large errors (none, translation, rigid) and good B-splines are the
    two regimes a pooled score mixes."""
    from scripts.registration.calibration import class_scores

    labels = true_classes(split["e"])
    groups: dict[str, list[int]] = {}
    for k, record in enumerate(split["records"]):
        protocol = record["protocol"]
        groups.setdefault(f"{protocol['kind']}/{protocol.get('input', 'whole')}", []).append(k)
    out = {}
    for group, pairs in sorted(groups.items()):
        sel = np.isin(split["pair"], pairs)
        decided_scores = class_scores(labels[sel], decided[sel])
        out[group] = {
            "pairs": len(pairs),
            "voxels": int(sel.sum()),
            "class_counts": np.bincount(labels[sel], minlength=3).tolist(),
            "decision_mean_f1": round(decided_scores["mean_f1"], 4),
            "decision_kappa": round(decided_scores["kappa"], 4),
        }
        if expected is not None:
            out[group]["error_mae_mm"] = round(float(np.mean(np.abs(expected[sel] - split["e"][sel]))), 4)
    return out


def ablation(
    datalist: str,
    output: str = "",
    per_pair: int = 10000,
    seed: int = 0,
    views: str | tuple[str, ...] = ViewOptions.views,
) -> dict:
    """LOSO scores (probabilities only: the two classifiers) with all views and with each view but ``residual``
    removed.

    Args:
        datalist: registered-pairs datalist(s), comma-separated.
        output: JSON to write ("" writes none).
        per_pair: lung voxels sampled per pair.
        seed: seed of the sampling and the trees.
        views: the full set of views.

    Returns:
        Dict: view removed ("none" for all) -> LOSO scores.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(message)s")
    options = ViewOptions(views=tuple(views.split(",")) if isinstance(views, str) else tuple(views))
    train = collect(datalist, options, per_pair, seed)["training"]
    features = list(options.features)
    results = {}
    for removed in ("none",) + tuple(v for v in options.views if v != "residual"):
        keep = [i for i, name in enumerate(features) if name not in VIEW_FEATURES.get(removed, ())]
        names = [features[i] for i in keep]
        raw = leave_one_scan_out(train["x"][:, keep], train["e"], train["scan"], names, seed, regressor=False)
        probabilities, decided = cross_decisions(raw, train["e"], train["scan"], seed)
        results[removed] = decision_scores(train["e"], probabilities, decided)
        results[removed]["per_protocol"] = per_protocol(train, decided)
        logger.info("without %s: %s", removed, results[removed]["decision_mean_f1"])
    if output:
        atomic_write_text(Path(output), json.dumps(results, indent=1))
    print(json.dumps({k: {m: v[m] for m in ("decision_mean_f1", "decision_kappa", "ece")} for k, v in results.items()}))
    return results


if __name__ == "__main__":
    fire.Fire({"fit": fit, "ablation": ablation})
