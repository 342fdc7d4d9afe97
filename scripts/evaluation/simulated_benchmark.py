"""One-command simulated benchmark on open CT: a known deformation, elastix, landmarks, predictors, report.

From a real scan NOT used for training (the validation scan thorax_ricord1a_419639 of the dataset), make a second
time point with scripts.transforms.evaluation_deformation, pick about 300 distinctive lung landmarks in the fixed scan
(scripts.data.landmark_selection), register with the protocol's settings (scripts.registration.elastix, on a 2 mm
working grid by default), get each landmark's true residual error TRE_i = || x_M^i - T(x_F^i) || from the known
partner x_M and the registration's T, run every method of the comparison through the inference contract, score
them with scripts.evaluation.landmark_metrics and write the report (scripts.evaluation.report).

Images derived from the scan stay in ``work_dir`` (outside the repository: the validation scan is CC BY-NC and must
never be copied into it); only the report goes to ``output_dir``.

The methods (``scripts.evaluation.benchmark_methods``: the re-registration with its decisions, the paper's LSTM with
and without class weights, the residual-informed LSTM, RegNet-t, the local NCC surrogate, the majority class) are
scored the same way (scripts.evaluation.landmark_metrics); a method whose weights or thresholds do not exist is
listed as "not run". This module is the runner: the pair, the registrations and each method's predictions are
cached in ``work_dir`` and used again while their inputs are the same.

How to run (from the repository root, 40 min on 2 CPU cores when nothing can be reused)::

    python -m monai.bundle run --config_file configs/evaluate.json --dataset_dir <dataset_dir>
    # or, with any option of run_benchmark:
    python -m scripts.evaluation.simulated_benchmark --scan <dataset_dir>/thorax_ricord1a_419639.nii.gz \
        --output_dir docs/benchmark --work_dir /tmp/misalignment_benchmark

Overrides for the config: ``--output_dir``, ``--work_dir``, ``--scan``, ``--seed``, ``--landmarks``, ``--setting``
(e.g. ``affine,bspline500``), ``--threads``, ``--reuse`` (false: make the pair, register and predict again),
``--only "['name', ...]"`` (run only these methods) with ``--carry_from docs/benchmark/report.json`` (take the other
rows from an earlier report of the same landmarks, marked "(carried)"). The NCC thresholds are fitted once, before
the benchmark, with ``python -m scripts.evaluation.ncc_baseline fit`` (generated training pairs only).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from scripts.data.landmark_csv import read_landmarks, table_from_points, write_landmarks
from scripts.data.landmark_selection import select_landmarks
from scripts.evaluation.benchmark_methods import (
    BUNDLE_ROOT,
    DEFAULT_METHODS,
    MethodSpec,
    PredictorRun,
    run_baseline,
    run_bundle_predictor,
    run_derived,
    run_majority,
    stem_of,
)
from scripts.evaluation.landmark_metrics import evaluate, load_predictions, true_classes
from scripts.evaluation.report import plot_landmark_slices, write_report
from scripts.registration.elastix import RegistrationOptions, parse_settings, read_image, register_pair
from scripts.transforms.ct_masks import ct_masks
from scripts.transforms.evaluation_deformation import EvaluationDeformationSettings, deform_scan, draw_deformation
from scripts.utils.atomic_write import atomic_write_image, atomic_write_text
from scripts.utils.file_digest import file_sha256

VALIDATION_SCAN = "thorax_ricord1a_419639.nii.gz"  # the one scan never used for training or tuning
TRAINING_SCANS = (
    "thorax_lidc_idri_0001",
    "thorax_lidc_idri_0002",
    "thorax_lidc_idri_0003",
    "thorax_popi_like_00",
    "thorax_lungpetctdx_A0001",
    "thorax_lungpetctdx_A0002",
)
PAIR_MODULES = (
    "transforms/evaluation_deformation.py",
    "data/landmark_selection.py",
    "transforms/ct_masks.py",
)  # a change there makes a new pair
SCORING_MODULES = (
    "evaluation/simulated_benchmark.py",
    "evaluation/report.py",
    "evaluation/landmark_metrics.py",
)  # they do not change predictions
NOT_SELECTED = "not selected for this run (only=)"
LANDMARK_MASK_RADIUS_MM = 4.0  # > the 1 mm voxel + the fixed grid's rounding: each landmark's voxel is predicted


def _check_scan(scan: Path, allow_training_scan: bool) -> None:
    stem = stem_of(scan)
    if stem in TRAINING_SCANS and not allow_training_scan:
        raise ValueError(f"{scan}: {stem} is a training scan; the benchmark must run on a scan not used for training")


def _check_work_dir(work_dir: Path) -> None:
    resolved = work_dir.resolve()
    if resolved == BUNDLE_ROOT or BUNDLE_ROOT in resolved.parents:
        raise ValueError(
            f"{work_dir}: the work folder holds images derived from the scan and must lie outside the repository "
            f"({BUNDLE_ROOT})"
        )


def make_pair(scan: Path, work_dir: Path, seed: int, landmarks: int, min_spacing_mm: float) -> dict:
    """Second time point, masks, landmarks and their true partners; returns paths, parameters and seconds.

    Args:
        scan: CT file of the fixed time point.
        work_dir: folder of the written moving image and landmark CSVs.
        seed: seed of the deformation and of the intensity changes.
        landmarks: number of landmarks to select in the lungs.
        min_spacing_mm: minimum distance between landmarks, mm.

    Returns:
        Dict with ``fixed``, ``moving``, ``fixed_landmarks``, ``moving_landmarks`` paths, ``deformation`` parameters,
        ``landmarks`` (count, partners outside the image dropped), ``landmark_displacement_mm`` (mean, max) and
        ``seconds``.
    """
    start = time.perf_counter()
    fixed = read_image(scan, "scan")
    body, lung = ct_masks(fixed, str(scan))
    deformation = draw_deformation(fixed, body, lung, seed, EvaluationDeformationSettings())
    moving = deform_scan(fixed, body, lung, deformation, seed)
    stem = stem_of(scan)
    moving_path = atomic_write_image(moving, work_dir / f"{stem}_moving.nii.gz")
    points = select_landmarks(fixed, lung, count=landmarks, min_spacing_mm=min_spacing_mm)
    partners = deformation.partners(points)
    inside = np.array([_inside(fixed, p) for p in partners])
    points, partners = points[inside], partners[inside]
    fixed_csv = write_landmarks(table_from_points(points), work_dir / f"{stem}_fixed_landmarks.csv")
    moving_csv = write_landmarks(table_from_points(partners), work_dir / f"{stem}_moving_landmarks.csv")
    displacement = np.linalg.norm(partners - points, axis=1)
    return {
        "fixed": scan,
        "moving": moving_path,
        "fixed_landmarks": fixed_csv,
        "moving_landmarks": moving_csv,
        "deformation": deformation.parameters,
        "landmarks": int(len(points)),
        "landmark_displacement_mm": {"mean": float(displacement.mean()), "max": float(displacement.max())},
        "seconds": time.perf_counter() - start,
    }


CROPS = ("", "one_lung")


def crop_pair(pair: dict, work_dir: Path, crop: str) -> dict:
    """The simulated pair cut as users crop scans for registration: ``"one_lung"`` keeps one lung of the fixed scan
    (x from 15 voxels inside the lungs' box to its middle, y 20/10 voxels inside it, every slice), cut through the lung
    on three sides; the moving image on the same box, the landmarks whose fixed point and true partner lie inside.
    Returns the pair's record with the cropped files.

    Args:
        pair: record of ``make_pair``.
        work_dir: folder of the cropped images and landmark CSVs.
        crop: "" (the pair unchanged) or "one_lung".

    Returns:
        The record with cropped ``fixed``, ``moving``, landmark files, ``landmarks`` count and ``crop`` (name, size).

    Raises:
        ValueError: when ``crop`` is not one of ``CROPS``.
    """
    if crop not in CROPS:
        raise ValueError(f"unknown crop {crop!r}; choose one of {CROPS}")
    if not crop:
        return pair
    fixed = read_image(pair["fixed"], "scan")
    _, lung = ct_masks(fixed, str(pair["fixed"]))
    found = np.argwhere(sitk.GetArrayViewFromImage(lung) > 0)  # (z, y, x)
    (y0, x0), (y1, x1) = found[:, 1:].min(axis=0), found[:, 1:].max(axis=0) + 1
    box = (slice(int(x0) + 15, (int(x0) + int(x1)) // 2), slice(int(y0) + 20, int(y1) - 10), slice(None))
    stem = f"{stem_of(Path(pair['fixed']))}_{crop}"
    images = {}
    for role in ("fixed", "moving"):
        image = fixed if role == "fixed" else read_image(pair["moving"], "moving")
        images[role] = image[box]
        atomic_write_image(images[role], work_dir / f"{stem}_{role}.nii.gz")
    points = read_landmarks(pair["fixed_landmarks"]).points()
    partners = read_landmarks(pair["moving_landmarks"]).points()
    inside = np.array([_inside(images["fixed"], p) and _inside(images["moving"], q) for p, q in zip(points, partners)])
    fixed_csv = write_landmarks(table_from_points(points[inside]), work_dir / f"{stem}_fixed_landmarks.csv")
    moving_csv = write_landmarks(table_from_points(partners[inside]), work_dir / f"{stem}_moving_landmarks.csv")
    return {
        **pair,
        "fixed": str(work_dir / f"{stem}_fixed.nii.gz"),
        "moving": str(work_dir / f"{stem}_moving.nii.gz"),
        "fixed_landmarks": fixed_csv,
        "moving_landmarks": moving_csv,
        "landmarks": int(inside.sum()),
        "crop": {"name": crop, "size": list(images["fixed"].GetSize())},
    }


def _reusable(record: Path, inputs: dict) -> dict | None:
    """What ``record`` (a JSON file of an earlier run) holds under "outputs" when it was written for the same
    ``inputs`` and every file it names still exists; else None (the stage runs again)."""
    if not record.is_file():
        return None
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if saved.get("inputs") != inputs:
        return None
    outputs = saved.get("outputs", {})
    files = [v for v in _strings(outputs) if v.endswith((".nii.gz", ".csv", ".json"))]
    return outputs if all(Path(f).is_file() for f in files) else None


def _strings(value) -> list[str]:
    """Every string inside a JSON-like value (the file names of a record)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _record(record: Path, inputs: dict, outputs: dict) -> None:
    atomic_write_text(record, json.dumps({"inputs": inputs, "outputs": outputs}, indent=1, default=str))


def _inside(image: sitk.Image, point: np.ndarray) -> bool:
    index = image.TransformPhysicalPointToContinuousIndex([float(v) for v in point])
    return all(0 <= i <= s - 1 for i, s in zip(index, image.GetSize()))


def _ground_truth(registration: dict) -> dict:
    out = {}
    for setting, entry in registration["settings"].items():
        tre = read_landmarks(entry["points"]).float_columns(["tre"])[:, 0]
        counts = np.bincount(true_classes(tre), minlength=3)
        out[setting] = {
            "counts": counts.tolist(),
            "mean": float(tre.mean()),
            "median": float(np.median(tre)),
            "max": float(tre.max()),
        }
    return out


def landmark_mask(fixed: Path, landmarks: Path, path: Path, radius_mm: float = LANDMARK_MASK_RADIUS_MM) -> Path:
    """A mask on the fixed image's grid of the balls of ``radius_mm`` around the landmarks: the predictors only need
    these voxels, and the tiled inferer gives them the same values as a whole-image run (only fewer tiles).

    Args:
        fixed: fixed image file.
        landmarks: landmark CSV of fixed-image points (LPS mm).
        path: mask file to write.
        radius_mm: ball radius, mm.

    Returns:
        The written path (uint8 mask, 1 inside the balls).
    """
    image = read_image(fixed, "fixed image")
    spacing = np.array(image.GetSpacing())
    mask = np.zeros(image.GetSize()[::-1], dtype=np.uint8)
    reach = np.ceil(radius_mm / spacing).astype(int) + 1  # voxels per axis (x, y, z)
    offsets = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), -1).reshape(-1, 3)
    for point in read_landmarks(landmarks).points():
        continuous = np.array(image.TransformPhysicalPointToContinuousIndex([float(v) for v in point]))
        voxels = np.round(continuous).astype(int) + offsets
        voxels = voxels[np.linalg.norm((voxels - continuous) * spacing, axis=1) <= radius_mm]
        voxels = voxels[np.all((voxels >= 0) & (voxels < np.array(image.GetSize())), axis=1)]
        mask[voxels[:, 2], voxels[:, 1], voxels[:, 0]] = 1
    out = sitk.GetImageFromArray(mask)
    out.CopyInformation(image)
    return atomic_write_image(out, path)


def prediction_code_sha256() -> str:
    """One digest of the code a prediction depends on: every module in scripts/ except the scoring and report ones,
    and the inference config. Conservative: any edit there makes every method predict again."""
    digest = hashlib.sha256()
    scripts = BUNDLE_ROOT / "scripts"
    modules = sorted(p for p in scripts.rglob("*.py") if p.relative_to(scripts).as_posix() not in SCORING_MODULES)
    for path in [*modules, BUNDLE_ROOT / "configs" / "inference.json"]:
        digest.update(path.relative_to(BUNDLE_ROOT).as_posix().encode() + b"\0" + file_sha256(path).encode())
    return digest.hexdigest()


def _file_hashes(spec: MethodSpec) -> dict[str, str]:
    """sha256 of the method's weights and other files that exist (bundle-relative names)."""
    files = [f for f in (spec.weights, *spec.files) if f and (BUNDLE_ROOT / f).is_file()]
    return {f: file_sha256(BUNDLE_ROOT / f) for f in files}


def _method_inputs(spec: MethodSpec, stage_inputs: dict, code_sha256: str, hashes: dict[str, str]) -> dict:
    """What a method's predictions depend on: the registered pairs, the method, the content of its weights or
    thresholds (``hashes``), the prediction code and the landmark mask radius."""
    runner = spec.runner
    return {
        "registration": stage_inputs,
        "method": {
            "name": spec.name,
            "kind": spec.kind,
            "overrides": list(spec.overrides),
            "runner": f"{runner.__module__}.{runner.__qualname__}" if runner else None,
        },
        "files_sha256": hashes,
        "code_sha256": code_sha256,
        "mask_radius_mm": LANDMARK_MASK_RADIUS_MM,
    }


def run_methods(
    registration: dict,
    fixed: Path,
    work_dir: Path,
    methods: tuple[MethodSpec, ...],
    mask: Path | None = None,
    stage_inputs: dict | None = None,
) -> dict:
    """Run every method on every registered pair (the bundle predictors inside ``mask`` if given); score those that
    ran (per setting and total). With ``stage_inputs`` (the registration stage's inputs) each method's predictions
    are recorded in its folder and used again, marked "reused", while those inputs, its files and the code match.

    Args:
        registration: log of ``scripts.registration.elastix.register_pair`` (per setting ``image`` and ``points``).
        fixed: fixed image file.
        work_dir: work folder; predictions go to ``work_dir/predictions/<method>``.
        methods: the methods to run, in order (a "derived" method follows its source).
        mask: optional landmark mask given to the bundle predictors that use one.
        stage_inputs: the registration stage's inputs; None disables recording and reuse of predictions.

    Returns:
        Dict method name -> entry with ``kind``, ``status`` ("ran", "not run" or "failed"), ``seconds`` per setting
        and, when it ran, ``scores``, ``csv`` and the files' hashes (plus ``error_mm`` for error estimators).
    """
    out = {}
    code_sha256 = prediction_code_sha256() if stage_inputs is not None else ""
    for spec in methods:
        entry: dict = {"kind": spec.kind}
        if spec.kind == "pending":
            out[spec.name] = {**entry, "status": "not run", "reason": spec.reason}
            continue
        folder = work_dir / "predictions" / "".join(ch if ch.isalnum() else "_" for ch in spec.name)
        record = folder / "predictions.json"
        hashes = _file_hashes(spec)
        inputs = _method_inputs(spec, stage_inputs, code_sha256, hashes) if stage_inputs is not None else None
        earlier = _reusable(record, inputs) if inputs is not None else None
        if earlier:
            runs = {s: PredictorRun("ran", Path(r["csv"]), r["seconds"]) for s, r in earlier.items()}
            entry["reused"] = True
        elif spec.kind == "derived":
            runs = run_derived(spec, out.get(spec.source, {}), folder)
        else:
            runs = run_baseline(spec, fixed, registration, folder) if spec.kind == "baseline" else {}
        pending = spec.kind in ("bundle", "majority") and not earlier
        for setting, reg in registration["settings"].items() if pending else ():
            moving, points = Path(reg["image"]), Path(reg["points"])
            if spec.kind == "majority":
                runs[setting] = run_majority(points, moving, folder)
            else:
                runs[setting] = run_bundle_predictor(
                    fixed,
                    moving,
                    points,
                    folder,
                    weights=spec.weights,
                    overrides=spec.overrides,
                    mask=mask if spec.landmark_mask else None,
                )
            if runs[setting].status != "ran":
                break  # the same reason would repeat for every setting
        failed = [r for r in runs.values() if r.status != "ran"]
        entry["seconds"] = {s: r.seconds for s, r in runs.items()}
        if failed:
            out[spec.name] = {**entry, "status": failed[0].status, "reason": failed[0].reason}
            continue
        if inputs is not None and not earlier:
            _record(record, inputs, {s: {"csv": str(r.csv), "seconds": r.seconds} for s, r in runs.items()})
        if spec.weights in hashes:
            entry["weights_sha256"] = hashes[spec.weights]
        if spec.files:
            entry["files_sha256"] = {f: hashes[f] for f in spec.files if f in hashes}
        predictions = [load_predictions(r.csv, setting=s) for s, r in runs.items()]
        entry["csv"] = {s: str(r.csv) for s, r in runs.items()}
        errors = error_scores({s: r.csv for s, r in runs.items()})
        out[spec.name] = {**entry, "status": "ran", "scores": evaluate(predictions), **errors}
    return out


def error_scores(csv_by_setting: dict[str, Path]) -> dict:
    """For methods that estimate the misalignment (an ``error_mm`` column): mean absolute error (mm) and Spearman
    correlation against the true TRE, per setting and in total; {} otherwise."""
    from scipy.stats import spearmanr

    estimated, true = {}, {}
    for setting, csv in csv_by_setting.items():
        table = read_landmarks(csv)
        if "error_mm" not in table.values:
            return {}
        estimated[setting] = table.float_columns(["error_mm"])[:, 0]
        true[setting] = table.float_columns(["tre"])[:, 0]
    estimated["total"] = np.concatenate(list(estimated.values()))
    true["total"] = np.concatenate([true[s] for s in csv_by_setting])
    return {
        "error_mm": {
            s: {
                "mae_mm": float(np.abs(estimated[s] - true[s]).mean()),
                "spearman": float(spearmanr(estimated[s], true[s]).statistic),
                "n": int(true[s].size),
            }
            for s in estimated
        }
    }


def _landmark_figure(registration: dict, setting: str, fixed: Path, report_dir: Path) -> Path:
    entry = registration["settings"][setting]
    fixed_image = sitk.ReadImage(str(fixed))
    table = read_landmarks(entry["points"])
    voxels = np.array([fixed_image.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in table.points()])
    classes = true_classes(table.float_columns(["tre"])[:, 0])
    return plot_landmark_slices(
        sitk.GetArrayFromImage(fixed_image),
        sitk.GetArrayFromImage(sitk.ReadImage(entry["image"])),  # copies: a view would outlive its image
        voxels,
        classes,
        fixed_image.GetSpacing(),
        f"{setting}: landmarks coloured by true TRE class (green < 3 mm, yellow 3-6, red >= 6)",
        report_dir / f"landmarks_{setting}.png",
    )


def select_methods(methods: tuple[MethodSpec, ...], only: str | list[str] | tuple[str, ...]) -> tuple:
    """``methods`` with those not named in ``only`` turned into "pending" entries ("" or empty: all run).

    Args:
        methods: the methods of the comparison.
        only: names to run, comma-separated or a list; "" or empty runs all.

    Returns:
        Tuple of ``MethodSpec`` in the same order.

    Raises:
        ValueError: when ``only`` names an unknown method.
    """
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only) if n.strip()]
    unknown = [n for n in names if n not in {m.name for m in methods}]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {[m.name for m in methods]}")
    if not names:
        return methods
    return tuple(m if m.name in names else MethodSpec(m.name, "pending", reason=NOT_SELECTED) for m in methods)


def carry_rows(methods: dict[str, dict], ground_truth: dict, earlier_report: str | Path) -> dict[str, dict]:
    """``methods`` with the rows not selected for this run (``only=``) taken from ``earlier_report`` (its
    report.json) where they ran there, marked ``carried_from``; refused unless that run scored the same landmarks
    (the same true classes per setting and mean TRE within 0.01 mm), so only rows this run did not re-predict and
    whose inputs did not change should be carried.

    Args:
        methods: this run's method entries (``run_methods``).
        ground_truth: this run's true classes and TRE per setting (``counts``, ``mean``, ...).
        earlier_report: an earlier ``report.json``.

    Returns:
        New dict of method entries with the carried rows replaced.

    Raises:
        ValueError: when ``earlier_report`` is not a readable benchmark report or its landmarks differ.
    """
    path = Path(earlier_report)
    try:
        earlier = json.loads(path.read_text())
        earlier_methods, earlier_truth = earlier["methods"], earlier["ground_truth"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a benchmark report.json ({type(err).__name__}: {err})") from err
    same = set(earlier_truth) == set(ground_truth) and all(
        earlier_truth[s]["counts"] == t["counts"] and abs(earlier_truth[s]["mean"] - t["mean"]) <= 0.01
        for s, t in ground_truth.items()
    )
    if not same:
        raise ValueError(f"{path}: its landmarks' true classes differ from this run's; rows cannot be carried")
    out = dict(methods)
    for name, entry in methods.items():
        old = earlier_methods.get(name, {})
        if (
            entry.get("status") == "not run"
            and entry.get("reason", "").startswith(NOT_SELECTED)
            and (old.get("status") == "ran")
        ):
            kept = {k: v for k, v in old.items() if k != "csv"}  # its prediction files belong to that run
            out[name] = {**kept, "carried_from": str(path), "reused": False}
    return out


def run_benchmark(
    output_dir: str = "docs/benchmark",
    work_dir: str | None = None,
    scan: str = "",
    seed: int = 0,
    landmarks: int = 300,
    min_spacing_mm: float = 15.0,
    setting: str = "all",
    working_spacing_mm: float = 2.0,
    threads: int = 2,
    samples: int = 3000,
    allow_training_scan: bool = False,
    keep_work_dir: bool = True,
    reuse: bool = True,
    slices_in_report: bool = False,
    methods: tuple[MethodSpec, ...] = DEFAULT_METHODS,
    only: str | list[str] | tuple[str, ...] = "",
    carry_from: str = "",
    crop: str = "",
) -> dict:
    """Run the whole benchmark and write the report into ``output_dir``; returns the report dictionary. Slice
    figures of the scan (Fig. 4 style) go to ``work_dir`` unless ``slices_in_report`` (mind the scan's licence).
    With ``reuse`` the simulated pair, the registrations and each method's predictions of an earlier run in the same
    ``work_dir`` are used again when their inputs (scan hash, seed, counts, options, the pair code; for predictions
    also the method's weights or thresholds and the prediction code) are the same; their timings are the ones
    measured then and the report says which stages were reused. New weights thus re-run only their own method.
    ``only``: names of the methods to run (comma-separated or a list); the others are listed as not run, or, with
    ``carry_from`` (an earlier report.json of the same landmarks), taken from it and marked as carried. ``crop``
    ("one_lung"): register and predict on the pair cut through the lungs as users crop scans (``crop_pair``).

    Args:
        output_dir: report folder (relative to the bundle root unless absolute).
        work_dir: folder of the derived images and cached stages (outside the repository); None for a temporary one.
        scan: held-out CT file (required).
        seed: seed of the simulated deformation.
        landmarks: number of landmarks to select.
        min_spacing_mm: minimum distance between landmarks, mm.
        setting: registration setting(s), see ``scripts.registration.elastix.parse_settings``.
        working_spacing_mm: elastix working grid, mm.
        threads: elastix threads.
        samples: elastix random samples per iteration.
        allow_training_scan: allow a scan of ``TRAINING_SCANS``.
        keep_work_dir: keep a temporary work folder after the run.
        reuse: reuse cached stages whose inputs are unchanged.
        slices_in_report: put the slice figure in the report folder.
        methods: the methods of the comparison (default ``DEFAULT_METHODS``).
        only: names of the methods to run (comma-separated or a list); "" runs all.
        carry_from: earlier ``report.json`` to take the other rows from; "" for none.
        crop: "" or "one_lung" (see ``crop_pair``).

    Returns:
        The report dictionary (description, setup, ground truth, methods, figures, timing and written ``files``).

    Raises:
        ValueError: for a missing ``scan`` argument, a training scan, a work folder inside the repository, an
            unknown setting, method or crop, or a report that cannot be carried from.
        FileNotFoundError: when ``scan`` does not exist.
    """
    total_start = time.perf_counter()
    load_at_start = [round(v, 1) for v in os.getloadavg()]  # the timings mean little on a busy machine
    if not scan:
        raise ValueError(f"no --scan: give the held-out scan, <dataset_dir>/{VALIDATION_SCAN}")
    scan_path = Path(scan)
    if not scan_path.is_file():
        raise FileNotFoundError(f"{scan_path}: scan not found")
    _check_scan(scan_path, allow_training_scan)
    settings = parse_settings(setting)
    methods = select_methods(methods, only)
    temporary = work_dir is None
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="misalignment_benchmark_"))
    _check_work_dir(work)
    work.mkdir(parents=True, exist_ok=True)
    report_dir = Path(output_dir)
    if not report_dir.is_absolute():
        report_dir = BUNDLE_ROOT / report_dir

    pair_inputs = {
        "scan": str(scan_path.resolve()),
        "scan_sha256": file_sha256(scan_path),
        "seed": seed,
        "landmarks": landmarks,
        "min_spacing_mm": min_spacing_mm,
        "code_sha256": {m: file_sha256(BUNDLE_ROOT / "scripts" / m) for m in PAIR_MODULES},
        "crop": crop,
    }
    reused = []
    pair = _reusable(work / "pair.json", pair_inputs) if reuse else None
    if pair is None:
        pair = crop_pair(make_pair(scan_path, work, seed, landmarks, min_spacing_mm), work, crop)
        _record(work / "pair.json", pair_inputs, pair)
    else:
        reused.append("make pair")
    options = RegistrationOptions(
        threads=threads, number_of_spatial_samples=samples, working_spacing_mm=working_spacing_mm
    )
    registration_inputs = {"pair": pair_inputs, "settings": settings, "options": asdict(options)}
    registration = _reusable(work / "registration.json", registration_inputs) if reuse else None
    start = time.perf_counter()
    if registration is None:
        registration = register_pair(
            pair["fixed"],
            pair["moving"],
            work / "registration",
            settings,
            pair["fixed_landmarks"],
            pair["moving_landmarks"],
            options=options,
        )
        registration["total_s"] = time.perf_counter() - start
        _record(work / "registration.json", registration_inputs, registration)
    else:
        reused.append("registration")
    registration_s = registration["total_s"]
    fixed_path = Path(pair["fixed"])  # the scan, or its crop
    mask = landmark_mask(
        fixed_path, Path(pair["fixed_landmarks"]), work / f"{stem_of(fixed_path)}_landmark_mask.nii.gz"
    )
    start = time.perf_counter()
    method_results = run_methods(
        registration, fixed_path, work, methods, mask, stage_inputs=registration_inputs if reuse else None
    )
    if carry_from:
        method_results = carry_rows(method_results, _ground_truth(registration), carry_from)
    reused_methods = [name for name, m in method_results.items() if m.get("reused")]
    reused += [f"{name} predictions" for name in reused_methods]
    methods_s = time.perf_counter() - start
    # slice images of the scan go into the report only on request: the default scan is CC BY-NC (see README there)
    figure = _landmark_figure(registration, settings[-1], fixed_path, report_dir if slices_in_report else work)

    timing = {"make pair (masks, deformation, landmarks)": pair["seconds"]}
    timing.update(
        {f"registration {s} (incl. shared affine)": e["registration_s"] for s, e in registration["settings"].items()}
    )
    timing.update({f"resample {s} on the fixed grid": e["resample_s"] for s, e in registration["settings"].items()})
    timing["registration, all settings"] = registration_s
    for name, m in method_results.items():
        for s, seconds in (m.get("seconds", {}) if m["status"] == "ran" else {}).items():
            timing[f"{name} {s}"] = seconds
    timing["all methods (run now)"] = methods_s
    reused_s = (
        (pair["seconds"] if "make pair" in reused else 0.0)
        + (registration_s if "registration" in reused else 0.0)
        + sum(sum(method_results[name]["seconds"].values()) for name in reused_methods)
        + sum(sum(m.get("seconds", {}).values()) for m in method_results.values() if m.get("carried_from"))
    )
    timing["total"] = time.perf_counter() - total_start + reused_s  # as if every stage had run now
    result = {
        "description": (
            f"Scan {stem_of(scan_path)} (not a training scan) against a simulated second time point with a known "
            f"deformation (respiratory + local motion, seed {seed}) and intensity changes; {pair['landmarks']} "
            "Förstner landmarks in the lungs; elastix registration on a "
            f"{working_spacing_mm:g} mm working grid; true TRE from the known deformation."
            + (f" Both images cut to one lung ({pair['crop']['size']} voxels, through the lung)." if crop else "")
        ),
        "setup": {
            "scan": str(scan_path),
            "crop": pair.get("crop", "none"),
            "seed": seed,
            "landmarks": pair["landmarks"],
            "landmark_displacement_mm": pair["landmark_displacement_mm"],
            "deformation": pair["deformation"],
            "machine": {"cpu_count": os.cpu_count(), "load_average_at_start": load_at_start},
            "reused from an earlier run in the work folder (timings measured then)": reused or "nothing",
            "rows carried from an earlier report (not predicted again; scores and timings of that run)": [
                f"{name} ({m['carried_from']})" for name, m in method_results.items() if m.get("carried_from")
            ]
            or "none",
            "predictors run on": (
                f"balls of {LANDMARK_MASK_RADIUS_MM:g} mm around the landmarks (--mask); the re-registration on the "
                "whole image (its elastix samples come from the body)"
            ),
            "registration": {
                "working_spacing_mm": working_spacing_mm,
                "threads": threads,
                "samples": samples,
                "working_size": registration["working_size"],
            },
        },
        "ground_truth": _ground_truth(registration),
        "methods": method_results,
        "figures": {"landmarks": str(figure)} if slices_in_report else {},
        "figures_outside_report": {} if slices_in_report else {"landmarks": str(figure)},
        "timing": timing,
    }
    result["files"] = write_report(result, report_dir)
    if temporary and not keep_work_dir:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"report": result["files"]["markdown"], "timing": timing}, indent=1))
    return result


if __name__ == "__main__":
    import fire

    fire.Fire(run_benchmark, serialize=lambda result: None)  # the summary is printed; the report is on disk
