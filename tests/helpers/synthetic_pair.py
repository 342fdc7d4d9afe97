"""A small synthetic CT pair for the inference tests: the chest phantom of ``tests.helpers.chest_phantom``, the moving
image shifted by a few millimetres, and a landmark table with a ``tre`` column."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import SimpleITK as sitk

from tests.helpers.chest_phantom import chest_phantom_arrays

SPACING_MM = 1.5
ORIGIN_MM = (-20.0, 10.0, -100.0)


def phantom_hu(size: Tuple[int, int, int] = (24, 24, 24), seed: int = 0) -> np.ndarray:
    """A ``(z, y, x)`` HU array: ``tests.helpers.chest_phantom`` (body, two lungs, vessels, air -1024) without gas."""
    return chest_phantom_arrays(size, seed, gas=False)[0].astype(np.float64)


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
