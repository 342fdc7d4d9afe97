"""Views of a registered pair beyond the re-registration's |r|: what the multiview estimator's combiner reads.

A second registration of the same family lands in the user's optimum, so |r| alone is blind after a good B-spline.
Each view adds what |r| does not carry, per voxel of the pair's grid:

- ``residual``: log(1 + |r|), the re-registration's residual (``scripts.registration.reregistration``);
- ``neighbourhood``: log(1 + the largest |r| within 4 mm) and the Jacobian determinant of ``x + r(x)``;
- ``similarity``: local NCC and mean absolute HU difference of F and D before, and of F and D warped by r after the
  re-registration, in 7 mm windows, and the NCC gain (what r explains of the mismatch, and what it leaves);
- ``texture``: the fixed image's gradient magnitude and the smallest eigenvalue of its structure tensor (how much
  the image constrains a registration locally);
- ``lung``: signed distance to the lung boundary (mm, positive inside; sliding motion lives there);
- ``ants``: an independent engine, ANTs SyN with local cross-correlation (``scripts.registration.ants_registration``):
  log(1 + |r_ants|) and the disagreement |r - r_ants|. Off by default: it costs minutes on 2 cores;
- ``matching``: local block matching after the re-registration: the shift (up to 4 mm, whole voxels of the working
  grid) that maximises the local NCC of F and D warped by r, and how much it raises the NCC over no shift. Unlike r
  it is bound by no transform model or regularisation, so it can see a local misfit a smooth registration keeps;
- ``context``: the median and 90th percentile of |r| over the whole region, the same at every voxel: whether the
  pair is in the regime where a second registration recovers the error (large errors) or where it is blind (after a
  good B-spline), so the trees can weigh |r| against the other views by regime. Off by default.

Views run on an isotropic working grid (``ViewOptions.working_spacing_mm``) and are interpolated back onto the pair's
grid; |r| itself keeps the pair's resolution. ``ViewOptions.sha256`` names the settings a combiner was fitted for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from scripts.registration.ants_registration import AntsError, AntsOptions
from scripts.registration.ants_registration import register as ants_register
from scripts.registration.reregistration import RegistrationError
from scripts.transforms.ct_masks import body_mask_array, lung_mask_array

logger = logging.getLogger(__name__)

VIEW_FEATURES = {
    "residual": ("log1p_r",),
    "neighbourhood": ("log1p_max_r_4mm", "jacobian_r"),
    "similarity": ("ncc_before", "ncc_after", "ncc_gain", "abs_difference_before_hu", "abs_difference_after_hu"),
    "texture": ("gradient_hu_per_mm", "structure_min_eigenvalue"),
    "lung": ("lung_depth_mm",),
    "ants": ("log1p_r_ants", "r_disagreement_mm"),
    "context": ("log1p_median_r_region", "log1p_p90_r_region"),
    "matching": ("matching_shift_mm", "matching_ncc_gain"),
}
VIEWS = tuple(VIEW_FEATURES)
MONOTONE_FEATURES = ("log1p_r", "log1p_max_r_4mm")  # the combiner's outputs may only grow with these


class ViewError(RegistrationError):
    """A view failed on a pair (engine exception, non-finite values); the message names the pair and the view. A
    ``RegistrationError``, so a bundle run ends on it with that one message and writes nothing."""


@dataclass
class ViewOptions:
    """Settings of the views (their hash goes with a fitted combiner).

    Args:
        views: names of the views computed, from ``VIEWS`` ("residual" always).
        working_spacing_mm: isotropic grid the views run on (mm); None: the pair's own grid.
        window_mm: edge of the local NCC and difference windows, mm.
        neighbourhood_mm: radius of the max |r| neighbourhood, mm.
        texture_sigma_mm: Gaussian scale of the gradient and of the structure tensor's integration, mm.
        ants: settings of the ANTs SyN view.
        matching_window_mm: edge of the block matching's NCC windows, mm.
        matching_reach_mm: the largest shift the block matching tries, mm.
    """

    views: tuple[str, ...] = ("residual", "neighbourhood", "similarity", "texture", "lung", "matching")
    working_spacing_mm: float | None = 2.0
    window_mm: float = 7.0
    neighbourhood_mm: float = 4.0
    texture_sigma_mm: float = 1.5
    ants: AntsOptions = field(
        default_factory=lambda: AntsOptions(transform="syn", syn_metric="CC", syn_iterations=(40, 20, 10))
    )
    matching_window_mm: float = 6.0
    matching_reach_mm: float = 4.0

    def __post_init__(self) -> None:
        self.views = tuple(self.views)
        unknown = [v for v in self.views if v not in VIEWS]
        if unknown or "residual" not in self.views:
            raise ValueError(f"views must include 'residual' and come from {VIEWS}; got {self.views}")
        if isinstance(self.ants, dict):
            self.ants = AntsOptions(**self.ants)

    @property
    def features(self) -> tuple[str, ...]:
        """The feature names of the chosen views, in ``VIEWS`` order."""
        return tuple(name for view in VIEWS if view in self.views for name in VIEW_FEATURES[view])

    def sha256(self) -> str:
        """A digest of every setting that changes a feature (the thread count does not)."""
        settings = asdict(self)
        settings["views"] = sorted(self.views)
        settings["ants"] = {k: v for k, v in settings["ants"].items() if k != "threads"} if "ants" in self.views else {}
        if "matching" not in self.views:  # settings of a view that is off change no feature (nor older hashes)
            del settings["matching_window_mm"], settings["matching_reach_mm"]
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=list).encode()).hexdigest()


def _image(array: np.ndarray, spacing_xyz: Sequence[float]) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    return image


def _resample(image: sitk.Image, reference: sitk.Image, interpolator: int = sitk.sitkLinear) -> np.ndarray:
    """``image`` on ``reference``'s grid (nearest values past the border)."""
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(reference)
    resampler.SetInterpolator(interpolator)
    resampler.SetOutputPixelType(image.GetPixelID())
    resampler.SetUseNearestNeighborExtrapolator(True)
    return sitk.GetArrayFromImage(resampler.Execute(image))


def working_grid(shape_zyx: Sequence[int], spacing_xyz: Sequence[float], spacing_mm: float | None) -> sitk.Image:
    """An empty image on the isotropic working grid covering a pair of ``shape_zyx`` voxels of ``spacing_xyz``
    (the pair's own grid when ``spacing_mm`` is None or not coarser than every axis)."""
    spacing = np.asarray(spacing_xyz, dtype=float)
    if not spacing_mm or spacing_mm <= spacing.min():
        return _image(np.zeros(shape_zyx, np.uint8), spacing)
    size = np.maximum(1, np.round(np.asarray(shape_zyx[::-1]) * spacing / spacing_mm)).astype(int)
    reference = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    reference.SetSpacing((float(spacing_mm),) * 3)
    reference.SetOrigin(tuple((spacing_mm - spacing) / 2.0))  # the same box as the pair's voxels
    return reference


def local_ncc(a: np.ndarray, b: np.ndarray, size: int | Sequence[int] = 7) -> np.ndarray:
    """Normalised cross-correlation of ``a`` and ``b`` in windows of ``size`` voxels (0 where either is flat).

    Args:
        a: ``(z, y, x)`` image, HU.
        b: ``(z, y, x)`` image of the same shape, HU.
        size: window edge, voxels: one value or one per axis (z, y, x).

    Returns:
        float32 array of the same shape.
    """
    a, b = a.astype(np.float32), b.astype(np.float32)
    mean_a, mean_b = ndimage.uniform_filter(a, size), ndimage.uniform_filter(b, size)
    cov = ndimage.uniform_filter(a * b, size) - mean_a * mean_b
    var_a = ndimage.uniform_filter(a * a, size) - mean_a**2
    var_b = ndimage.uniform_filter(b * b, size) - mean_b**2
    denominator = np.sqrt(np.clip(var_a, 0, None) * np.clip(var_b, 0, None))
    return np.where(denominator > 1.0, cov / np.maximum(denominator, 1e-6), 0.0).astype(np.float32)


def local_best_shift(
    fixed: np.ndarray, moving: np.ndarray, size: int | Sequence[int], spacing_zyx: Sequence[float], reach_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Block matching: at every voxel the whole-voxel shift s (|s| <= ``reach_mm``) that maximises the local NCC of
    ``fixed(x)`` and ``moving(x + s)``, and the NCC gained over s = 0. One box filter per shift: the windows' means
    and variances are shifted, not recomputed. A shift must beat no shift by 0.001 to count (flat regions stay at 0).

    Args:
        fixed: ``(z, y, x)`` image, HU.
        moving: ``(z, y, x)`` image of the same shape, HU.
        size: NCC window edge, voxels: one value or one per axis (z, y, x).
        spacing_zyx: voxel spacing (z, y, x), mm.
        reach_mm: the largest shift tried, mm.

    Returns:
        Tuple ``(shift, gain)``: float32 ``[z, y, x, 3]`` shift (components x, y, z; mm, as r) and the ``(z, y, x)``
        NCC gain.
    """
    a, b = fixed.astype(np.float32), moving.astype(np.float32)
    mean_a, mean_b = ndimage.uniform_filter(a, size), ndimage.uniform_filter(b, size)
    var_a = np.clip(ndimage.uniform_filter(a * a, size) - mean_a**2, 0, None)
    var_b = np.clip(ndimage.uniform_filter(b * b, size) - mean_b**2, 0, None)
    spacing = np.asarray(spacing_zyx, dtype=float)
    reach = np.floor(reach_mm / spacing + 1e-9).astype(int)
    offsets = [
        o for o in np.ndindex(*(2 * reach + 1)) if np.sum(((np.array(o) - reach) * spacing) ** 2) <= reach_mm**2 + 1e-6
    ]
    offsets = sorted((tuple(int(v) for v in np.array(o) - reach) for o in offsets), key=lambda o: np.abs(o).sum())
    pad = [(int(r), int(r)) for r in reach]
    padded = [np.pad(x, pad, mode="edge") for x in (b, mean_b, var_b)]

    def shifted(x: np.ndarray, o: tuple[int, ...]) -> np.ndarray:
        return x[tuple(slice(r + d, r + d + n) for r, d, n in zip(reach, o, a.shape))]

    best = zero = None
    shift = np.zeros(a.shape + (3,), dtype=np.float32)
    for o in offsets:  # (0, 0, 0) first
        b_s, mean_s, var_s = (shifted(x, o) for x in padded)
        denominator = np.sqrt(var_a * var_s)
        cov = ndimage.uniform_filter(a * b_s, size) - mean_a * mean_s
        ncc = np.where(denominator > 1.0, cov / np.maximum(denominator, 1e-6), 0.0).astype(np.float32)
        if best is None:
            best, zero = ncc, ncc
            continue
        better = ncc > best + 1e-3
        best = np.where(better, ncc, best)
        shift[better] = (np.array(o) * spacing)[::-1]  # z, y, x offsets -> x, y, z components
    return shift, (best - zero).astype(np.float32)


def jacobian_determinant(field_zyx3: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """det(I + dr/dx) of a displacement ``[z, y, x, 3]`` (components x, y, z; mm) by central differences."""
    gradient = np.empty(field_zyx3.shape[:3] + (3, 3), dtype=np.float32)
    for axis in range(3):  # array axis z, y, x -> physical axis 2, 1, 0
        gradient[..., :, 2 - axis] = np.gradient(field_zyx3, spacing_zyx[axis], axis=axis)
    gradient += np.eye(3, dtype=np.float32)
    return np.linalg.det(gradient).astype(np.float32)


def smallest_structure_eigenvalue(image: np.ndarray, spacing_zyx: Sequence[float], sigma_mm: float) -> np.ndarray:
    """The smallest eigenvalue of the structure tensor (Gaussian-weighted outer product of the gradient at
    ``sigma_mm``): large only where the image has edges in every direction, where a registration is pinned down."""
    sigma = [sigma_mm / s for s in spacing_zyx]
    gradients = [
        ndimage.gaussian_filter(image, sigma, order=[int(a == axis) for a in range(3)]) / spacing_zyx[axis]
        for axis in range(3)
    ]
    tensor = np.empty(image.shape + (3, 3), dtype=np.float32)
    for i in range(3):
        for j in range(i, 3):
            tensor[..., i, j] = tensor[..., j, i] = ndimage.gaussian_filter(gradients[i] * gradients[j], sigma)
    return np.linalg.eigvalsh(tensor)[..., 0].astype(np.float32)


def warp_by(moving: np.ndarray, field_zyx3: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """``moving(x + r(x))`` with ``r [z, y, x, 3]`` (components x, y, z; mm), linear, nearest past the border."""
    grid = np.indices(moving.shape, dtype=np.float32)
    for axis in range(3):
        grid[axis] += field_zyx3[..., 2 - axis] / spacing_zyx[axis]
    return ndimage.map_coordinates(moving, grid, order=1, mode="nearest").astype(np.float32)


def compute_views(
    image: np.ndarray,
    residual: np.ndarray,
    region: np.ndarray,
    spacing_mm: float | Sequence[float],
    options: ViewOptions | None = None,
    name: str = "pair",
) -> tuple[np.ndarray, dict[str, float]]:
    """The features of ``options.views`` at every voxel of a loaded pair.

    Args:
        image: ``[2, z, y, x]`` HU (fixed, moving) on an axis-aligned grid.
        residual: ``[3, z, y, x]`` the re-registration's r on the same grid (components x, y, z; mm).
        region: ``(z, y, x)`` where the pair is assessed (the fixed image's body and lungs); the lung mask is found
            inside it.
        spacing_mm: voxel spacing, one value or (x, y, z) mm.
        options: the views' settings; None for the defaults.
        name: the pair's name in messages.

    Returns:
        Tuple ``(features, seconds)``: float32 ``[len(options.features), z, y, x]`` and the seconds each view took.

    Raises:
        ViewError: when a view fails or gives non-finite values.
    """
    options = options or ViewOptions()
    spacing_xyz = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))
    shape = image.shape[1:]
    seconds: dict[str, float] = {}
    out: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    magnitude = np.linalg.norm(residual, axis=0)
    out["log1p_r"] = np.log1p(magnitude)
    seconds["residual"] = time.perf_counter() - start
    if "context" in options.views:  # pair-level, on the pair's own grid: two numbers broadcast to every voxel
        t0 = time.perf_counter()
        inside = magnitude[region > 0] if np.any(region) else magnitude.ravel()
        for key, q in (("log1p_median_r_region", 50), ("log1p_p90_r_region", 90)):
            out[key] = np.full(shape, np.log1p(np.percentile(inside, q)), dtype=np.float32)
        seconds["context"] = time.perf_counter() - t0

    native = _image(np.zeros(shape, np.uint8), spacing_xyz)
    coarse = working_grid(shape, spacing_xyz, options.working_spacing_mm)
    spacing_c = np.array(coarse.GetSpacing())[::-1]  # z, y, x
    on_native = native.GetSize() == coarse.GetSize()

    def down(array: np.ndarray, smooth: bool = True, interpolator: int = sitk.sitkLinear) -> np.ndarray:
        if on_native:
            return array.astype(np.float32) if interpolator == sitk.sitkLinear else array
        src = _image(array.astype(np.float32) if interpolator == sitk.sitkLinear else array, spacing_xyz)
        if smooth:  # anti-aliasing before a coarser grid, along the axes that get coarser (not a thick slice's)
            sigma = [max(0.0, (options.working_spacing_mm - s) / 2) for s in spacing_xyz]
            if min(sigma) > 0:
                src = sitk.SmoothingRecursiveGaussian(src, sigma)
            elif max(sigma) > 0:  # the recursive filter refuses a zero sigma
                src = sitk.DiscreteGaussian(src, [v**2 for v in sigma], 32, 0.01, True)
        return _resample(src, coarse, interpolator)

    def up(array: np.ndarray) -> np.ndarray:
        if on_native:
            return array.astype(np.float32)
        src = _image(array.astype(np.float32), spacing_c[::-1])
        return _resample(src, native)

    timed = time.perf_counter()
    fixed_c, moving_c = down(image[0]), down(image[1])
    field_c = np.stack([down(c, smooth=False) for c in residual], axis=-1)  # [z, y, x, 3]
    region_c = down(region.astype(np.uint8), smooth=False, interpolator=sitk.sitkNearestNeighbor) > 0
    seconds["working_grid"] = time.perf_counter() - timed

    def run(view: str, compute) -> None:
        if view not in options.views:
            return
        t0 = time.perf_counter()
        try:
            values = compute()
        except AntsError as err:
            raise ViewError(f"{name}: the {view} view failed ({err})") from None
        except (RuntimeError, ValueError, MemoryError) as err:
            raise ViewError(f"{name}: the {view} view failed ({type(err).__name__}: {err})") from None
        for key, value in values.items():
            if not np.isfinite(value).all():
                raise ViewError(f"{name}: the {view} view gave non-finite values ({key})")
            out[key] = up(value)
        seconds[view] = time.perf_counter() - t0

    def neighbourhood() -> dict:
        radius = np.maximum(1, np.round(options.neighbourhood_mm / spacing_c).astype(int))
        return {
            "log1p_max_r_4mm": np.log1p(
                ndimage.maximum_filter(np.linalg.norm(field_c, axis=-1), size=tuple(2 * radius + 1))
            ),
            "jacobian_r": np.clip(jacobian_determinant(field_c, spacing_c), -2.0, 4.0),
        }

    warped: dict[str, np.ndarray] = {}

    def moving_after_r() -> np.ndarray:  # D warped by r, computed once for the similarity and matching views
        if "after" not in warped:
            warped["after"] = warp_by(moving_c, field_c, spacing_c)
        return warped["after"]

    def similarity() -> dict:
        size = tuple(int(v) for v in np.maximum(3, np.round(options.window_mm / spacing_c) // 2 * 2 + 1))
        after = moving_after_r()
        ncc_before, ncc_after = local_ncc(fixed_c, moving_c, size), local_ncc(fixed_c, after, size)
        return {
            "ncc_before": ncc_before,
            "ncc_after": ncc_after,
            "ncc_gain": ncc_after - ncc_before,
            "abs_difference_before_hu": ndimage.uniform_filter(np.abs(fixed_c - moving_c), size),
            "abs_difference_after_hu": ndimage.uniform_filter(np.abs(fixed_c - after), size),
        }

    def texture() -> dict:
        sigma = [options.texture_sigma_mm / s for s in spacing_c]
        gradient = ndimage.gaussian_gradient_magnitude(fixed_c, sigma) / float(np.mean(spacing_c))
        eigenvalue = smallest_structure_eigenvalue(fixed_c, spacing_c, options.texture_sigma_mm)
        return {"gradient_hu_per_mm": gradient, "structure_min_eigenvalue": np.log1p(np.clip(eigenvalue, 0, None))}

    def lung() -> dict:
        body = region_c | body_mask_array(fixed_c, spacing_c)
        lungs = lung_mask_array(fixed_c, body, tuple(spacing_c))
        inside = ndimage.distance_transform_edt(lungs, sampling=spacing_c)
        outside = ndimage.distance_transform_edt(~lungs, sampling=spacing_c)
        return {"lung_depth_mm": np.where(lungs, inside, -outside).astype(np.float32)}

    def matching() -> dict:
        size = tuple(int(v) for v in np.maximum(3, np.round(options.matching_window_mm / spacing_c) // 2 * 2 + 1))
        shift, gain = local_best_shift(fixed_c, moving_after_r(), size, spacing_c, options.matching_reach_mm)
        return {"matching_shift_mm": np.linalg.norm(shift, axis=-1), "matching_ncc_gain": gain}

    def ants_view() -> dict:
        fixed_i, moving_i = _image(fixed_c, spacing_c[::-1]), _image(moving_c, spacing_c[::-1])
        t = sitk.GetArrayFromImage(ants_register(fixed_i, moving_i, options.ants, name=name)).astype(np.float32)
        return {
            "log1p_r_ants": np.log1p(np.linalg.norm(t, axis=-1)),
            "r_disagreement_mm": np.linalg.norm(t - field_c, axis=-1),
        }

    run("neighbourhood", neighbourhood)
    run("similarity", similarity)
    run("texture", texture)
    run("lung", lung)
    run("matching", matching)
    run("ants", ants_view)
    features = np.stack([out[key] for key in options.features]).astype(np.float32)
    seconds = {k: round(v, 2) for k, v in seconds.items()}
    logger.info("%s: views in %.1f s (%s)", name, time.perf_counter() - start, seconds)
    return features, seconds
