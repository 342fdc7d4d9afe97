"""The re-registration estimator: register the registered moving image D once more onto the fixed image F with
elastix; what that second registration still finds, ``r(x) = T2(x) - x``, estimates the misalignment the first one
left at every voxel of F.

A second registration sees only part of what the first missed (it under-calls), so ``|r|`` is turned into class
probabilities and an expected error in mm by ``scripts.registration.calibration``, fitted on registered artificial
pairs of the training scans (``scripts.registration.registered_pairs``). The settings below were chosen on those
pairs; docs/reregistration.md has the comparison.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import SimpleITK as sitk

from scripts.registration.elastix import (
    ElastixPair,
    RegistrationOptions,
    bspline_parameter_map,
    displacement_field,
    itk_to_sitk,
    linear_parameter_map,
)

logger = logging.getLogger(__name__)


class RegistrationError(RuntimeError):
    """elastix failed on a pair (exception, non-finite result, no overlap); the message names the pair."""


@dataclass
class ReregistrationOptions(RegistrationOptions):
    """Settings of the second registration (elastix options of ``RegistrationOptions`` plus its stages).

    Args:
        linear: "affine", "rigid", "translation" or "" (no linear stage before the B-spline).
        bspline_iterations: iterations per resolution of the B-spline stage (0: linear stage only).
        use_mask: restrict elastix's samples to the mask given with the pair (the body).
        working_spacing_mm: register on this isotropic grid (None: the pair's own grid); r is always returned on
            the pair's grid.
        input_spacing_mm: the grid the pair is loaded on (``scripts.data.image_io.load_pair``): None, the fixed
            image's own voxels, no finer than 1 mm per axis; a number, that isotropic grid (1.0: the network's).
        mask_background: whether the pair's HU were set to the background outside each image's body and lungs
            (the network's input) or read as they are.
    """

    # the strength of elastix's default affine and B-spline maps (4 resolutions, 256 iterations each, 2,048 samples,
    # the original ASGD step estimate): above the former 3 x 500 iterations on the training pairs
    # (docs/reregistration.md)
    number_of_resolutions: int = 4
    affine_iterations: int = 256
    number_of_spatial_samples: int = 2048
    asgd_estimation: str = "Original"
    linear: str = "affine"
    bspline_iterations: int = 256
    use_mask: bool = True
    working_spacing_mm: float | None = None  # native: beats 2 mm on training pairs (docs/reregistration.md)
    input_spacing_mm: float | None = None
    mask_background: bool = False
    parameter_family: ClassVar[str] = "reregistration"


def field_on_grid(maps: list, pair: ElastixPair, fixed: sitk.Image) -> sitk.Image:
    """The transform's displacement on ``fixed``'s grid. With a working grid, transformix evaluates it there and it
    is interpolated linearly onto ``fixed`` (nearest values past the border): the B-spline field is smooth on the
    scale of its 10 mm grid, and evaluating it at every 1 mm voxel took most of the estimator's time.

    Args:
        maps: elastix transform parameter maps of the second registration.
        pair: the ``ElastixPair`` it ran on (its options and working-grid fixed image).
        fixed: image whose grid the result takes.

    Returns:
        SimpleITK vector image of the displacement (components x-y-z, mm) on ``fixed``'s grid.
    """
    if not pair.options.working_spacing_mm:
        return displacement_field(maps, fixed)
    coarse = displacement_field(maps, itk_to_sitk(pair.fixed))
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(fixed)
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetOutputPixelType(coarse.GetPixelID())
    resampler.SetUseNearestNeighborExtrapolator(True)
    return resampler.Execute(coarse)


def residual_field(
    fixed: sitk.Image,
    deformed: sitk.Image,
    options: ReregistrationOptions | None = None,
    fixed_mask: sitk.Image | None = None,
    name: str = "pair",
) -> np.ndarray:
    """``r(x) = T2(x) - x`` in mm, ``[3, z, y, x]`` float32 (physical x, y, z components) on ``fixed``'s grid, where
    ``T2`` registers ``deformed`` onto ``fixed``: F(x) is seen at x + r(x) in D. If D shows F(x + e(x)) at x (e the
    misalignment), r ~ -e. Raises ``RegistrationError`` naming ``name`` if elastix fails.

    Args:
        fixed: fixed image F, HU.
        deformed: registered moving image D on any grid, HU.
        options: estimator settings; None for the defaults.
        fixed_mask: optional sampling mask on ``fixed``'s grid (used with ``options.use_mask``).
        name: name of the pair in messages.

    Returns:
        float32 array ``[3, z, y, x]``, mm.

    Raises:
        RegistrationError: when elastix fails or gives a non-finite displacement.
        ValueError: when the options have no stage to run (``linear`` empty and ``bspline_iterations`` 0).
    """
    options = options or ReregistrationOptions()
    mask = fixed_mask if options.use_mask else None
    t0 = time.perf_counter()
    try:
        pair = ElastixPair(fixed, deformed, options, mask)
        maps = pair.register([linear_parameter_map(options.linear, options)]) if options.linear else None
        if options.bspline_iterations > 0:
            maps = pair.register([bspline_parameter_map(options.bspline_iterations, options)], initial=maps)
        if maps is None:
            raise ValueError("no stage to run: linear is empty and bspline_iterations is 0")
        field = sitk.GetArrayFromImage(field_on_grid(maps, pair, fixed))
    except RuntimeError as err:
        message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise RegistrationError(f"{name}: re-registration with elastix failed ({message})") from None
    if not np.isfinite(field).all():
        raise RegistrationError(f"{name}: re-registration gave a non-finite displacement (NaN metric?)")
    logger.info("%s: re-registered in %.1f s", name, time.perf_counter() - t0)
    return np.ascontiguousarray(np.moveaxis(field, -1, 0), dtype=np.float32)


def residual_field_on_pair(
    image: np.ndarray,
    mask: np.ndarray,
    spacing_mm: float | Sequence[float] = 1.0,
    options: ReregistrationOptions | None = None,
    name: str = "pair",
) -> np.ndarray:
    """The estimator on a loaded pair (``image [2, z, y, x]`` HU on an axis-aligned grid of ``spacing_mm``, one
    value or (x, y, z) mm; ``mask`` where to sample): ``r [3, z, y, x]`` mm along the grid's axes. The bundle's
    inferer and the registered-pair maker call it the same way.

    Args:
        image: ``[2, z, y, x]`` HU (fixed, moving) on an axis-aligned grid.
        mask: ``(z, y, x)`` sampling mask (non-zero inside).
        spacing_mm: voxel spacing in mm, one value or x-y-z order.
        options: estimator settings; None for the defaults.
        name: name of the pair in messages.

    Returns:
        float32 array ``[3, z, y, x]``, mm (components x-y-z).

    Raises:
        RegistrationError: when elastix fails or gives a non-finite displacement.
    """
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,)))
    fixed, moving = (sitk.GetImageFromArray(np.ascontiguousarray(a, dtype=np.float32)) for a in image[:2])
    fixed_mask = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))
    for im in (fixed, moving, fixed_mask):
        im.SetSpacing(spacing)
    return residual_field(fixed, moving, options, fixed_mask, name)
