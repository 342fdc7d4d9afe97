"""Landmarks of a misalignment run: check a landmark CSV against the fixed image and write it back with the
predicted class, the class probabilities and the coarse class of every earlier LSTM step.

The CSV format (header; x, y, z in physical LPS mm; other columns kept) is ``scripts.data.landmark_csv``'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

import numpy as np

from scripts.data.image_io import Grid, InputError
from scripts.data.landmark_csv import LandmarkTable, read_landmarks, write_landmarks
from scripts.utils.class_decision import weighted_argmax
from scripts.utils.constants import CLASS_NAMES, CLASS_THRESHOLDS_MM

PROBABILITY_COLUMNS = tuple(f"p_{name}" for name in CLASS_NAMES)  # p_correct, p_poor, p_wrong
TRE_COLUMN = "tre"


def read_landmarks_in_image(path: str | os.PathLike, fixed_grid: Grid, fixed_path: str = "") -> LandmarkTable:
    """Read a landmark CSV (errors from ``scripts.data.landmark_csv`` for a missing file, missing x/y/z, non-numbers)
    and
    check that every point lies inside the fixed image; the error names the file, the row and the point."""
    table = read_landmarks(path)
    if len(table) == 0:
        raise InputError(f"landmarks {path}: the table has a header but no rows")
    points = table.points()
    inside = fixed_grid.contains(points)
    if not inside.all():
        bad = np.flatnonzero(~inside)
        first = int(bad[0])
        lower, upper = fixed_grid.bounds()
        ident = f" (id {table.values['id'][first]})" if "id" in table.values else ""
        raise InputError(
            f"landmarks {path}: row {first + 2}{ident}: point {np.round(points[first], 2).tolist()} mm lies outside "
            f"the fixed image {fixed_path} (it spans {np.round(lower, 1).tolist()} to {np.round(upper, 1).tolist()} "
            f"mm, LPS); {len(bad)} of {len(points)} points are outside"
        )
    return table


def true_classes(table: LandmarkTable) -> Optional[np.ndarray]:
    """Correct/poor/wrong (0/1/2) from the table's ``tre`` column (mm), or None without a numeric one."""
    if TRE_COLUMN not in table.values:
        return None
    try:
        tre = table.float_columns([TRE_COLUMN])[:, 0]
    except ValueError:
        return None
    return np.digitize(tre, CLASS_THRESHOLDS_MM).astype(np.int64)


def step_columns(num_earlier_steps: int) -> List[str]:
    """Names of the earlier LSTM steps' coarse-class columns: step1, step2, ..."""
    return [f"step{k + 1}" for k in range(num_earlier_steps)]


def with_predictions(
    table: LandmarkTable,
    probabilities: np.ndarray,
    step_classes: Optional[np.ndarray] = None,
    extra_columns: Optional[Mapping[str, np.ndarray]] = None,
    class_weights: Optional[Sequence[float]] = None,
) -> LandmarkTable:
    """``table`` plus ``pred`` (0/1/2; 0 with all probabilities 0 outside the mask), ``p_correct, p_poor, p_wrong``
    (``probabilities [N, 3]``) and ``step1, step2, ...`` (``step_classes [N, S]``, the coarse group index of each
    earlier LSTM step; no step column when S is 0 or ``step_classes`` is None, e.g. for the CNN decoders) and
    ``extra_columns`` (name -> ``[N]`` floats, e.g. ``error_mm`` of methods that estimate the misalignment);
    ``pred`` is argmax(class_weights * p) when ``class_weights`` are given (the probabilities are written as they are).
    """
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(len(table), 3)
    pred = np.where(probabilities.sum(axis=1) > 0, weighted_argmax(probabilities, class_weights, axis=1), 0)
    out = table.with_column("pred", [str(int(p)) for p in pred])
    for j, name in enumerate(PROBABILITY_COLUMNS):
        out = out.with_column(name, probabilities[:, j])
    if step_classes is not None:
        steps = np.asarray(step_classes).reshape(len(table), -1)
        for k, name in enumerate(step_columns(steps.shape[1])):
            out = out.with_column(name, [str(int(s)) for s in steps[:, k]])
    for name, values in (extra_columns or {}).items():
        out = out.with_column(name, np.asarray(values, dtype=np.float64).reshape(len(table)))
    return out


def write_landmark_predictions(
    path: str | os.PathLike,
    table: LandmarkTable,
    probabilities: np.ndarray,
    step_classes: Optional[np.ndarray] = None,
    extra_columns: Optional[Mapping[str, np.ndarray]] = None,
    class_weights: Optional[Sequence[float]] = None,
) -> Path:
    """Write ``with_predictions(table, ...)`` to ``path`` atomically."""
    return write_landmarks(with_predictions(table, probabilities, step_classes, extra_columns, class_weights), path)


def sample_nearest(volume: np.ndarray, grid: Grid, points: np.ndarray) -> np.ndarray:
    """Values of a ``[C, z, y, x]`` volume on ``grid`` at the voxels nearest to physical points ``[N, 3]`` (mm) ->
    ``[N, C]``."""
    index = np.rint(grid.continuous_index(points)).astype(int)  # (x, y, z)
    index = np.clip(index, 0, np.asarray(grid.size) - 1)
    return np.asarray(volume)[:, index[:, 2], index[:, 1], index[:, 0]].T
