"""Registration with ANTs (``antspyx``): an engine independent of elastix, for user-side registrations of the
registered training pairs and of the protocol, and for the multiview estimator's second opinion.

Images cross between SimpleITK and ANTs with their physical geometry (both are ITK images in LPS), so a field
found by ANTs is a SimpleITK displacement image on the fixed grid: ``T(x) = x + t(x)`` maps fixed points into the
moving image, like transformix's fields (``scripts.registration.elastix.displacement_field``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from unittest import mock

import numpy as np
import SimpleITK as sitk

logger = logging.getLogger(__name__)

TRANSFORMS = ("affine", "syn")


class AntsError(RuntimeError):
    """ANTs failed on a pair or gave a non-finite field; the message names the pair."""


@dataclass
class AntsOptions:
    """Settings of one ANTs registration (``ants.registration``).

    Args:
        transform: "affine" (affine only) or "syn" (affine, then SyN).
        syn_metric: similarity metric of the SyN stage: "CC" (local cross-correlation), "mattes" or "meansquares".
        syn_iterations: iterations per level of the SyN stage, coarse to fine; the shrink factors halve from
            ``2 ** (levels - 1)`` to 1 (a 0 skips a level).
        cc_radius: window radius of the CC metric, voxels.
        flow_sigma: smoothing of the update field, voxels.
        total_sigma: smoothing of the total field, voxels.
        affine_iterations: iterations per level of the affine stage.
        threads: ITK threads; ANTs takes the count once per process, at its first registration.
        random_seed: seed of ANTs' random numbers (the affine metric's sampling); a registration is bit-reproducible
            only on one thread, where the metric's sums come in a fixed order.
    """

    transform: str = "syn"
    syn_metric: str = "mattes"
    syn_iterations: tuple[int, ...] = (40, 20, 0)
    cc_radius: int = 2
    flow_sigma: float = 3.0
    total_sigma: float = 0.0
    affine_iterations: tuple[int, ...] = (100, 50, 25)
    threads: int = 2
    random_seed: int = 20210101


def to_ants(image: sitk.Image):
    """A scalar SimpleITK image as an ANTs image with the same geometry (float32)."""
    import ants

    array = sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return ants.from_numpy(
        np.ascontiguousarray(array), origin=image.GetOrigin(), spacing=image.GetSpacing(), direction=direction
    )


def register(fixed: sitk.Image, moving: sitk.Image, options: AntsOptions | None = None, name: str = "pair"):
    """Register ``moving`` onto ``fixed`` with ANTs: the displacement ``t`` of ``T(x) = x + t(x)`` on ``fixed``'s
    grid (SimpleITK vector image, mm).

    Args:
        fixed: fixed image, HU.
        moving: moving image, HU (any grid).
        options: ANTs settings; None for the defaults.
        name: name of the pair in messages.

    Returns:
        SimpleITK float64 vector image of t on ``fixed``'s grid.

    Raises:
        AntsError: when ANTs fails or the field is not finite.
        ValueError: for an unknown transform.
    """
    import ants

    options = options or AntsOptions()
    if options.transform not in TRANSFORMS:
        raise ValueError(f"unknown ANTs transform {options.transform!r}; choose one of {TRANSFORMS}")
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(options.threads)
    start = time.perf_counter()
    # ants.registration takes no seed argument (an unknown keyword is dropped): ANTs reads it from the environment,
    # set for this call only (patch.dict restores os.environ on exit)
    seed = mock.patch.dict(os.environ, ANTS_RANDOM_SEED=str(options.random_seed))
    with seed, tempfile.TemporaryDirectory(prefix="ants_") as folder:
        try:
            f, m = to_ants(fixed), to_ants(moving)
            kind = "affine" if options.transform == "affine" else "affine + SyN"
            found = ants.registration(
                f,
                m,
                type_of_transform="Affine" if options.transform == "affine" else "SyN",
                aff_iterations=tuple(options.affine_iterations),
                aff_shrink_factors=tuple(2**k for k in reversed(range(len(options.affine_iterations)))),
                aff_smoothing_sigmas=tuple(range(len(options.affine_iterations) - 1, -1, -1)),
                syn_metric=options.syn_metric,
                syn_sampling=options.cc_radius if options.syn_metric == "CC" else 32,
                reg_iterations=tuple(options.syn_iterations),
                flow_sigma=options.flow_sigma,
                total_sigma=options.total_sigma,
                outprefix=os.path.join(folder, "t"),
                verbose=False,
            )
            composed = ants.apply_transforms(
                f, m, found["fwdtransforms"], compose=os.path.join(folder, "field")
            )  # the path of a displacement field composing every stage
            t = sitk.ReadImage(composed, sitk.sitkVectorFloat64)
        except (RuntimeError, ValueError, OSError) as err:
            message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise AntsError(f"{name}: registration with ANTs ({kind}) failed ({message})") from None
    values = sitk.GetArrayViewFromImage(t)
    if not np.isfinite(values).all():
        raise AntsError(f"{name}: ANTs gave a non-finite displacement")
    t.CopyInformation(fixed)
    logger.info("%s: ANTs %s in %.1f s", name, options.transform, time.perf_counter() - start)
    return t
