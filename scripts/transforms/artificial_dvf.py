"""Artificial displacement fields of paper section II-B with the settings of docs/method.md section 6.

Four types with random parameters: single frequency, mixed frequency, respiratory motion and identity, plus the
"next image" field that first deforms the scan itself to multiply anatomical variety. Convention everywhere:
``I_def(x) = I(x + u(x))``, ``u`` in millimetres along the physical axes.

Arrays are numpy ``(z, y, x)`` (SimpleITK order) on an axis-aligned grid (identity direction, so array axes are
physical axes and array index z grows towards the head, LPS); a DVF array is ``[3, z, y, x]`` with components in
SimpleITK vector order ``(x, y, z)``. Fields are generated on a coarse grid (``DVF_GRID_FACTOR`` x the image
spacing, samples on image voxels ``DVF_GRID_FACTOR * j`` as in scripts.transforms.pyramid): every field is smoothed over
5-20 mm, so this loses nothing and is 8x cheaper. The dense field on the image grid is, by definition, the linear
interpolation of the coarse one (``upsample_dvf``; SimpleITK's DisplacementFieldTransform computes the same).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from scipy import ndimage

from scripts.transforms.pyramid import smooth_downsample

DVF_GRID_FACTOR = 2  # the DVF lives on every 2nd image voxel (2 mm for a 1 mm image)
REFERENCE_LUNG_ML = 4000.0  # mixed frequency: lung volume for which the original iteration counts are used
DVF_TYPES = ("single_frequency", "mixed_frequency", "respiratory_motion", "identity")

# the 14 DVFs per image of the original code (deform_exp "D14": 4 respiratory, 5 single, 4 mixed, 1 zero); with and
# without the "next image" step this gives the paper's 28 DVFs per scan
DVF_RECIPE: tuple[tuple[str, int], ...] = tuple(
    [("respiratory_motion", v) for v in range(4)]
    + [("single_frequency", v) for v in range(5)]
    + [("mixed_frequency", v) for v in range(4)]
    + [("identity", 0)]
)


@dataclass(frozen=True)
class DVFSettings:
    """Parameters of every DVF type for one maximum deformation ``M`` (mm per axis); grid sizes in mm (x, y, z)."""

    max_deformation_mm: float
    single_grid_mm: tuple[tuple[float, float, float], ...]
    single_amplitude_ratio: tuple[float, ...]
    single_border_to_zero: tuple[int, ...] = (1, 1, 2, 2, 2)
    single_grid_sigma: float = 0.8  # Gaussian on the control-point grid, in control points
    body_sigma_voxels_1mm: float = 8.0  # smoothing after the torso mask: 8 voxels x M / 7 (at 1 mm)
    mixed_grid_mm: tuple[tuple[float, float, float], ...] = ((50, 50, 50), (40, 40, 40), (25, 25, 35), (20, 20, 30))
    mixed_sigma_mm: tuple[float, float] = (5.0, 10.0)
    mixed_grid_sigma: float = 0.5
    mixed_iterations: tuple[int, ...] = (200, 150, 150, 150)
    mixed_block_radius_mm: float = 20.0
    canny_thresholds_hu: tuple[float, float] = (50.0, 100.0)
    respiratory_t0_mm: float = 15.0
    respiratory_s0: float = 0.12
    respiratory_single_ratio: float = 0.5
    respiratory_cap_ratio: float = 1.2
    next_image_max_mm: float = 15.0
    next_image_noise_sigma_hu: float = 2.0

    def variants(self, dvf_type: str) -> int:
        """Number of parameter variants the recipe uses for ``dvf_type``."""
        return {"single_frequency": len(self.single_grid_mm), "mixed_frequency": len(self.mixed_grid_mm)}.get(
            dvf_type, 4 if dvf_type == "respiratory_motion" else 1
        )


# the original code's three settings (deform_exp 3D_max7/15/20_D14_K)
_ANCHORS = {
    7.0: dict(
        single_grid_mm=(50, 45, 35, 25, 20),
        single_amplitude_ratio=(0.5, 1, 1, 1, 1),
        mixed_grid_mm=((50, 50, 50), (40, 40, 40), (25, 25, 35), (20, 20, 30)),
        mixed_sigma_mm=(5.0, 10.0),
        respiratory_t0_mm=15.0,
    ),
    15.0: dict(
        single_grid_mm=(60, 50, 45, 40, 35),
        single_amplitude_ratio=(0.5, 1, 1, 1, 1),
        mixed_grid_mm=((60, 60, 60), (50, 50, 40), (40, 40, 80), (35, 35, 80)),
        mixed_sigma_mm=(7.0, 12.0),
        respiratory_t0_mm=22.0,
    ),
    20.0: dict(
        single_grid_mm=(80, 70, 60, 50, 45),
        single_amplitude_ratio=(1, 1, 1, 1, 1),
        mixed_grid_mm=((80, 80, 80), (60, 60, 60), (50, 50, 50), (45, 45, 60)),
        mixed_sigma_mm=(10.0, 15.0),
        respiratory_t0_mm=30.0,
    ),
}


def dvf_settings(max_deformation_mm: float = 10.0) -> DVFSettings:
    """Settings for ``M`` mm: the original code's values at M = 7, 15, 20 (RegNet^1, ^2, ^4), linearly
    interpolated in between (M = 10 for the misalignment network) and clamped outside."""
    if not max_deformation_mm > 0:
        raise ValueError(f"max_deformation_mm must be positive, got {max_deformation_mm}")
    keys = sorted(_ANCHORS)
    m = min(max(max_deformation_mm, keys[0]), keys[-1])
    hi = next(k for k in keys if k >= m)
    lo = keys[max(keys.index(hi) - 1, 0)]
    w = 0.0 if hi == lo else (m - lo) / (hi - lo)

    def mix(a, b):
        if isinstance(a, tuple):
            return tuple(mix(x, y) for x, y in zip(a, b))
        return float((1 - w) * a + w * b)

    values = {key: mix(_ANCHORS[lo][key], _ANCHORS[hi][key]) for key in _ANCHORS[lo]}
    values["single_grid_mm"] = tuple((g, g, g) for g in values["single_grid_mm"])
    return DVFSettings(max_deformation_mm=float(max_deformation_mm), **values)


# ----------------------------------------------------------------------------------------------- basic operations
def cap_components(dvf: np.ndarray, max_mm: float, min_mm: float | None = None) -> np.ndarray:
    """Rescale ``dvf`` so that no component exceeds ``max_mm`` (and the largest reaches at least ``min_mm``).

    Args:
        dvf: displacement field (any shape, typically ``[3, z, y, x]``), mm.
        max_mm: largest allowed absolute component, mm; a larger peak scales the whole field down.
        min_mm: if given, a non-zero field whose peak is below it is scaled up to reach it, mm.

    Returns:
        ``dvf`` itself if no rescaling is needed, otherwise a rescaled copy (same shape and dtype).
    """
    peak = float(np.abs(dvf).max()) if dvf.size else 0.0
    if peak > max_mm:
        return dvf * np.float32(max_mm / peak)
    if min_mm is not None and 0 < peak < min_mm:
        return dvf * np.float32(min_mm / peak)
    return dvf


def smooth_components(dvf: np.ndarray, sigma_mm, spacing_zyx: tuple[float, ...]) -> np.ndarray:
    """Gaussian smoothing of each component of a ``[3, z, y, x]`` field; ``sigma_mm`` scalar or one per component.

    Args:
        dvf: ``[C, z, y, x]`` field.
        sigma_mm: Gaussian sigma in mm, a scalar or one value per component.
        spacing_zyx: voxel spacing in mm, z-y-x order (converts ``sigma_mm`` to voxels per axis).

    Returns:
        Smoothed field, same shape and dtype as ``dvf`` (edges "nearest", truncated at 3 sigma).
    """
    sigmas = np.broadcast_to(np.asarray(sigma_mm, dtype=float), (dvf.shape[0],))
    out = np.empty_like(dvf)
    for c, s in enumerate(sigmas):
        out[c] = ndimage.gaussian_filter(dvf[c], sigma=[s / sp for sp in spacing_zyx], mode="nearest", truncate=3.0)
    return out


def _cubic_bspline(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    return np.where(t < 1, 2.0 / 3.0 - t**2 + t**3 / 2.0, np.where(t < 2, (2.0 - t) ** 3 / 6.0, 0.0))


def bspline_basis(num_samples: int, spacing_mm: float, num_cells: int) -> np.ndarray:
    """``[num_samples, num_cells + 3]`` weights of a uniform cubic B-spline whose ``num_cells`` cells span the axis.

    Args:
        num_samples: number of samples along the axis.
        spacing_mm: sample spacing along the axis, mm.
        num_cells: number of B-spline cells spanning the axis (``num_cells + 3`` control points).

    Returns:
        float32 array ``[num_samples, num_cells + 3]``; row i holds the basis weights of sample i.
    """
    extent = max((num_samples - 1) * spacing_mm, 1e-6)
    position = np.arange(num_samples) * spacing_mm / (extent / num_cells)  # in cells
    return _cubic_bspline(position[:, None] - (np.arange(num_cells + 3)[None, :] - 1)).astype(np.float32)


def evaluate_bspline(
    coefficients: np.ndarray, shape_zyx: tuple[int, ...], spacing_zyx: tuple[float, ...]
) -> np.ndarray:
    """Dense ``[C, z, y, x]`` field of uniform cubic B-spline ``coefficients`` ``[C, cz, cy, cx]`` spanning the grid.

    Own code because the tensor-product evaluation is three small matrix products, about 100x faster than
    evaluating a SimpleITK BSplineTransform point by point.

    Args:
        coefficients: control-point values ``[C, cz, cy, cx]`` (``c - 3`` cells per axis).
        shape_zyx: size of the dense grid, z-y-x order, voxels.
        spacing_zyx: dense-grid spacing in mm, z-y-x order.

    Returns:
        float32 array ``[C, *shape_zyx]``.
    """
    bases = [bspline_basis(n, s, c - 3) for n, s, c in zip(shape_zyx, spacing_zyx, coefficients.shape[1:])]
    out = np.einsum("czyx,Xx->czyX", coefficients.astype(np.float32), bases[2], optimize=True)
    out = np.einsum("czyX,Yy->czYX", out, bases[1], optimize=True)
    return np.einsum("czYX,Zz->cZYX", out, bases[0], optimize=True)


def random_bspline_coefficients(
    rng: np.random.RandomState,
    shape_zyx: tuple[int, ...],
    spacing_zyx: tuple[float, ...],
    grid_mm_xyz: tuple[float, float, float],
    amplitude_mm: float,
    border_to_zero: int,
    grid_sigma: float,
    cap: tuple[float, float | None],
) -> np.ndarray:
    """Random control-point displacements ``[3, cz, cy, cx]`` as in the original code: uniform in +-4 x amplitude,
    ``border_to_zero`` outer control points zeroed (one more before smoothing), Gaussian-smoothed on the grid, then
    rescaled into ``cap`` = (max, min or None) mm.

    Args:
        rng: random state that draws the coefficients.
        shape_zyx: size of the grid the B-spline spans, z-y-x order, voxels.
        spacing_zyx: grid spacing in mm, z-y-x order.
        grid_mm_xyz: control-point spacing in mm, x-y-z order (the number of cells per axis is rounded, at least 1).
        amplitude_mm: amplitude; coefficients are drawn uniformly in +-4 x this value, mm.
        border_to_zero: number of outer control points zeroed on each side (at least one free point is kept per axis).
        grid_sigma: sigma of the Gaussian smoothing on the control-point grid, in control points.
        cap: ``(max_mm, min_mm or None)`` passed to ``cap_components``.

    Returns:
        float32 array ``[3, cz, cy, cx]`` of control-point displacements (components x, y, z), mm.
    """
    grid_zyx = grid_mm_xyz[::-1]
    cells = [max(1, int(round((n - 1) * s / g))) for n, s, g in zip(shape_zyx, spacing_zyx, grid_zyx)]
    size = [c + 3 for c in cells]
    coeff = rng.uniform(-4 * amplitude_mm, 4 * amplitude_mm, size=[3] + size).astype(np.float32)
    b = min([border_to_zero] + [(n - 1) // 2 - 1 for n in size])  # keep at least one free control point per axis
    if b > 0:
        inner = tuple([slice(None)] + [slice(b + 1, n - b - 1) for n in size])
        keep = np.zeros_like(coeff, dtype=bool)
        keep[inner] = True
        coeff = coeff * keep
    coeff = np.stack([ndimage.gaussian_filter(c, grid_sigma) for c in coeff])
    if b > 0:
        keep = np.zeros_like(coeff, dtype=bool)
        keep[tuple([slice(None)] + [slice(b, n - b) for n in size])] = True
        coeff = coeff * keep
    return cap_components(coeff, cap[0], cap[1])


def upsample_dvf(dvf: np.ndarray | torch.Tensor, factor: int, shape_zyx: tuple[int, ...]) -> torch.Tensor:
    """Dense ``[3, z, y, x]`` float32 field on the image grid from the coarse one: sample j of the coarse grid lies
    on image voxel ``factor * j``; linear in between (the definition of the dense field).

    Args:
        dvf: coarse ``[3, z, y, x]`` field (numpy array or tensor), mm.
        factor: coarse-grid spacing in image voxels (1 only crops).
        shape_zyx: size of the image grid, z-y-x order, voxels; the result is cropped to it.

    Returns:
        float32 tensor ``[3, *shape_zyx]``.
    """
    coarse = torch.as_tensor(dvf, dtype=torch.float32)
    if factor == 1:
        return coarse[:, : shape_zyx[0], : shape_zyx[1], : shape_zyx[2]]
    size = [factor * (n - 1) + 1 for n in coarse.shape[1:]]
    dense = F.interpolate(coarse[None], size=size, mode="trilinear", align_corners=True)[0]
    return dense[:, : shape_zyx[0], : shape_zyx[1], : shape_zyx[2]]


def coarse_shape(shape_zyx: tuple[int, ...], factor: int = DVF_GRID_FACTOR) -> tuple[int, ...]:
    """Coarse-grid size covering an image of ``shape_zyx`` (last sample at or beyond the last voxel).

    Args:
        shape_zyx: image size, z-y-x order, voxels.
        factor: coarse-grid spacing in image voxels.

    Returns:
        Coarse-grid size, z-y-x order.
    """
    return tuple((n - 1 + factor - 1) // factor + 1 for n in shape_zyx)


def to_coarse_mask(mask: np.ndarray, factor: int = DVF_GRID_FACTOR) -> np.ndarray:
    """Nearest-neighbour sample of a ``(z, y, x)`` mask on the coarse grid (voxels ``factor * j``, edge replicated).

    Args:
        mask: ``(z, y, x)`` mask on the image grid.
        factor: coarse-grid spacing in image voxels.

    Returns:
        bool array of size ``coarse_shape(mask.shape, factor)``.
    """
    idx = [np.minimum(np.arange(m) * factor, n - 1) for m, n in zip(coarse_shape(mask.shape, factor), mask.shape)]
    return mask[np.ix_(*idx)].astype(bool)


def to_coarse_image(image: np.ndarray, factor: int = DVF_GRID_FACTOR) -> np.ndarray:
    """Image on the coarse grid with the pyramid's smoothing down-sampling (scripts.transforms.pyramid).

    Args:
        image: ``(z, y, x)`` image on the image grid (e.g. HU).
        factor: coarse-grid spacing in image voxels (down-sampling factor).

    Returns:
        float32 ``(z, y, x)`` array on the coarse grid.
    """
    return smooth_downsample(torch.tensor(np.asarray(image), dtype=torch.float32)[None, None], factor)[0, 0].numpy()


def jacobian_determinant(dvf: np.ndarray, spacing_zyx: tuple[float, ...]) -> np.ndarray:
    """Determinant of the Jacobian of ``x + u(x)`` for a ``[3, z, y, x]`` field (components x, y, z, mm).

    Args:
        dvf: ``[3, z, y, x]`` field, components x-y-z, mm.
        spacing_zyx: voxel spacing in mm, z-y-x order.

    Returns:
        float32 ``(z, y, x)`` array of determinants (1 where the field is locally a translation).
    """
    # grads[c][a]: derivative of component c (x, y, z) along physical axis a (x, y, z)
    grads = [np.gradient(dvf[c], *spacing_zyx)[::-1] for c in range(3)]
    j = [[grads[c][a] + (1.0 if a == c else 0.0) for a in range(3)] for c in range(3)]
    det = (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )
    return det.astype(np.float32)


# ----------------------------------------------------------------------------------------------------- DVF types
def identity_dvf(shape_zyx: tuple[int, ...]) -> np.ndarray:
    """Zero field: the pair then differs only by the intensity changes."""
    return np.zeros((3,) + tuple(shape_zyx), dtype=np.float32)


def single_frequency_dvf(
    rng: np.random.RandomState,
    body: np.ndarray | None,
    spacing_zyx: tuple[float, ...],
    max_mm: float,
    grid_mm_xyz: tuple[float, float, float],
    border_to_zero: int = 2,
    grid_sigma: float = 0.8,
    body_sigma_mm: float | None = None,
    shape_zyx: tuple[int, ...] | None = None,
) -> np.ndarray:
    """One random spatial frequency: a perturbed B-spline grid (coefficients capped at 1.7 M), times the torso mask
    and smoothed with ``body_sigma_mm`` (skipped if ``body`` is None), no component above ``max_mm``.

    Args:
        rng: random state.
        body: ``(z, y, x)`` torso mask; None for no masking and smoothing (then ``shape_zyx`` is needed).
        spacing_zyx: grid spacing in mm, z-y-x order.
        max_mm: maximum deformation M, mm per component.
        grid_mm_xyz: B-spline control-point spacing in mm, x-y-z order.
        border_to_zero: outer control points zeroed per side.
        grid_sigma: Gaussian sigma on the control-point grid, in control points.
        body_sigma_mm: smoothing after the torso mask, mm (used only with ``body``).
        shape_zyx: grid size, z-y-x order, voxels; only used when ``body`` is None.

    Returns:
        float32 ``[3, z, y, x]`` field (components x-y-z), mm.
    """
    shape = tuple(body.shape) if body is not None else tuple(shape_zyx)
    coeff = random_bspline_coefficients(
        rng, shape, spacing_zyx, grid_mm_xyz, max_mm, border_to_zero, grid_sigma, (1.7 * max_mm, None)
    )
    dvf = evaluate_bspline(coeff, shape, spacing_zyx)
    if body is not None:
        dvf = smooth_components(dvf * body[None], body_sigma_mm, spacing_zyx)
    return cap_components(dvf, max_mm).astype(np.float32)


def _edge_regions(
    rng: np.random.RandomState,
    edges: np.ndarray,
    iterations: int,
    block_radius: int,
) -> np.ndarray:
    """Per component, the edge voxels grown and cut in random blocks (the original code's schedule: first 10/12 of
    the iterations cut blocks, then grow inside blocks, then grow in one random direction)."""
    shape = edges.shape
    grown = np.stack([ndimage.binary_dilation(edges, structure=np.ones((3, 3, 3), dtype=bool))] * 3)
    available = np.stack([edges] * 3)
    candidates = [np.flatnonzero(edges)] * 3
    cut_until, grow_until = round(10 * iterations / 12), round(11 * iterations / 12)
    struct18 = ndimage.generate_binary_structure(3, 2)
    for it in range(1, iterations):
        if min(len(c) for c in candidates) <= 4:
            break
        for comp in range(3):
            centre = np.unravel_index(candidates[comp][rng.randint(0, len(candidates[comp]) - 1)], shape)
            lo = [max(0, c - block_radius) for c in centre]
            hi = [min(n, c + block_radius) for c, n in zip(centre, shape)]
            block = tuple(slice(a, b) for a, b in zip(lo, hi))
            stop_here = False
            if it < cut_until:
                grown[comp][block] = False
                stop_here = True
            else:
                if it < grow_until:
                    struct = struct18
                    stop_here = it % 2 == 0
                else:
                    struct = np.zeros((5, 5, 5), dtype=bool)  # one-sided growth, 9^3 at 1 mm scaled to 2 mm
                    sl = [slice(None)] * 3
                    sl[it % 3] = slice(0, 3)
                    struct[tuple(sl)] = True
                    stop_here = rng.uniform() > 0.3
                pad = 2
                outer = tuple(slice(max(0, a - pad), min(n, b + pad)) for a, b, n in zip(lo, hi, shape))
                inner = tuple(slice(a - o.start, b - o.start) for a, b, o in zip(lo, hi, outer))
                local = grown[comp][outer]
                dilated = ndimage.binary_dilation(local, structure=struct)
                local[inner] = dilated[inner]  # growth limited to the block, as the original's mask argument
            if stop_here:
                available[comp][block] = False
        if it >= cut_until:
            candidates = [np.flatnonzero(a) for a in available]
    return grown


def mixed_frequency_dvf(
    rng: np.random.RandomState,
    image: np.ndarray,
    lung: np.ndarray,
    spacing_zyx: tuple[float, ...],
    max_mm: float,
    grid_mm_xyz: tuple[float, float, float],
    sigma_range_mm: tuple[float, float] = (5.0, 10.0),
    iterations: int = 150,
    block_radius_mm: float = 20.0,
    grid_sigma: float = 0.5,
    canny_thresholds_hu: tuple[float, float] = (50.0, 100.0),
) -> np.ndarray:
    """Local, sharper motion: Canny edges (HU) inside the dilated lung, grown and cut in random blocks, times a
    B-spline field with coefficients in [M, 2M], each component smoothed with a random sigma, capped at M.

    Args:
        rng: random state.
        image: ``(z, y, x)`` image, HU.
        lung: ``(z, y, x)`` lung mask (bool), same grid as ``image``.
        spacing_zyx: grid spacing in mm, z-y-x order.
        max_mm: maximum deformation M, mm per component.
        grid_mm_xyz: B-spline control-point spacing in mm, x-y-z order.
        sigma_range_mm: range of the random per-component smoothing sigma, mm.
        iterations: grow/cut iterations for an adult lung of ``REFERENCE_LUNG_ML``; scaled down with the lung volume
            (at least 12).
        block_radius_mm: radius of the random blocks that cut and grow the edge regions, mm.
        grid_sigma: Gaussian sigma on the control-point grid, in control points.
        canny_thresholds_hu: lower and upper Canny thresholds, HU.

    Returns:
        float32 ``[3, z, y, x]`` field (components x-y-z), mm.
    """
    image_sitk = sitk.GetImageFromArray(image.astype(np.float32))
    image_sitk.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    canny = (
        sitk.GetArrayFromImage(sitk.CannyEdgeDetection(image_sitk, *canny_thresholds_hu)) > 0
    )  # a view would outlive its image
    edges = canny & ndimage.binary_dilation(lung)
    radius = max(1, int(round(block_radius_mm / float(np.mean(spacing_zyx)))))
    # the schedule was tuned on adult lungs: scale it with the lung volume, or small lungs lose every edge region
    lung_ml = float(lung.sum()) * float(np.prod(spacing_zyx)) / 1000.0
    iterations = max(12, int(round(iterations * min(1.0, lung_ml / REFERENCE_LUNG_ML))))
    regions = _edge_regions(rng, edges, iterations, radius)
    coeff = random_bspline_coefficients(
        rng, lung.shape, spacing_zyx, grid_mm_xyz, max_mm, 0, grid_sigma, (2 * max_mm, max_mm)
    )
    dvf = evaluate_bspline(coeff, lung.shape, spacing_zyx) * regions
    sigma = rng.uniform(sigma_range_mm[0], sigma_range_mm[1], size=3)
    return cap_components(smooth_components(dvf, sigma, spacing_zyx), max_mm).astype(np.float32)


def respiratory_profile(z_mm: np.ndarray, diaphragm_mm: float, extension_mm: float) -> np.ndarray:
    """1 below the lung base, fading logarithmically to 0 at ``extension_mm`` above it (half the lung height).

    Args:
        z_mm: positions along z (towards the head), mm.
        diaphragm_mm: z of the lung base, mm.
        extension_mm: distance above the base where the profile reaches 0, mm.

    Returns:
        Array like ``z_mm`` with values in [0, 1].
    """
    alpha = 1.3 / extension_mm
    rel = np.clip(z_mm - diaphragm_mm, 0.0, extension_mm)
    return 1.0 - np.log1p(rel * alpha) / math.log1p(extension_mm * alpha)


def respiratory_motion_dvf(
    rng: np.random.RandomState,
    body: np.ndarray,
    lung: np.ndarray,
    spacing_zyx: tuple[float, ...],
    max_mm: float,
    t0_mm: float,
    s0: float,
    grid_mm_xyz: tuple[float, float, float],
    border_to_zero: int = 2,
    grid_sigma: float = 0.8,
    single_ratio: float = 0.5,
    cap_ratio: float = 1.2,
    body_sigma_mm: float = 8.0,
) -> np.ndarray:
    """Breathing (Hub et al. 2009, as in the original code): the diaphragm moves cranio-caudally by t ~ U(0.8,1.1)
    t0 and the chest expands antero-posteriorly by s ~ U(0.8,1.1) s0 about a point near the spine, both fading
    logarithmically from the lung base to mid-lung; plus a half-size single-frequency field (z part x 0.3);
    torso-masked, smoothed, capped at ``cap_ratio`` x M. Array z must grow towards the head.

    Args:
        rng: random state.
        body: ``(z, y, x)`` torso mask.
        lung: ``(z, y, x)`` lung mask (bool), same grid.
        spacing_zyx: grid spacing in mm, z-y-x order.
        max_mm: maximum deformation M, mm.
        t0_mm: nominal cranio-caudal diaphragm motion, mm.
        s0: nominal antero-posterior expansion (relative, e.g. 0.12).
        grid_mm_xyz: control-point spacing of the added single-frequency field in mm, x-y-z order.
        border_to_zero: outer control points zeroed per side in the single-frequency field.
        grid_sigma: Gaussian sigma on the control-point grid, in control points.
        single_ratio: amplitude of the single-frequency field relative to M.
        cap_ratio: final cap relative to M.
        body_sigma_mm: smoothing after the torso mask, mm.

    Returns:
        float32 ``[3, z, y, x]`` field (components x-y-z), mm.

    Raises:
        ValueError: when ``lung`` is empty.
    """
    if not lung.any():
        raise ValueError("respiratory motion needs a lung mask; the given one is empty")
    t0 = rng.uniform(0.8 * t0_mm, 1.1 * t0_mm)
    s = rng.uniform(0.8 * s0, 1.1 * s0)
    z_index = np.flatnonzero(lung.any(axis=(1, 2)))
    y_index = np.flatnonzero(lung.any(axis=(0, 2)))
    diaphragm = z_index[0] * spacing_zyx[0]
    extension = max((z_index[-1] - z_index[0]) * spacing_zyx[0] / 2.0, spacing_zyx[0])
    centre_y = y_index[-1] * spacing_zyx[1] - rng.uniform(2, 12)  # about 10 mm in front of the lungs' back: spine
    profile = respiratory_profile(np.arange(lung.shape[0]) * spacing_zyx[0], diaphragm, extension).astype(np.float32)
    y_mm = (np.arange(lung.shape[1]) * spacing_zyx[1]).astype(np.float32)
    dvf = np.zeros((3,) + lung.shape, dtype=np.float32)
    dvf[2] = (t0 * profile)[:, None, None]  # I_def(x) = I(x + t): content moves caudally, as in inhalation
    dvf[1] = (-(y_mm[None, :] - centre_y) * s * profile[:, None])[:, :, None]  # antero-posterior expansion
    single = single_frequency_dvf(
        rng, None, spacing_zyx, single_ratio * max_mm, grid_mm_xyz, border_to_zero, grid_sigma, shape_zyx=lung.shape
    )
    single = cap_components(single, max_mm)
    single[2] *= 0.3
    dvf = smooth_components((dvf + single) * body[None], body_sigma_mm, spacing_zyx)
    return cap_components(dvf, cap_ratio * max_mm).astype(np.float32)


def draw_dvf(
    rng: np.random.RandomState,
    dvf_type: str,
    variant: int,
    image: np.ndarray,
    body: np.ndarray,
    lung: np.ndarray,
    spacing_zyx: tuple[float, ...],
    settings: DVFSettings,
) -> np.ndarray:
    """A ``[3, z, y, x]`` field of ``dvf_type`` (variant = index into the settings' lists) on the grid of the
    ``(z, y, x)`` arrays ``image`` (HU), ``body`` and ``lung`` (bool).

    Args:
        rng: random state.
        dvf_type: one of ``DVF_TYPES``.
        variant: parameter variant, taken modulo the length of the settings' lists.
        image: ``(z, y, x)`` image, HU (used by the mixed-frequency type).
        body: ``(z, y, x)`` torso mask.
        lung: ``(z, y, x)`` lung mask (bool).
        spacing_zyx: grid spacing in mm, z-y-x order.
        settings: parameters of every DVF type, e.g. from ``dvf_settings``.

    Returns:
        float32 ``[3, z, y, x]`` field (components x-y-z), mm.

    Raises:
        ValueError: when ``dvf_type`` is not one of ``DVF_TYPES``.
    """
    if dvf_type not in DVF_TYPES:
        raise ValueError(f"unknown DVF type {dvf_type!r}; choose one of {DVF_TYPES}")
    m = settings.max_deformation_mm
    body_sigma = settings.body_sigma_voxels_1mm * m / 7.0  # 8 voxels x M / 7 at 1 mm, in mm
    if dvf_type == "identity":
        return identity_dvf(body.shape)
    if dvf_type == "single_frequency":
        v = variant % len(settings.single_grid_mm)
        return single_frequency_dvf(
            rng,
            body,
            spacing_zyx,
            m * settings.single_amplitude_ratio[v],
            settings.single_grid_mm[v],
            settings.single_border_to_zero[v],
            settings.single_grid_sigma,
            body_sigma,
        )
    if dvf_type == "mixed_frequency":
        v = variant % len(settings.mixed_grid_mm)
        return mixed_frequency_dvf(
            rng,
            image,
            lung,
            spacing_zyx,
            m,
            settings.mixed_grid_mm[v],
            settings.mixed_sigma_mm,
            settings.mixed_iterations[v],
            settings.mixed_block_radius_mm,
            settings.mixed_grid_sigma,
            settings.canny_thresholds_hu,
        )
    v = variant % len(settings.single_grid_mm)
    return respiratory_motion_dvf(
        rng,
        body,
        lung,
        spacing_zyx,
        m,
        settings.respiratory_t0_mm,
        settings.respiratory_s0,
        settings.single_grid_mm[v],
        settings.single_border_to_zero[v],
        settings.single_grid_sigma,
        settings.respiratory_single_ratio,
        settings.respiratory_cap_ratio,
        body_sigma,
    )


def next_image_dvf(rng: np.random.RandomState, shape_zyx: tuple[int, ...], spacing_zyx, settings: DVFSettings):
    """The "next image" field: one single-frequency field of ``settings.next_image_max_mm`` (15 mm), not masked.

    Args:
        rng: random state.
        shape_zyx: grid size, z-y-x order, voxels.
        spacing_zyx: grid spacing in mm, z-y-x order.
        settings: DVF settings; uses ``next_image_max_mm`` and the first single-frequency variant.

    Returns:
        float32 ``[3, z, y, x]`` field (components x-y-z), mm.
    """
    return single_frequency_dvf(
        rng,
        None,
        spacing_zyx,
        settings.next_image_max_mm,
        settings.single_grid_mm[0],
        settings.single_border_to_zero[0],
        settings.single_grid_sigma,
        shape_zyx=shape_zyx,
    )


# ------------------------------------------------------------------------------------------------ SimpleITK glue
def dvf_to_sitk(dvf: np.ndarray, reference: sitk.Image, factor: int = DVF_GRID_FACTOR) -> sitk.Image:
    """Vector image (float32, components x, y, z) of a coarse ``[3, z, y, x]`` field for the 1 mm ``reference``.

    Args:
        dvf: coarse ``[3, z, y, x]`` field (components x-y-z), mm.
        reference: image whose origin and direction the field takes; its spacing is multiplied by ``factor``.
        factor: coarse-grid spacing in image voxels.

    Returns:
        SimpleITK float32 vector image on the coarse grid.
    """
    out = sitk.GetImageFromArray(np.moveaxis(np.asarray(dvf, dtype=np.float32), 0, -1), isVector=True)
    out.SetOrigin(reference.GetOrigin())
    out.SetDirection(reference.GetDirection())
    out.SetSpacing(tuple(factor * s for s in reference.GetSpacing()))
    return out


def dvf_from_sitk(dvf: sitk.Image) -> np.ndarray:
    """``[3, z, y, x]`` float32 array (components x, y, z) of a SimpleITK displacement field."""
    return np.ascontiguousarray(np.moveaxis(sitk.GetArrayFromImage(dvf).astype(np.float32), -1, 0))


def check_axis_aligned(image: sitk.Image, source: str = "image") -> None:
    """The generators need an identity direction (array axes = physical axes); prepare_data resamples onto one.

    Args:
        image: image to check.
        source: name used in the error message.

    Raises:
        ValueError: when the direction of ``image`` is not the identity (tolerance 1e-4).
    """
    if not np.allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-4):
        raise ValueError(f"{source}: direction {image.GetDirection()} is not the identity; resample it first")


def coarse_arrays(image: sitk.Image, body: sitk.Image, lung: sitk.Image, factor: int = DVF_GRID_FACTOR):
    """Image (HU), body and lung ``(z, y, x)`` arrays on the coarse DVF grid, and that grid's spacing (z, y, x).

    Args:
        image: CT image, HU, identity direction.
        body: torso mask on the grid of ``image`` (non-zero inside).
        lung: lung mask on the grid of ``image`` (non-zero inside).
        factor: coarse-grid spacing in image voxels.

    Returns:
        Tuple ``(image float32, body bool, lung bool, spacing_zyx)``: ``(z, y, x)`` arrays on the coarse grid and its
        spacing in mm, z-y-x order.
    """
    spacing = tuple(factor * s for s in image.GetSpacing()[::-1])
    return (
        to_coarse_image(sitk.GetArrayViewFromImage(image), factor),
        to_coarse_mask(sitk.GetArrayViewFromImage(body) > 0, factor),
        to_coarse_mask(sitk.GetArrayViewFromImage(lung) > 0, factor),
        spacing,
    )


# ---------------------------------------------------------------------------------------- MONAI dict transforms
class RandArtificialDVFd(Randomizable, MapTransform):
    """Draw an artificial DVF for ``data[image_key]`` (a 1 mm SimpleITK CT, identity direction) with its body and
    lung masks; writes ``data[dvf_key]`` (SimpleITK vector image on the coarse grid, mm), ``dvf_type``, ``variant``.

    ``dvf_type``/``variant`` fix the type; otherwise both are drawn uniformly from ``DVF_RECIPE``.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        body_key: str = "body_mask",
        lung_key: str = "lung_mask",
        dvf_key: str = "dvf",
        max_deformation_mm: float = 10.0,
        dvf_type: str | None = None,
        variant: int | None = None,
        settings: DVFSettings | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.body_key, self.lung_key, self.dvf_key = body_key, lung_key, dvf_key
        self.settings = settings or dvf_settings(max_deformation_mm)
        if dvf_type is not None and dvf_type not in DVF_TYPES:
            raise ValueError(f"unknown DVF type {dvf_type!r}; choose one of {DVF_TYPES}")
        self.dvf_type, self.variant = dvf_type, variant
        self._choice: tuple[str, int] = ("identity", 0)

    def randomize(self, data=None) -> None:
        """Pick the DVF type and parameter variant."""
        if self.dvf_type is None:
            self._choice = DVF_RECIPE[self.R.randint(len(DVF_RECIPE))]
        else:
            n = self.settings.variants(self.dvf_type)
            self._choice = (self.dvf_type, self.variant if self.variant is not None else self.R.randint(n))

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            check_axis_aligned(d[key], key)
            image, body, lung, spacing = coarse_arrays(d[key], d[self.body_key], d[self.lung_key])
            dvf = draw_dvf(self.R, self._choice[0], self._choice[1], image, body, lung, spacing, self.settings)
            d[self.dvf_key] = dvf_to_sitk(dvf, d[key])
            d["dvf_type"], d["variant"] = self._choice
        return d


def settings_with(settings: DVFSettings, **changes) -> DVFSettings:
    """A copy of ``settings`` with some fields changed (e.g. a larger respiratory cap)."""
    return replace(settings, **changes)
