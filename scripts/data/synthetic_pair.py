"""A synthetic registered pair with a known breathing deformation: the speed benchmarks' large volumes.

From TCIA Lung-PET-CT-Dx A0001 (CC BY 4.0): the fixed image is a crop of the scan resampled to 2 mm (int16); the
moving image is a second "time point" made with a known smooth respiratory-like plus local deformation S (a moving
point y shows the anatomy of fixed point S(y) = y + u(y)) and noise; it is then registered to the fixed image
with a quick SimpleITK affine + B-spline registration R (fixed -> moving points) and resampled on the fixed grid,
so real residual misalignment remains. Landmarks: distinctive lung points x of the fixed image with their true
residual error ``tre = || R(x) - S^-1(x) ||`` (mm). Arrays are in SimpleITK's (z, y, x) order. This made the sample
pair shipped before 2026-12-01; today's sample comes from scripts.registration.sample_pair.

CLI::

    python -m scripts.data.synthetic_pair --scan <dataset_dir>/thorax_lungpetctdx_A0001.nii.gz --output_dir \
        <work_dir>/synthetic_pair
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from scripts.data.landmark_csv import table_from_points, write_landmarks
from scripts.data.landmark_selection import select_landmarks
from scripts.transforms.ct_masks import ct_masks
from scripts.utils.atomic_write import atomic_write_image

logger = logging.getLogger(__name__)

AIR_HU = -1024.0  # outside the body in the source scans
# crop box (LPS mm, lower and upper corner) around the lower part of both lungs of A0001 (the whole lung width, so
# the body mask holds them), 86 mm high: 12 tiles of the default inference tile, a short first README command
DEFAULT_BOX = ((-165.0, 27.0, -436.0), (135.0, 263.0, -350.0))
MARGIN_MM = 30.0  # the simulated second time point extends this far beyond the fixed image on every side


def crop_and_resample(scan: sitk.Image, box: Tuple[Sequence[float], Sequence[float]], spacing: float) -> sitk.Image:
    """The part of ``scan`` inside the physical ``box`` on an identity-direction grid of ``spacing`` mm (int16).

    Args:
        scan: CT image, HU.
        box: lower and upper corner of the crop, LPS mm (x-y-z order).
        spacing: isotropic output voxel size, mm.

    Returns:
        int16 SimpleITK image, HU clamped to [-1024, 3071] (``AIR_HU`` outside the scan).
    """
    lower, upper = np.asarray(box[0], float), np.asarray(box[1], float)
    size = [int(v) for v in np.floor((upper - lower) / spacing) + 1]
    reference = sitk.Image(size, sitk.sitkInt16)
    reference.SetSpacing([spacing] * 3)
    reference.SetOrigin(tuple(lower))
    out = sitk.Resample(sitk.Cast(scan, sitk.sitkFloat32), reference, sitk.Transform(), sitk.sitkBSpline, AIR_HU)
    return sitk.Cast(sitk.Clamp(out, lowerBound=-1024, upperBound=3071), sitk.sitkInt16)


def true_deformation(
    fixed: sitk.Image,
    body: sitk.Image,
    lung: sitk.Image,
    seed: int,
    breathing_mm: float = 15.0,
    local_mm: float = 9.0,
) -> sitk.DisplacementFieldTransform:
    """The known deformation S as a displacement field on the fixed grid: cranio-caudal diaphragm motion fading from
    the lung base to the lung top, antero-posterior expansion, plus a random smooth local field; inside the body.

    Args:
        fixed: image whose grid the field lies on.
        body: body mask on the same grid.
        lung: lung mask on the same grid (must not be empty).
        seed: seed of the random local field.
        breathing_mm: cranio-caudal motion at the lung base, mm.
        local_mm: amplitude of the random local control points, mm.

    Returns:
        The deformation S as a ``sitk.DisplacementFieldTransform`` (float64 field on ``fixed``'s grid, mm).
    """
    rng = np.random.default_rng(seed)
    spacing = np.asarray(fixed.GetSpacing())
    shape = sitk.GetArrayViewFromImage(fixed).shape  # (z, y, x)
    lung_zyx = np.argwhere(sitk.GetArrayViewFromImage(lung) > 0)
    z_base, z_top = lung_zyx[:, 0].min(), lung_zyx[:, 0].max()
    y_centre = lung_zyx[:, 1].mean()
    z, y, x = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    fade = np.clip((z_top - z) / max(z_top - z_base, 1), 0.0, 1.0) ** 1.5  # 1 at the lung base, 0 at its top
    field = np.zeros(shape + (3,))  # (dx, dy, dz) in mm
    field[..., 2] = breathing_mm * fade  # moving point y shows fixed anatomy higher up: the diaphragm went down
    field[..., 1] = -0.06 * (y - y_centre) * spacing[1] * fade  # antero-posterior contraction around the lung centre
    coarse = [max(2, int(np.ceil(n * s / 40.0)) + 1) for n, s in zip(shape, spacing[::-1])]  # ~40 mm control grid
    for axis in range(3):
        knots = rng.uniform(-local_mm, local_mm, size=coarse)
        field[..., axis] += ndimage.zoom(knots, [n / c for n, c in zip(shape, coarse)], order=3, mode="nearest")[
            : shape[0], : shape[1], : shape[2]
        ]
    weight = ndimage.gaussian_filter(sitk.GetArrayFromImage(body).astype(float), sigma=4.0)
    for axis in range(3):
        field[..., axis] = ndimage.gaussian_filter(field[..., axis] * weight, sigma=3.0)
    displacement = sitk.GetImageFromArray(field, isVector=True)
    displacement.CopyInformation(fixed)
    return sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))


def make_moving(fixed: sitk.Image, body: sitk.Image, deformation: sitk.Transform, seed: int) -> sitk.Image:
    """The second time point: ``fixed`` warped by ``deformation`` (cubic B-spline) plus 10 HU noise in the body.

    Args:
        fixed: image to warp, HU.
        body: body mask on the same grid (noise is added inside the warped body).
        deformation: the deformation S (e.g. from ``true_deformation``).
        seed: the noise uses ``seed + 1``.

    Returns:
        int16 SimpleITK image on ``fixed``'s grid, HU clipped to [-1024, 3071].
    """
    moving = sitk.Resample(sitk.Cast(fixed, sitk.sitkFloat32), fixed, deformation, sitk.sitkBSpline, AIR_HU)
    moved_body = sitk.Resample(body, fixed, deformation, sitk.sitkNearestNeighbor, 0)
    array = sitk.GetArrayFromImage(moving)
    noise = np.random.default_rng(seed + 1).normal(0.0, 10.0, array.shape)
    array = np.where(sitk.GetArrayViewFromImage(moved_body) > 0, array + noise, array)
    out = sitk.GetImageFromArray(np.clip(np.rint(array), -1024, 3071).astype(np.int16))
    out.CopyInformation(fixed)
    return out


def register(fixed: sitk.Image, moving: sitk.Image, bspline_iterations: int = 20, seed: int = 0) -> sitk.Transform:
    """A quick SimpleITK registration (fixed -> moving points): affine, then a 40 mm B-spline with few iterations,
    both Mattes mutual information on a 3-level pyramid.

    Args:
        fixed: fixed image.
        moving: moving image.
        bspline_iterations: L-BFGS-B iterations of the B-spline stage.
        seed: seed of the random metric sampling (5 % of the voxels).

    Returns:
        ``sitk.CompositeTransform`` of the affine and B-spline transforms (maps fixed to moving points).
    """
    f, m = sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32)

    def method(iterations: int) -> sitk.ImageRegistrationMethod:
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.05, seed)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
        reg.SetOptimizerAsLBFGSB(numberOfIterations=iterations, maximumNumberOfCorrections=5)
        return reg

    affine = method(60)
    affine.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, 60)
    affine.SetOptimizerScalesFromPhysicalShift()
    affine.SetInitialTransform(sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(3)), inPlace=False)
    affine_transform = affine.Execute(f, m)
    mesh = [max(1, int(round(n * s / 40.0))) for n, s in zip(fixed.GetSize(), fixed.GetSpacing())]
    bspline = method(bspline_iterations)
    bspline.SetMovingInitialTransform(affine_transform)
    bspline.SetInitialTransform(sitk.BSplineTransformInitializer(f, mesh), inPlace=False)
    bspline_transform = bspline.Execute(f, m)
    return sitk.CompositeTransform([affine_transform, bspline_transform])


def invert_at_points(transform: sitk.Transform, points: np.ndarray, iterations: int = 50) -> np.ndarray:
    """``S^-1(x)`` for ``S(y) = y + u(y)`` at points ``[N, 3]`` by fixed-point iteration ``y <- x - u(y)``.

    Args:
        transform: the transform S.
        points: ``[N, 3]`` physical points, LPS mm.
        iterations: number of fixed-point iterations.

    Returns:
        float array ``[N, 3]`` of ``S^-1(points)``, LPS mm.

    Raises:
        RuntimeError: when ``S`` of the result misses ``points`` by more than 0.01 mm.
    """
    out = np.array(points, dtype=float)
    for _ in range(iterations):
        displaced = np.array([transform.TransformPoint(tuple(p)) for p in out])
        out = points - (displaced - out)
    residual = np.array([transform.TransformPoint(tuple(p)) for p in out]) - points
    if np.abs(residual).max() > 0.01:
        raise RuntimeError(f"the true deformation did not invert to 0.01 mm (residual {np.abs(residual).max():.3f})")
    return out


def make_sample_pair(
    scan_path: str,
    output_dir: str = "sample_data",
    spacing: float = 2.0,
    seed: int = 20210101,
    landmark_count: int = 60,
    box: Tuple[Sequence[float], Sequence[float]] = DEFAULT_BOX,
) -> dict:
    """Write ``fixed.nii.gz``, ``moving.nii.gz`` (registered, on the fixed grid) and ``landmarks.csv``
    (id, x, y, z, tre) to ``output_dir``; returns a summary of the true residual errors.

    Args:
        scan_path: source CT file.
        output_dir: folder of the written files.
        spacing: isotropic voxel size of the pair, mm.
        seed: seed of the deformation, noise and registration sampling.
        landmark_count: number of landmarks to select in the lungs.
        box: crop box of the fixed image, lower and upper corner, LPS mm.

    Returns:
        Dict with ``size`` (x, y, z voxels), ``tre_before_mean``, ``tre_mean``, ``tre_max`` (mm) and ``classes``
        (landmark counts per class).
    """
    scan = sitk.ReadImage(str(scan_path))
    fixed = crop_and_resample(scan, box, spacing)
    _, lung = ct_masks(fixed, str(scan_path))
    # the second time point covers a larger box, so the registered image has anatomy up to the fixed image's edges
    lower, upper = np.asarray(box[0], float) - MARGIN_MM, np.asarray(box[1], float) + MARGIN_MM
    extended = crop_and_resample(scan, (lower, upper), spacing)
    extended_body, extended_lung = ct_masks(extended, str(scan_path))
    deformation = true_deformation(extended, extended_body, extended_lung, seed)
    moving = make_moving(extended, extended_body, deformation, seed)
    registration = register(fixed, moving, seed=seed)
    registered = sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), fixed, registration, sitk.sitkBSpline, AIR_HU)
    registered_array = np.clip(np.rint(sitk.GetArrayFromImage(registered)), -1024, 3071).astype(np.int16)
    registered = sitk.GetImageFromArray(registered_array)
    registered.CopyInformation(fixed)
    points = select_landmarks(fixed, lung, count=landmark_count, min_spacing_mm=15.0)
    true_moving = invert_at_points(deformation, points)
    mapped = np.array([registration.TransformPoint(tuple(p)) for p in points])
    tre = np.linalg.norm(mapped - true_moving, axis=1)
    before = np.linalg.norm(points - true_moving, axis=1)
    out = Path(output_dir)
    atomic_write_image(fixed, out / "fixed.nii.gz")
    atomic_write_image(registered, out / "moving.nii.gz")
    write_landmarks(table_from_points(points, {"tre": tre}), out / "landmarks.csv")
    summary = {
        "size": fixed.GetSize(),
        "tre_before_mean": float(before.mean()),
        "tre_mean": float(tre.mean()),
        "tre_max": float(tre.max()),
        "classes": np.bincount(np.digitize(tre, (3.0, 6.0)), minlength=3).tolist(),
    }
    logger.info("sample pair written to %s: %s", out, summary)
    return summary


if __name__ == "__main__":
    import fire

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fire.Fire(lambda *args, **kwargs: print(make_sample_pair(*args, **kwargs)))
