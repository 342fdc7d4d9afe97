"""A small synthetic chest CT for the artificial-deformation tests: body at about 0 HU, two lungs at -850 HU with
vessels, a gas pocket below the lungs, axis-aligned LPS geometry (array z grows towards the head)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage


def chest_phantom_arrays(shape=(64, 64, 64), seed: int = 0, gas: bool = True):
    """``(z, y, x)`` HU array and the true body and lung masks (bool) of the phantom (coordinates in voxels)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.7) ** 2 < 1
    body &= np.abs(z) < 0.95
    lungs = np.zeros(shape, dtype=bool)
    for cx in (-0.4, 0.4):
        lungs |= ((x - cx) / 0.3) ** 2 + (y / 0.45) ** 2 + ((z - 0.15) / 0.65) ** 2 < 1
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) * 60
    hu = np.full(shape, -1024.0)
    hu[body] = 20.0 + texture[body]
    hu[lungs] = -850.0 + 0.5 * texture[lungs]
    vessels = np.zeros(shape, dtype=bool)
    for cx, cy in ((-0.4, 0.1), (-0.35, -0.2), (0.4, 0.0), (0.45, 0.25)):
        vessels |= ((x - cx) ** 2 + (y - cy) ** 2 < 0.04**2) & lungs
    hu[vessels] = 40.0
    if gas:
        pocket = ((x - 0.2) / 0.12) ** 2 + ((y + 0.1) / 0.12) ** 2 + ((z + 0.75) / 0.08) ** 2 < 1
        hu[pocket] = -950.0
    return hu.astype(np.float32), body, lungs


def to_image(array: np.ndarray, spacing: float = 2.0) -> sitk.Image:
    """SimpleITK image of a ``(z, y, x)`` array with isotropic ``spacing`` mm and identity direction."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((spacing,) * 3)
    image.SetOrigin((-100.0, -80.0, -300.0))
    return image


def chest_phantom(shape=(64, 64, 64), spacing: float = 2.0, seed: int = 0, gas: bool = True) -> sitk.Image:
    """The phantom as a float32 HU SimpleITK image."""
    return to_image(chest_phantom_arrays(shape, seed, gas)[0], spacing)
