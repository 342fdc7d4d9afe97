"""A small synthetic chest-like CT pair for the inference tests: a body cylinder with two air-filled lungs, the
moving image shifted by a few millimetres, and a landmark table with a ``tre`` column."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import SimpleITK as sitk

SPACING_MM = 1.5
ORIGIN_MM = (-20.0, 10.0, -100.0)


def phantom_hu(size: Tuple[int, int, int] = (24, 24, 24), seed: int = 0) -> np.ndarray:
    """A ``(z, y, x)`` HU array: air -1000, soft tissue 40, lungs -850, 20 HU noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=float) for n in size], indexing="ij")
    cz, cy, cx = [(n - 1) / 2 for n in size]
    body = ((x - cx) / (0.45 * size[2])) ** 2 + ((y - cy) / (0.4 * size[1])) ** 2 < 1
    lung = ((np.abs(x - cx) - 0.2 * size[2]) / (0.13 * size[2])) ** 2 + ((y - cy) / (0.25 * size[1])) ** 2 + (
        (z - cz) / (0.4 * size[0])
    ) ** 2 < 1
    hu = np.full(size, -1000.0)
    hu[body] = 40.0
    hu[body & lung] = -850.0
    return hu + rng.normal(0.0, 20.0, size)


def image_from_array(array: np.ndarray, spacing: float = SPACING_MM, origin=ORIGIN_MM) -> sitk.Image:
    """A SimpleITK image of a ``(z, y, x)`` array with the test geometry."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((spacing,) * 3)
    image.SetOrigin(origin)
    return image


def write_pair(folder: Path, size: Tuple[int, int, int] = (24, 24, 24), shift_voxels: int = 2) -> Dict[str, Path]:
    """Write ``fixed.nii.gz``, ``moving.nii.gz`` (int16; moving shifted along x) and ``landmarks.csv`` (id, x, y,
    z, tre: five points in the lungs) into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    hu = phantom_hu(size)
    paths = {
        "fixed": folder / "fixed.nii.gz",
        "moving": folder / "moving.nii.gz",
        "landmarks": folder / "landmarks.csv",
    }
    sitk.WriteImage(image_from_array(hu.astype(np.int16)), str(paths["fixed"]))
    sitk.WriteImage(image_from_array(np.roll(hu, shift_voxels, axis=2).astype(np.int16)), str(paths["moving"]))
    fixed = sitk.ReadImage(str(paths["fixed"]))
    cz, cy, cx = [(n - 1) / 2 for n in size]
    offsets = [(-0.2, 0.0), (0.2, 0.0), (-0.2, 0.15), (0.2, -0.15), (0.0, 0.0)]
    tre = [1.0, 4.0, 8.0, 2.0, 3.0]
    rows = ["id,x,y,z,tre"]
    for i, ((dx, dz), t) in enumerate(zip(offsets, tre)):
        p = fixed.TransformContinuousIndexToPhysicalPoint((cx + dx * size[2], cy, cz + dz * size[0]))
        rows.append(f"{i},{p[0]:.3f},{p[1]:.3f},{p[2]:.3f},{t}")
    paths["landmarks"].write_text("\n".join(rows) + "\n")
    return paths
