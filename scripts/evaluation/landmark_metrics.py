"""Landmark-based scores of misalignment predictions (paper section III, Tables 2-4) with scikit-learn.

Input: per-landmark prediction CSVs of the inference contract (``<stem>_landmarks.csv``): the input columns plus
``pred`` (0 correct, 1 poor, 2 wrong), ``p_correct,p_poor,p_wrong`` and ``step1``, ``step2`` (the coarse group index
the LSTM gave at its earlier steps); the true error is the column ``tre`` (mm) or is computed from the mapped points
``x_moving,y_moving,z_moving`` (T(x_F)) and the true moving landmarks. Scores per registration setting and in total:
F1 of correct/poor/wrong, mean F1, accuracy, Cohen's kappa (unweighted), the cw count (correct <-> wrong confusions)
and the confusion matrix; per LSTM step on that step's own coarse groups (Table 4).

CLI::

    python -m scripts.evaluation.landmark_metrics --predictions \
        "['D/a_affine_landmarks.csv','D/a_bspline20_landmarks.csv']" \\
        [--output scores.json] [--split 6-3-1]
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix, f1_score

from scripts.data.landmark_csv import read_landmarks
from scripts.data.landmarks import assessed_rows
from scripts.networks.hierarchical_labels import hierarchical_labels, misalignment_classes, step_edges
from scripts.registration.elastix import MAPPED_COLUMNS, SETTINGS, TRE_COLUMN
from scripts.utils.atomic_write import atomic_write_text
from scripts.utils.constants import CLASS_NAMES

PRED_COLUMN = "pred"
PROBABILITY_COLUMNS = ("p_correct", "p_poor", "p_wrong")
SETTING_COLUMN = "setting"
TOTAL = "total"
_SETTING_IN_NAME = re.compile(r"(?:^|_)(" + "|".join(SETTINGS) + r")(?:_|$)")


def step_column(step: int) -> str:
    """Name of the column holding the coarse group predicted at LSTM step ``step`` (1-based)."""
    return f"step{step}"


@dataclass
class LandmarkPredictions:
    """True errors and predicted classes of the landmarks of one prediction CSV."""

    source: str
    setting: str
    tre: np.ndarray  # [N] true registration error in mm
    pred: np.ndarray  # [N] predicted class 0/1/2
    steps: dict[int, np.ndarray] = field(default_factory=dict)  # step number -> [N] predicted group index
    unassessed: int = 0  # rows skipped: outside the assessed region or either image (``inside`` 0, empty ``pred``)


def setting_from_name(path: str | Path) -> str | None:
    """The registration setting named in a file name such as ``scan_bspline500_landmarks.csv``, else None."""
    name = Path(path).name.split(".")[0]
    found = _SETTING_IN_NAME.findall(name)
    return found[-1] if found else None


def _integer_column(values: np.ndarray, name: str, source: str, num_classes: int) -> np.ndarray:
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        raise ValueError(f"{source}: column {name!r} must hold integer class indices")
    out = values.astype(np.int64)
    if out.size and (out.min() < 0 or out.max() >= num_classes):
        raise ValueError(f"{source}: column {name!r} holds values outside 0..{num_classes - 1}")
    return out


def load_predictions(
    path: str | Path,
    setting: str | None = None,
    moving_landmarks: str | Path | None = None,
    split: str = "6-3-1",
) -> LandmarkPredictions:
    """Read one prediction CSV; the setting comes from ``setting``, a ``setting`` column or the file name; the
    true error from ``tre`` or from x/y/z_moving and the true ``moving_landmarks`` (x,y,z, same row order).

    Args:
        path: prediction CSV.
        setting: registration setting of the file; None takes it from the CSV or the file name ("unknown" if neither).
        moving_landmarks: optional CSV of the true moving landmarks, used when the file has no ``tre`` column.
        split: LSTM split, e.g. "6-3-1" (defines the ``step1``, ``step2`` groups).

    Returns:
        ``LandmarkPredictions`` of the assessed rows (the others counted in ``unassessed``).

    Raises:
        ValueError: for missing columns, non-integer or out-of-range classes, negative or non-finite errors, or a moving
            landmark file of another length.
    """
    table = read_landmarks(path, required=())
    source = table.source
    assessed = assessed_rows(table)
    table = table.rows(assessed)
    missing = [PRED_COLUMN] if PRED_COLUMN not in table.values else []
    if TRE_COLUMN not in table.values:
        lacking = [c for c in MAPPED_COLUMNS if c not in table.values]
        if moving_landmarks is None or lacking:
            missing.append(TRE_COLUMN)
            missing += lacking if moving_landmarks is not None else []
    if missing:
        how = "" if TRE_COLUMN not in missing else f" (or {','.join(MAPPED_COLUMNS)} plus the true moving landmarks)"
        raise ValueError(f"{source}: missing column(s) {missing}{how}; the file has {table.columns}")
    if TRE_COLUMN in table.values:
        tre = table.float_columns([TRE_COLUMN])[:, 0]
    else:
        partners = read_landmarks(moving_landmarks)
        if len(partners) != len(table):
            raise ValueError(f"{partners.source}: {len(partners)} landmarks, but {source} has {len(table)}")
        tre = np.linalg.norm(table.float_columns(list(MAPPED_COLUMNS)) - partners.points(), axis=1)
    if not np.all(np.isfinite(tre)) or (tre < 0).any():
        raise ValueError(f"{source}: the true errors must be finite and non-negative")
    pred = _integer_column(table.float_columns([PRED_COLUMN])[:, 0], PRED_COLUMN, source, len(CLASS_NAMES))
    steps = {}
    edges = step_edges(split)
    for k in range(1, len(edges)):  # earlier steps; the last step is ``pred`` (merged) or its fine labels
        name = step_column(k)
        if name in table.values:
            steps[k] = _integer_column(table.float_columns([name])[:, 0], name, source, len(edges[k - 1]) + 1)
    if setting is None:
        if SETTING_COLUMN in table.values and len(set(table.values[SETTING_COLUMN])) == 1:
            setting = table.values[SETTING_COLUMN][0]
        else:
            setting = setting_from_name(path) or "unknown"
    return LandmarkPredictions(source, setting, tre, pred, steps, int((~assessed).sum()))


def classification_scores(true: np.ndarray, pred: np.ndarray, class_names: tuple[str, ...] = CLASS_NAMES) -> dict:
    """F1 per class, mean F1, accuracy, Cohen's kappa (unweighted), cw count and confusion matrix (rows = actual,
    columns = predicted; the paper's Table 3 prints its transpose). Kappa is NaN when only one class occurs.

    Args:
        true: ``[N]`` true class indices.
        pred: ``[N]`` predicted class indices.
        class_names: names of the classes, in index order.

    Returns:
        Dict with ``f1_<name>`` per class, ``mean_f1``, ``accuracy``, ``kappa``, ``n``, ``confusion`` and, for three or
        more classes, ``cw``.
    """
    labels = list(range(len(class_names)))
    f1 = f1_score(true, pred, labels=labels, average=None, zero_division=0.0)
    matrix = confusion_matrix(true, pred, labels=labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # kappa of a single-class set is 0/0
        kappa = float(cohen_kappa_score(true, pred, labels=labels)) if len(true) else float("nan")
    scores = {f"f1_{name}": float(v) for name, v in zip(class_names, f1)}
    scores.update(
        {
            "mean_f1": float(np.mean(f1)),
            "accuracy": float(accuracy_score(true, pred)) if len(true) else float("nan"),
            "kappa": kappa,
            "n": int(len(true)),
            "confusion": matrix.tolist(),
        }
    )
    if len(class_names) >= 3:
        scores["cw"] = int(matrix[0, -1] + matrix[-1, 0])  # two or more categories apart: correct <-> wrong
    return scores


def group_names(edges: tuple[float, ...]) -> tuple[str, ...]:
    """Readable names of the groups made by ``edges`` (mm), e.g. ``("0-6", ">=6")``."""
    bounds = (0.0,) + tuple(edges)
    names = [f"{bounds[i]:g}-{bounds[i + 1]:g}" for i in range(len(edges))]
    return tuple(names + [f">={bounds[-1]:g}"])


def step_scores(tre: np.ndarray, steps: dict[int, np.ndarray], split: str = "6-3-1") -> dict[str, dict]:
    """Scores of every earlier LSTM step on its own coarse groups (true groups from ``hierarchical_labels``).

    Args:
        tre: ``[N]`` true errors, mm.
        steps: step number (1-based) -> ``[N]`` predicted group indices.
        split: LSTM split, e.g. "6-3-1".

    Returns:
        Dict ``step<k>`` -> ``classification_scores`` on that step's groups.
    """
    truth = hierarchical_labels(torch.as_tensor(tre, dtype=torch.float64), split).numpy()
    edges = step_edges(split)
    return {
        step_column(k): classification_scores(truth[k - 1], pred, group_names(edges[k - 1]))
        for k, pred in sorted(steps.items())
    }


def true_classes(tre: np.ndarray) -> np.ndarray:
    """Correct (0), poor (1), wrong (2) of true errors in mm (shared thresholds of
    scripts.networks.hierarchical_labels)."""
    return misalignment_classes(torch.as_tensor(tre, dtype=torch.float64)).numpy()


def _score_group(items: list[LandmarkPredictions], split: str) -> dict:
    tre = np.concatenate([p.tre for p in items])
    scores = classification_scores(true_classes(tre), np.concatenate([p.pred for p in items]))
    step_numbers = set.intersection(*(set(p.steps) for p in items)) if items else set()
    if step_numbers:
        steps = {k: np.concatenate([p.steps[k] for p in items]) for k in step_numbers}
        scores["steps"] = step_scores(tre, steps, split)
    scores["sources"] = [p.source for p in items]
    scores["unassessed"] = int(sum(p.unassessed for p in items))
    return scores


def evaluate(predictions: list[LandmarkPredictions], split: str = "6-3-1") -> dict[str, dict]:
    """Scores per registration setting (protocol order, then any others) and ``total`` over all landmarks.

    Args:
        predictions: loaded prediction files.
        split: LSTM split of the step scores.

    Returns:
        Dict setting (and ``total``) -> ``classification_scores`` plus ``steps``, ``sources`` and ``unassessed``.

    Raises:
        ValueError: when ``predictions`` is empty.
    """
    if not predictions:
        raise ValueError("no prediction files to score")
    order = [s for s in SETTINGS if any(p.setting == s for p in predictions)]
    order += sorted({p.setting for p in predictions} - set(order))
    out = {s: _score_group([p for p in predictions if p.setting == s], split) for s in order}
    out[TOTAL] = _score_group(predictions, split)
    return out


def format_scores(scores: dict[str, dict]) -> str:
    """A plain-text table (percentages as in the paper's Table 2)."""
    head = f"{'setting':<12}{'F1c':>7}{'F1p':>7}{'F1w':>7}{'mF1':>7}{'Acc':>7}{'kappa':>7}{'cw':>5}{'n':>7}"
    lines = [head]
    for name, s in scores.items():
        lines.append(
            f"{name:<12}{100 * s['f1_correct']:7.1f}{100 * s['f1_poor']:7.1f}{100 * s['f1_wrong']:7.1f}"
            f"{100 * s['mean_f1']:7.1f}{100 * s['accuracy']:7.1f}{s['kappa']:7.2f}{s['cw']:5d}{s['n']:7d}"
        )
    skipped = scores.get(TOTAL, {}).get("unassessed", 0)
    if skipped:
        lines.append(f"{skipped} landmark(s) not assessed (outside the region or either image) are not scored")
    return "\n".join(lines)


def _json_safe(value):
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def to_json(scores: dict) -> str:
    """Scores as JSON (NaN written as null)."""
    return json.dumps(_json_safe(scores), indent=1)


def main(
    predictions: str | list[str],
    output: str | None = None,
    split: str = "6-3-1",
    moving_landmarks: str | None = None,
) -> None:
    """CLI: score prediction CSVs (a list, or a folder whose ``*_landmarks.csv`` are taken); print the table and
    optionally write the JSON.

    Args:
        predictions: prediction CSV path(s), or one folder.
        output: optional JSON file of the scores.
        split: LSTM split, e.g. "6-3-1".
        moving_landmarks: optional CSV of the true moving landmarks (for files without ``tre``).

    Raises:
        FileNotFoundError: when a folder holds no ``*_landmarks.csv``.
    """
    paths = [predictions] if isinstance(predictions, str) else list(predictions)
    if len(paths) == 1 and Path(paths[0]).is_dir():
        paths = sorted(str(p) for p in Path(paths[0]).glob("*_landmarks.csv"))
        if not paths:
            raise FileNotFoundError(f"{predictions}: no *_landmarks.csv prediction files in this folder")
    scores = evaluate([load_predictions(p, moving_landmarks=moving_landmarks, split=split) for p in paths], split)
    print(format_scores(scores))
    if output:
        atomic_write_text(output, to_json(scores))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
