"""Inputs and outputs shared by the baselines of the benchmark (RegNet-t, local NCC): one fixed image, several
registered moving images, landmark points on the fixed image's 1 mm LPS grid, per-landmark class CSVs.

The fixed image is read and resampled once (scripts.data.image_io: cubic B-spline, 1 mm, LPS, same extent); every moving
image (already on the fixed grid after registration, or not) is resampled onto the same 1 mm grid. Each image is set
to ``BACKGROUND_HU`` outside its own body mask (scripts.transforms.ct_masks.body_mask_array), as in training and in the
inference contract. Arrays are (z, y, x); points are returned as continuous 1 mm voxel coordinates (z, y, x).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from scripts.data.image_io import Grid, image_stem, isotropic_grid, read_image, resample
from scripts.data.landmark_csv import LandmarkTable
from scripts.data.landmarks import read_landmarks_in_image, write_landmark_predictions
from scripts.transforms.ct_masks import body_mask_array
from scripts.utils.constants import BACKGROUND_HU


class OneMillimetreFixed:
    """The fixed image on its 1 mm LPS grid (``hu``, float32 (z, y, x), background outside the body) and helpers
    that put moving images and landmark points on that grid."""

    def __init__(self, fixed_path: str | os.PathLike, spacing: float = 1.0) -> None:
        self.path = Path(fixed_path)
        image = read_image(self.path, "fixed image")
        self.fixed_grid = Grid.of(image)
        self.grid = isotropic_grid(image, spacing)
        self.hu = self._masked(image)

    def _masked(self, image) -> np.ndarray:
        import SimpleITK as sitk  # local: keeps the module import light for the config parser

        hu = sitk.GetArrayFromImage(resample(image, self.grid)).astype(np.float32)
        hu[~body_mask_array(hu)] = BACKGROUND_HU
        return hu

    def moving(self, moving_path: str | os.PathLike) -> np.ndarray:
        """A (registered) moving image resampled onto the 1 mm grid, background outside its body; (z, y, x)."""
        return self._masked(read_image(moving_path, "moving image"))

    def landmarks(self, path: str | os.PathLike) -> tuple[LandmarkTable, np.ndarray]:
        """The landmark table (points checked to lie in the fixed image) and its points as continuous 1 mm voxel
        coordinates ``[N, 3]`` in (z, y, x) order."""
        table = read_landmarks_in_image(path, self.fixed_grid, str(self.path))
        return table, self.grid.continuous_index(table.points())[:, ::-1].copy()


def write_class_predictions(
    table: LandmarkTable,
    classes: np.ndarray,
    moving_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """``<output_dir>/<moving stem>_landmarks.csv``: the input table plus ``pred``, one-hot ``p_correct, p_poor,
    p_wrong`` (a thresholding baseline has no probabilities) and the ``extra`` columns (e.g. the score thresholded).

    Args:
        table: landmark table of the assessed points.
        classes: ``[N]`` predicted class (0 correct, 1 poor, 2 wrong) per landmark.
        moving_path: registered moving image; its stem names the CSV.
        output_dir: folder of the CSV.
        extra: optional column name -> ``[N]`` values added to the table.

    Returns:
        Path of the written CSV.
    """
    for name, column in (extra or {}).items():
        table = table.with_column(name, np.asarray(column, dtype=np.float64))
    one_hot = np.eye(3)[np.asarray(classes, dtype=np.int64)]
    return write_landmark_predictions(Path(output_dir) / f"{image_stem(moving_path)}_landmarks.csv", table, one_hot)
