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
INSIDE_COLUMN = "inside"  # 1: the landmark was assessed; 0: outside the region or either image (pred left empty)


def read_landmarks_in_image(path: str | os.PathLike, fixed_grid: Grid, fixed_path: str = "") -> LandmarkTable:
    """Read a landmark CSV (errors from ``scripts.data.landmark_csv`` for a missing file, missing x/y/z, non-numbers)
    and check that its points lie in the fixed image: an error names the file, the first row and point outside when
    none lies inside (a table in other coordinates); points outside a partly covered image are only not assessed.

    Args:
        path: landmark CSV file (x, y, z in LPS mm).
        fixed_grid: grid of the fixed image.
        fixed_path: fixed image path, named in the message.

    Returns:
        The ``LandmarkTable``.

    Raises:
        InputError: when the table has no rows or no point lies inside the fixed image.
        FileNotFoundError: when ``path`` does not exist.
        ValueError: for a malformed CSV (see ``scripts.data.landmark_csv.read_landmarks``).
    """
    table = read_landmarks(path)
    if len(table) == 0:
        raise InputError(f"landmarks {path}: the table has a header but no rows")
    points = table.points()
    inside = fixed_grid.contains(points)
    if not inside.any():
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
    inside: Optional[np.ndarray] = None,
) -> LandmarkTable:
    """``table`` plus ``inside`` (1: assessed; 0: outside the region or either image), ``pred`` (0/1/2),
    ``p_correct, p_poor, p_wrong`` (``probabilities [N, 3]``), ``step1, step2, ...`` (``step_classes [N, S]``, the
    coarse group index of each earlier LSTM step; no step column when S is 0 or ``step_classes`` is None, e.g. for the
    CNN decoders) and ``extra_columns`` (name -> ``[N]`` floats, e.g. ``error_mm``); every predicted column is empty
    where ``inside`` is 0 (default: where the probabilities are all 0). ``pred`` is argmax(class_weights * p) when
    ``class_weights`` are given (the probabilities are written as they are).

    Args:
        table: landmark table with N rows.
        probabilities: ``[N, 3]`` class probabilities.
        step_classes: optional ``[N, S]`` coarse group indices of the earlier LSTM steps.
        extra_columns: optional column name -> ``[N]`` floats.
        class_weights: optional per-class weights of the ``pred`` decision.
        inside: optional bool ``[N]`` of the assessed rows.

    Returns:
        A new ``LandmarkTable``.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(len(table), 3)
    inside = probabilities.sum(axis=1) > 0 if inside is None else np.asarray(inside, dtype=bool).reshape(len(table))

    def masked(values: np.ndarray, fmt: str = "{:.4f}") -> list[str]:
        return [fmt.format(v) if ok else "" for v, ok in zip(values, inside)]

    pred = weighted_argmax(probabilities, class_weights, axis=1)
    out = table.with_column(INSIDE_COLUMN, [str(int(v)) for v in inside])
    out = out.with_column("pred", masked(pred, "{:d}"))
    for j, name in enumerate(PROBABILITY_COLUMNS):
        out = out.with_column(name, masked(probabilities[:, j]))
    if step_classes is not None:
        steps = np.asarray(step_classes).reshape(len(table), -1).astype(int)
        for k, name in enumerate(step_columns(steps.shape[1])):
            out = out.with_column(name, masked(steps[:, k], "{:d}"))
    for name, values in (extra_columns or {}).items():
        out = out.with_column(name, masked(np.asarray(values, dtype=np.float64).reshape(len(table))))
    return out


def assessed_rows(table: LandmarkTable) -> np.ndarray:
    """Which rows of a prediction table were assessed (bool ``[N]``): ``inside`` 1 and a ``pred``; every row of a
    table written before the ``inside`` column existed."""
    inside = table.values.get(INSIDE_COLUMN)
    pred = table.values.get("pred")
    keep = np.ones(len(table), dtype=bool)
    if inside is not None:
        keep &= np.array([v.strip() == "1" for v in inside], dtype=bool)
    if pred is not None:
        keep &= np.array([v.strip() != "" for v in pred], dtype=bool)
    return keep


def write_landmark_predictions(
    path: str | os.PathLike,
    table: LandmarkTable,
    probabilities: np.ndarray,
    step_classes: Optional[np.ndarray] = None,
    extra_columns: Optional[Mapping[str, np.ndarray]] = None,
    class_weights: Optional[Sequence[float]] = None,
    inside: Optional[np.ndarray] = None,
) -> Path:
    """Write ``with_predictions(table, ...)`` to ``path`` atomically.

    Args:
        path: output CSV file.
        table: landmark table with N rows.
        probabilities: ``[N, 3]`` class probabilities.
        step_classes: optional ``[N, S]`` coarse group indices of the earlier LSTM steps.
        extra_columns: optional column name -> ``[N]`` floats.
        class_weights: optional per-class weights of the ``pred`` decision.
        inside: optional bool ``[N]`` of the assessed rows.

    Returns:
        The written path.
    """
    return write_landmarks(
        with_predictions(table, probabilities, step_classes, extra_columns, class_weights, inside), path
    )


def sample_nearest(volume: np.ndarray, grid: Grid, points: np.ndarray) -> np.ndarray:
    """Values of a ``[C, z, y, x]`` volume on ``grid`` at the voxels nearest to physical points ``[N, 3]`` (mm) ->
    ``[N, C]``.

    Args:
        volume: ``[C, z, y, x]`` array on ``grid``.
        grid: grid of the volume.
        points: ``[N, 3]`` physical points, LPS mm (x-y-z order); indices are clipped to the grid.

    Returns:
        Array ``[N, C]`` of ``volume``'s dtype.
    """
    index = np.rint(grid.continuous_index(points)).astype(int)  # (x, y, z)
    index = np.clip(index, 0, np.asarray(grid.size) - 1)
    return np.asarray(volume)[:, index[:, 2], index[:, 1], index[:, 0]].T
