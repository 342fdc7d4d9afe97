"""Distinctive lung landmarks (vessel bifurcations, high local structure), spread over the lungs, as DIR-Lab did.

Förstner's interest measure on the 3-D structure tensor (det / trace: large only where the intensity varies in all
three directions, as at vessel bifurcations, small along straight vessels or walls), computed on a 1 mm isotropic
copy of the lung region; local maxima inside the eroded lung are taken strongest first with a minimum spacing
(greedy, own code: a few lines, no library offers this distance-constrained selection). Arrays are (z, y, x).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage


def _lung_box_image(image: sitk.Image, lung: sitk.Image, spacing_mm: float, margin_mm: float = 10.0):
    """Image and lung mask resampled to isotropic ``spacing_mm`` over the lung's bounding box plus a margin."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(lung > 0, sitk.sitkUInt8))
    if not stats.HasLabel(1):
        raise ValueError("landmark selection: the lung mask is empty")
    x0, y0, z0, sx, sy, sz = stats.GetBoundingBox(1)
    corners = [
        np.array(lung.TransformIndexToPhysicalPoint([int(x), int(y), int(z)]))
        for x in (x0, x0 + sx - 1)
        for y in (y0, y0 + sy - 1)
        for z in (z0, z0 + sz - 1)
    ]
    low, high = np.min(corners, axis=0) - margin_mm, np.max(corners, axis=0) + margin_mm
    size = [int(np.ceil((h - lo) / spacing_mm)) + 1 for lo, h in zip(low, high)]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing([spacing_mm] * 3)
    ref.SetOrigin(tuple(low))  # identity direction: low corner is the origin in LPS
    hu = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, -1024.0)
    mask = sitk.Resample(lung, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return hu, mask


def forstner_measure(hu: np.ndarray, gradient_sigma: float = 1.0, window_sigma: float = 2.0) -> np.ndarray:
    """Förstner interest det(S) / trace(S) of the structure tensor S of a (z, y, x) array (sigmas in voxels).

    Args:
        hu: ``(z, y, x)`` image, HU.
        gradient_sigma: Gaussian sigma of the image gradient, voxels.
        window_sigma: Gaussian sigma of the structure-tensor window, voxels.

    Returns:
        Array of the shape of ``hu``.
    """
    grads = [ndimage.gaussian_filter(hu, gradient_sigma, order=tuple(int(a == b) for b in range(3))) for a in range(3)]
    tensor = {}
    for a in range(3):
        for b in range(a, 3):
            tensor[a, b] = ndimage.gaussian_filter(grads[a] * grads[b], window_sigma)
    del grads
    s = tensor
    det = (
        s[0, 0] * (s[1, 1] * s[2, 2] - s[1, 2] ** 2)
        - s[0, 1] * (s[0, 1] * s[2, 2] - s[1, 2] * s[0, 2])
        + s[0, 2] * (s[0, 1] * s[1, 2] - s[1, 1] * s[0, 2])
    )
    trace = s[0, 0] + s[1, 1] + s[2, 2]
    return det / np.maximum(trace, 1e-6)


def select_landmarks(
    image: sitk.Image,
    lung: sitk.Image,
    count: int = 300,
    min_spacing_mm: float = 15.0,
    boundary_mm: float = 4.0,
    spacing_mm: float = 1.0,
) -> np.ndarray:
    """``[count, 3]`` physical points (LPS mm) at Förstner maxima inside the lung, at least ``boundary_mm`` from
    its border and ``min_spacing_mm`` from each other (spacing lowered by 10 % steps if the lungs are too small).

    Args:
        image: CT image, HU.
        lung: lung mask on the grid of ``image``.
        count: number of landmarks.
        min_spacing_mm: initial minimum distance between landmarks, mm.
        boundary_mm: minimum distance from the lung border, mm.
        spacing_mm: isotropic grid the selection runs on, mm.

    Returns:
        Array ``[count, 3]`` of physical points, LPS mm (x-y-z order), strongest Förstner maxima first.

    Raises:
        ValueError: when the lung holds fewer than ``count`` candidates or they cannot be placed.
    """
    hu_img, mask_img = _lung_box_image(image, lung, spacing_mm)
    hu = sitk.GetArrayFromImage(hu_img)
    inside = ndimage.binary_erosion(
        sitk.GetArrayFromImage(mask_img) > 0, iterations=max(1, round(boundary_mm / spacing_mm))
    )
    measure = forstner_measure(hu, 1.0 / spacing_mm, 2.0 / spacing_mm)
    peaks = (measure == ndimage.maximum_filter(measure, size=max(3, round(5.0 / spacing_mm)))) & inside
    peaks &= measure > 0
    index = np.argwhere(peaks)  # (z, y, x)
    if len(index) < count:
        raise ValueError(f"landmark selection: only {len(index)} candidate points in the lung, need {count}")
    order = np.argsort(-measure[peaks])
    index = index[order]
    points = np.array(hu_img.GetOrigin()) + index[:, ::-1] * spacing_mm  # identity direction (see _lung_box_image)
    spacing = min_spacing_mm
    while spacing > 1.0:
        chosen = np.empty((0, 3))
        for p in points:
            if len(chosen) and np.min(np.sum((chosen - p) ** 2, axis=1)) < spacing**2:
                continue
            chosen = np.vstack([chosen, p])
            if len(chosen) == count:
                return chosen
        spacing *= 0.9
    raise ValueError(f"landmark selection: could not place {count} landmarks in the lung")
