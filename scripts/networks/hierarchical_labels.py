"""Hierarchical misalignment labels: the LSTM's coarse-to-fine splits and the grouping of fine labels.

A split such as "6-3-1" adds one threshold per LSTM step (6 mm, then 3 mm, then 1 mm). The fine labels are the
intervals between all thresholds; step ``k`` is scored on the groups made by its first ``k`` thresholds, and the
final answer merges fine labels into correct [0,3), poor [3,6), wrong [6,inf) (docs/method.md section 5).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from scripts.utils.constants import CLASS_THRESHOLDS_MM

SPLITS: dict[str, tuple[float, ...]] = {
    "6-3-1": (6.0, 3.0, 1.0),
    "12-6-3": (12.0, 6.0, 3.0),
    "6-3-3": (6.0, 3.0, 3.0),
}


def split_thresholds(split: str) -> tuple[float, ...]:
    """The per-step thresholds (mm) of a split name, with a clear error for an unknown one."""
    if split not in SPLITS:
        raise ValueError(f"unknown LSTM split {split!r}; choose one of {sorted(SPLITS)}")
    return SPLITS[split]


@lru_cache(maxsize=None)
def step_edges(split: str) -> tuple[tuple[float, ...], ...]:
    """Sorted distinct thresholds seen by each step; the last step's edges define the fine labels."""
    thresholds = split_thresholds(split)
    return tuple(tuple(sorted(set(thresholds[: k + 1]))) for k in range(len(thresholds)))


def fine_edges(split: str) -> tuple[float, ...]:
    """Thresholds that separate the fine labels (those of the last step)."""
    return step_edges(split)[-1]


def num_fine_labels(split: str) -> int:
    """Number of fine labels every step's head predicts."""
    return len(fine_edges(split)) + 1


def _bucketize(magnitude: torch.Tensor, edges: tuple[float, ...]) -> torch.Tensor:
    boundaries = torch.tensor(edges, dtype=magnitude.dtype, device=magnitude.device)
    return torch.bucketize(magnitude, boundaries, right=True)  # edge value belongs to the upper class


def misalignment_classes(magnitude: torch.Tensor) -> torch.Tensor:
    """Correct (0), poor (1), wrong (2) from the misalignment magnitude in mm."""
    return _bucketize(magnitude, CLASS_THRESHOLDS_MM)


def hierarchical_labels(magnitude: torch.Tensor, split: str = "6-3-1") -> torch.Tensor:
    """Group index of every voxel at every LSTM step: shape ``[steps, *magnitude.shape]``, int64.

    Args:
        magnitude: misalignment magnitudes, mm (any shape).
        split: LSTM split name, e.g. "6-3-1" (a key of ``SPLITS``).

    Returns:
        int64 tensor ``[steps, *magnitude.shape]``.

    Raises:
        ValueError: for an unknown ``split``.
    """
    return torch.stack([_bucketize(magnitude, edges) for edges in step_edges(split)])


def _grouping(fine: tuple[float, ...], coarse: tuple[float, ...]) -> torch.Tensor:
    lower = (0.0,) + fine  # lower bound of each fine interval decides its coarse group
    groups = _bucketize(torch.tensor(lower, dtype=torch.float64), coarse)
    matrix = torch.zeros(len(coarse) + 1, len(fine) + 1)
    matrix[groups, torch.arange(len(fine) + 1)] = 1.0
    return matrix


def step_grouping_matrices(split: str) -> list[torch.Tensor]:
    """For each step, a 0/1 matrix ``[n_groups, n_fine]``: group probability = matrix @ fine probabilities."""
    fine = fine_edges(split)
    return [_grouping(fine, edges) for edges in step_edges(split)]


def class_grouping_matrix(split: str) -> torch.Tensor:
    """``[3, n_fine]`` matrix merging fine labels into correct/poor/wrong."""
    fine = fine_edges(split)
    if not set(CLASS_THRESHOLDS_MM) <= set(fine):
        raise ValueError(f"split {split!r} does not separate the 3 and 6 mm classes")
    return _grouping(fine, CLASS_THRESHOLDS_MM)
