"""The methods of the simulated benchmark (a registry: ``DEFAULT_METHODS``) and how each one predicts the landmark
classes of a registered pair: the bundle's inference contract as a subprocess, a baseline on every setting at once,
a re-labelling of another method's predictions, or the majority class."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from scripts.data.landmark_csv import read_landmarks, write_landmarks
from scripts.data.landmarks import PROBABILITY_COLUMNS, write_landmark_predictions
from scripts.evaluation.ncc_baseline import DEFAULT_THRESHOLDS
from scripts.evaluation.ncc_baseline import predict_settings as ncc_predict_settings
from scripts.evaluation.regnet_t import DEFAULT_WEIGHTS as REGNET_WEIGHTS
from scripts.evaluation.regnet_t import predict_settings as regnet_t_predict_settings
from scripts.inferers.class_decision import read_class_weights
from scripts.utils.constants import CLASS_THRESHOLDS_MM

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
MAJORITY_CLASS = 0  # "correct": the most frequent class of the training pairs (60 % of patch centres, method.md 6)


BaselineRunner = Callable[
    [Path, dict, Path], dict
]  # (fixed, {setting: (image, points)}, folder) -> {setting: (csv, s)}


@dataclass
class MethodSpec:
    """A method of the comparison: ``kind`` "bundle" runs the inference contract with ``weights`` and extra CLI
    overrides (``files``: other files it reads, recorded with their hashes; ``landmark_mask``: predict only around
    the landmarks); "baseline" calls ``runner`` on all settings at once when every file of ``files``
    (bundle-relative) exists; "derived" re-labels the prediction CSVs of the method named ``source`` with
    ``relabel``; "majority" predicts one class everywhere; "pending" is not implemented (``reason``)."""

    name: str
    kind: str
    weights: str | None = None
    overrides: list[str] = field(default_factory=list)
    reason: str = ""
    runner: BaselineRunner | None = None
    files: tuple[str, ...] = ()
    landmark_mask: bool = True
    source: str = ""
    relabel: Callable[[Path, Path], Path] | None = None


def residual_thresholds(source_csv: Path, output_csv: Path) -> Path:
    """What a user of plain re-registration does: |r| at each landmark (``residual_mm``) thresholded at 3 and
    6 mm, one-hot probabilities and ``error_mm`` = |r| (from the calibrated re-registration's CSV).

    Args:
        source_csv: prediction CSV of the calibrated re-registration (with a ``residual_mm`` column).
        output_csv: CSV to write.

    Returns:
        The written path.
    """
    table = read_landmarks(source_csv)
    magnitude = table.float_columns(["residual_mm"])[:, 0]
    one_hot = np.eye(3)[np.digitize(magnitude, CLASS_THRESHOLDS_MM)]
    return write_landmark_predictions(output_csv, table, one_hot, extra_columns={"error_mm": magnitude})


def relabel_with_weights(class_weights_file: str | None) -> Callable[[Path, Path], Path]:
    """A ``relabel`` that keeps a CSV's probabilities and labels argmax(w * p) with the weights of
    ``class_weights_file`` (bundle-relative; read when it runs), or the plain argmax for None."""

    def relabel(source_csv: Path, output_csv: Path) -> Path:
        weights = None
        if class_weights_file is not None:
            weights = read_class_weights(bundle_path(class_weights_file))
        table = read_landmarks(source_csv)
        probabilities = table.float_columns(list(PROBABILITY_COLUMNS))
        return write_landmark_predictions(output_csv, table, probabilities, class_weights=weights)

    return relabel


def bundle_path(path: str) -> Path:
    """``path`` as given when absolute, else below the bundle root."""
    return Path(path) if Path(path).is_absolute() else BUNDLE_ROOT / path


REREGISTRATION = "re-registration (calibrated, mean-F1 decision)"
MULTIVIEW = "multiview (views + calibrated boosted trees)"
RESIDUAL_NETWORK = "LSTM 6-3-1 + r prior (residual-informed)"
DEFAULT_METHODS = (
    MethodSpec(
        REREGISTRATION,
        "bundle",
        None,
        ["--method", "reregistration"],
        files=("models/reregistration_calibration.json",),
        landmark_mask=False,
    ),
    MethodSpec(
        MULTIVIEW,
        "bundle",
        None,
        ["--method", "multiview"],
        files=("models/multiview_combiner.json",),
    ),
    MethodSpec(
        "re-registration (calibrated, argmax)", "derived", source=REREGISTRATION, relabel=relabel_with_weights(None)
    ),
    MethodSpec("re-registration (|r| thresholds)", "derived", source=REREGISTRATION, relabel=residual_thresholds),
    MethodSpec(
        "LSTM 6-3-1", "bundle", "models/model.pt", ["--method", "network"], files=("models/class_weights.json",)
    ),
    MethodSpec(
        "LSTM 6-3-1, argmax (paper)", "bundle", "models/model.pt", ["--method", "network", "--class_weights_file", ""]
    ),
    MethodSpec(
        RESIDUAL_NETWORK,
        "bundle",
        "models/model_residual.pt",
        ["--method", "network", "--residual_input", "lstm_prior", "--class_weights_file", ""],
    ),
    MethodSpec(
        "multi-scale CNN", "bundle", "models/model_multi_cnn.pt", ["--method", "network", "--decoder", "multi_cnn"]
    ),
    MethodSpec(
        "single-scale CNN", "bundle", "models/model_single_cnn.pt", ["--method", "network", "--decoder", "single_cnn"]
    ),
    MethodSpec("RegNet-t", "baseline", runner=regnet_t_predict_settings, files=tuple(REGNET_WEIGHTS.values())),
    MethodSpec("local NCC", "baseline", runner=ncc_predict_settings, files=(DEFAULT_THRESHOLDS,)),
    MethodSpec("majority class", "majority"),
)


@dataclass
class PredictorRun:
    """Outcome of one predictor call: ``csv`` is the per-landmark prediction file when it ran."""

    status: str  # "ran", "not run" or "failed"
    csv: Path | None = None
    seconds: float = 0.0
    reason: str = ""


def stem_of(path: Path) -> str:
    """An image file name without its extension (``a.nii.gz`` -> ``a``)."""
    name = path.name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else path.stem


def run_bundle_predictor(
    fixed: Path,
    moving: Path,
    landmarks: Path,
    output_dir: Path,
    config_file: str | Path = "configs/inference.json",
    weights: str | Path | None = "models/model.pt",
    overrides: list[str] | tuple[str, ...] = (),
    timeout_s: float = 3600.0,
    mask: Path | None = None,
) -> PredictorRun:
    """Run the inference contract as a subprocess in the bundle root:
    ``python -m monai.bundle run --config_file C --fixed_image F --moving_image M --landmarks P --output_dir D``;
    the weights go in as ``--checkpoint``; "not run" when the config or the weights are missing (untrained output
    is never scored), "failed" when no ``<stem>_landmarks.csv`` appears. ``mask`` restricts the prediction to the
    landmarks' neighbourhoods (``--mask``): the same values there, a fraction of the tiles.

    Args:
        fixed: fixed image file.
        moving: registered moving image file.
        landmarks: landmark CSV of fixed-image points.
        output_dir: folder of the prediction CSV.
        config_file: bundle config, relative to the bundle root.
        weights: network weights relative to the bundle root, or None to pass no ``--checkpoint``.
        overrides: extra command-line arguments of the bundle run.
        timeout_s: time limit of the subprocess, seconds.
        mask: optional mask file passed as ``--mask``.

    Returns:
        A ``PredictorRun`` with status "ran" (and the CSV), "not run" or "failed" (and the reason).
    """
    config_file = BUNDLE_ROOT / config_file
    if not config_file.is_file():
        return PredictorRun("not run", reason=f"{config_file} does not exist yet")
    if weights is not None and not (BUNDLE_ROOT / weights).is_file():
        return PredictorRun("not run", reason=f"weights {weights} do not exist yet")
    if weights is not None:
        overrides = ["--checkpoint", str(BUNDLE_ROOT / weights), *overrides]
    if mask is not None:
        overrides = ["--mask", str(mask), *overrides]
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(config_file),
        "--fixed_image",
        str(fixed),
        "--moving_image",
        str(moving),
        "--landmarks",
        str(landmarks),
        "--output_dir",
        str(output_dir),
        *overrides,
    ]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return PredictorRun("failed", seconds=timeout_s, reason=f"timed out after {timeout_s:.0f} s")
    seconds = time.perf_counter() - start
    csv = output_dir / f"{stem_of(moving)}_landmarks.csv"
    if done.returncode != 0 or not csv.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return PredictorRun(
            "failed", seconds=seconds, reason=f"exit {done.returncode}, no {csv.name}: {' | '.join(tail)}"
        )
    return PredictorRun("ran", csv, seconds)


def run_majority(landmarks: Path, moving: Path, output_dir: Path) -> PredictorRun:
    """The majority-class baseline: ``MAJORITY_CLASS`` for every landmark, one-hot probabilities.

    Args:
        landmarks: landmark CSV of fixed-image points.
        moving: registered moving image file (its stem names the CSV).
        output_dir: folder of the prediction CSV.

    Returns:
        A ``PredictorRun`` with status "ran" and the written CSV.
    """
    start = time.perf_counter()
    table = read_landmarks(landmarks)
    n = len(table)
    one_hot = np.eye(3)[MAJORITY_CLASS]
    table = table.with_column("pred", [str(MAJORITY_CLASS)] * n)
    for k, name in enumerate(("p_correct", "p_poor", "p_wrong")):
        table = table.with_column(name, np.full(n, one_hot[k]))
    csv = write_landmarks(table, output_dir / f"{stem_of(moving)}_landmarks.csv")
    return PredictorRun("ran", csv, time.perf_counter() - start)


def run_baseline(spec: MethodSpec, fixed: Path, registration: dict, folder: Path) -> dict[str, PredictorRun]:
    """A "baseline" method on every setting at once (the fixed image is prepared once): "not run" when one of its
    files is missing, "failed" (with the error) when it raises.

    Args:
        spec: the method (its ``files`` and ``runner``).
        fixed: fixed image file.
        registration: registration log with ``image`` and ``points`` per setting.
        folder: folder of the method's prediction CSVs.

    Returns:
        Dict setting -> ``PredictorRun``; a single entry for the first setting when it did not run or failed.
    """
    missing = [f for f in spec.files if not (BUNDLE_ROOT / f).is_file()]
    first = next(iter(registration["settings"]))
    if missing:
        return {first: PredictorRun("not run", reason=f"{', '.join(missing)} do(es) not exist yet")}
    if spec.runner is None:
        return {first: PredictorRun("not run", reason="no runner given")}
    pairs = {s: (Path(e["image"]), Path(e["points"])) for s, e in registration["settings"].items()}
    start = time.perf_counter()
    try:
        done = spec.runner(fixed, pairs, folder)
    except (OSError, ValueError, RuntimeError) as err:
        return {
            first: PredictorRun("failed", seconds=time.perf_counter() - start, reason=f"{type(err).__name__}: {err}")
        }
    return {s: PredictorRun("ran", Path(csv), seconds) for s, (csv, seconds) in done.items()}


def run_derived(spec: MethodSpec, source: dict, folder: Path) -> dict[str, PredictorRun]:
    """Re-label the CSVs of the method ``spec.source`` (it must have run before, in the same call).

    Args:
        spec: the method (its ``source``, ``files`` and ``relabel``).
        source: the source method's entry (``status``, ``csv`` and ``seconds`` per setting).
        folder: folder of the re-labelled CSVs.

    Returns:
        Dict setting -> ``PredictorRun`` (its seconds include the source's); a single "all" entry when it did not run.
    """
    if source.get("status") != "ran" or spec.relabel is None:
        return {"all": PredictorRun("not run", reason=f"needs {spec.source!r}, which did not run")}
    missing = [f for f in spec.files if not bundle_path(f).is_file()]
    if missing:
        return {"all": PredictorRun("not run", reason=f"{missing[0]} not found")}
    folder.mkdir(parents=True, exist_ok=True)
    runs = {}
    for setting, csv in source["csv"].items():
        start = time.perf_counter()
        path = spec.relabel(Path(csv), folder / Path(csv).name)
        runs[setting] = PredictorRun("ran", path, source["seconds"][setting] + time.perf_counter() - start)
    return runs
