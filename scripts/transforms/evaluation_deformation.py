"""The evaluation "second time point": a realistic, known deformation of a real scan plus intensity changes.

Used only by the simulated benchmark, never for training. Its settings are disjoint from the training generators
(docs/method.md section 6, maximum 10 mm per axis): respiratory motion with a cranio-caudal amplitude of 12-25 mm at
the lung base, drawn per side (right/left hemidiaphragm), that moves lungs and abdomen but not the chest wall
(sliding along the pleura, which smooth B-splines cannot follow exactly), an antero-posterior scaling of 6-10 %,
plus local random motion on a 24 mm grid of up to 6-9 mm per axis (scaled down until nothing folds); seeds come
from their own namespace (``EVALUATION_SEED_SPACE``). Own code on numpy/scipy because the training generators
(scripts/transforms/artificial_dvf.py) did not exist when this was written; the field is a dense displacement on a
coarse
grid wrapped in a SimpleITK DisplacementFieldTransform, so it can be evaluated exactly at any point.

Convention: the moving image is I_M(y) = I_F(y + v(y)) (SimpleITK resampling, v defined on the moving side); the
true partner x_M of a fixed point x_F solves x_M + v(x_M) = x_F (fixed-point iteration, v is smooth and small).
Arrays are (z, y, x) as SimpleITK gives them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

EVALUATION_SEED_SPACE = 419_639_2021  # mixed into every seed so no evaluation draw repeats a training draw
AIR_HU = -1024.0


@dataclass
class EvaluationDeformationSettings:
    """Ranges of the evaluation deformation (all larger or different from the training ones)."""

    field_spacing_mm: float = 4.0  # grid of the dense displacement field
    respiratory_si_mm: tuple[float, float] = (12.0, 25.0)  # cranio-caudal amplitude at the lung base, per side
    midline_width_mm: float = 10.0  # the right/left amplitudes blend across the midline (logistic width)
    respiratory_ap_scale: tuple[float, float] = (0.06, 0.10)  # antero-posterior scaling at the lung base
    local_grid_mm: float = 24.0
    local_max_mm: tuple[float, float] = (6.0, 9.0)  # per axis
    smoothing_mm: float = 8.0
    sponge_clip: tuple[float, float] = (0.7, 1.3)
    intensity_scale: tuple[float, float] = (0.95, 1.05)
    noise_sigma_hu: float = 10.0
    min_jacobian: float = 0.3  # local motion is scaled down until the map y -> y + v(y) folds nowhere
    sliding: bool = True  # respiratory motion moves lungs and abdomen, not the chest wall
    sliding_sigma_mm: float = 4.0  # width of the transition at the pleura


@dataclass
class EvaluationDeformation:
    """A drawn deformation: the SimpleITK transform (y -> y + v(y)) and the drawn parameters."""

    transform: sitk.DisplacementFieldTransform
    field: sitk.Image  # the displacement field v on its coarse grid (vector float64), kept for inspection
    parameters: dict

    def displacement(self, points: np.ndarray) -> np.ndarray:
        """v at ``[N, 3]`` physical points (mm)."""
        return np.array([np.subtract(self.transform.TransformPoint(p.tolist()), p) for p in points])

    def partners(self, fixed_points: np.ndarray, iterations: int = 50) -> np.ndarray:
        """True moving-space partners x_M of fixed points x_F: solve x_M + v(x_M) = x_F.

        Args:
            fixed_points: ``[N, 3]`` fixed-space physical points x_F, LPS mm.
            iterations: maximum number of fixed-point iterations (stops early below 1e-4 mm change).

        Returns:
            float64 array ``[N, 3]`` of x_M, LPS mm.
        """
        fixed_points = np.asarray(fixed_points, dtype=np.float64)
        y = fixed_points.copy()
        for _ in range(iterations):
            y_new = fixed_points - self.displacement(y)
            if np.abs(y_new - y).max() < 1e-4:
                return y_new
            y = y_new
        return y


def _coarse_grid(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    size = [int(np.ceil(s * n / spacing_mm)) + 1 for s, n in zip(image.GetSpacing(), image.GetSize())]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing([spacing_mm] * 3)
    grid.SetDirection(image.GetDirection())
    corner = np.array(image.TransformContinuousIndexToPhysicalPoint([-0.5] * 3))
    grid.SetOrigin(tuple(corner))
    return grid


def _on_grid(mask: sitk.Image, grid: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0


def _jacobian_min(field: np.ndarray, spacing: float) -> float:
    """Smallest Jacobian determinant of y -> y + v(y); ``field`` is (z, y, x, 3) with components (x, y, z)."""
    grads = [np.gradient(field[..., c], spacing, axis=(2, 1, 0)) for c in range(3)]  # d v_c / d(x, y, z)
    jac = np.empty(field.shape[:3] + (3, 3))
    for c in range(3):
        for a in range(3):
            jac[..., c, a] = grads[c][a] + (1.0 if a == c else 0.0)
    return float(np.linalg.det(jac).min())


def sliding_region(lung: np.ndarray, body: np.ndarray, inferior_first: bool = True) -> np.ndarray:
    """Voxels that follow the breathing motion in a (z, y, x) grid: in every (y, x) column that crosses the lung
    (dilated by one voxel), the body from the bottom up to the column's highest lung voxel (lung, diaphragm,
    abdomen). Along z the region only ends upwards, so the cranio-caudal motion compresses nowhere; the chest wall
    beside the lungs stays still, so the lungs slide along the pleura.

    Args:
        lung: bool ``(z, y, x)`` lung mask.
        body: bool ``(z, y, x)`` body mask.
        inferior_first: whether z index 0 is the most inferior slice (else the z axis is flipped for the computation).

    Returns:
        bool ``(z, y, x)`` mask.
    """
    if not inferior_first:
        return sliding_region(lung[::-1], body[::-1])[::-1]
    lung = ndimage.binary_dilation(lung, iterations=1)
    nz = lung.shape[0]
    highest = np.where(lung.any(axis=0), nz - 1 - lung[::-1].argmax(axis=0), -1)
    return (np.arange(nz)[:, None, None] <= highest[None]) & body


def draw_deformation(
    fixed: sitk.Image,
    body: sitk.Image,
    lung: sitk.Image,
    seed: int = 0,
    settings: EvaluationDeformationSettings | None = None,
) -> EvaluationDeformation:
    """Draw respiratory + local motion for the scan ``fixed`` with its body and lung masks (uint8 images).

    Args:
        fixed: the scan, HU.
        body: body mask on the scan's grid.
        lung: lung mask on the scan's grid.
        seed: draw seed (combined with ``EVALUATION_SEED_SPACE``).
        settings: ranges of the deformation; None for the defaults.

    Returns:
        ``EvaluationDeformation`` with the transform, the coarse float64 field (``field_spacing_mm`` grid) and the drawn
        parameters.

    Raises:
        ValueError: when the lung mask is empty on the coarse grid, or the field still folds after scaling down the
            local motion.
    """
    s = settings or EvaluationDeformationSettings()
    rng = np.random.default_rng([EVALUATION_SEED_SPACE, int(seed)])
    grid = _coarse_grid(fixed, s.field_spacing_mm)
    nz, ny, nx = sitk.GetArrayViewFromImage(grid).shape
    h = s.field_spacing_mm
    body_c = _on_grid(body, grid)
    lung_c = _on_grid(lung, grid)
    if not lung_c.any():
        raise ValueError("evaluation deformation: the lung mask is empty on the coarse grid")
    index = np.stack(np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij"), -1).transpose(2, 1, 0, 3)
    origin = np.array(grid.GetOrigin())
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    points = origin + (index * h) @ direction.T  # (z, y, x, 3) physical
    lung_points = points[lung_c]
    z_top, z_base = lung_points[:, 2].max(), lung_points[:, 2].min()  # LPS: +z is superior
    y_centre = lung_points[:, 1].mean()

    # respiratory motion: largest at the lung base, fading (log-like) to zero at the apex; it moves the lungs and
    # what lies below them (diaphragm, liver) but not the chest wall, so the lungs slide along the pleura
    depth = np.clip((z_top - points[..., 2]) / (z_top - z_base), 0.0, 1.0)
    fade = np.log1p(4.0 * depth) / np.log1p(4.0)
    inferior_first = np.array(fixed.GetDirection())[8] > 0  # z index 0 is the most inferior slice
    broad = ndimage.gaussian_filter((ndimage.binary_dilation(lung_c, iterations=3) & body_c).astype(float), 10.0 / h)
    broad = np.minimum(broad / max(broad.max(), 1e-6), 1.0) * body_c
    if s.sliding:  # sharp only for the cranio-caudal part: a shear along the pleura, which cannot fold the map
        region = sliding_region(lung_c, body_c, inferior_first).astype(float)
        region = ndimage.gaussian_filter(region, s.sliding_sigma_mm / h) * body_c
    else:
        region = broad
    si_right, si_left = rng.uniform(*s.respiratory_si_mm, size=2)  # the two hemidiaphragms move differently
    ap = rng.uniform(*s.respiratory_ap_scale)
    x_mid = lung_points[:, 0].mean()  # LPS: +x is the patient's left
    left = 1.0 / (1.0 + np.exp(-(points[..., 0] - x_mid) / s.midline_width_mm))
    si = si_right * (1.0 - left) + si_left * left
    field = np.zeros((nz, ny, nx, 3))
    field[..., 2] = -si * fade * region  # exhale: structures of I_M lie higher, so I_M(y) samples I_F lower
    field[..., 1] = ap * (points[..., 1] - y_centre) * fade * broad  # a sharp AP step would fold at the pleura

    # local motion: random coefficients on a ``local_grid_mm`` grid, cubic up-sampling, body only
    local_max = rng.uniform(*s.local_max_mm)
    coarse_shape = [max(2, int(np.ceil(n * h / s.local_grid_mm)) + 1) for n in (nz, ny, nx)]
    local = np.zeros_like(field)
    for c in range(3):
        coefficients = rng.uniform(-1.0, 1.0, coarse_shape)
        up = ndimage.zoom(coefficients, [n / m for n, m in zip((nz, ny, nx), coarse_shape)], order=3)
        local[..., c] = up[:nz, :ny, :nx]
    local *= body_c[..., None]
    sigma = s.smoothing_mm / h
    for c in range(3):  # the respiratory part stays sharp at the pleura (sliding); the local part is smoothed
        local[..., c] = ndimage.gaussian_filter(local[..., c], sigma)
    local *= local_max / max(np.abs(local).max(), 1e-6)
    scale = 1.0
    while _jacobian_min(field + scale * local, h) < s.min_jacobian and scale > 0.1:
        scale *= 0.8
    total = field + scale * local
    if _jacobian_min(total, h) < s.min_jacobian:
        raise ValueError(f"evaluation deformation (seed {seed}) folds (Jacobian < {s.min_jacobian}); try another seed")

    vector = sitk.GetImageFromArray(total.astype(np.float64), isVector=True)
    vector.CopyInformation(grid)
    transform = sitk.DisplacementFieldTransform(sitk.Image(vector))  # the transform takes ownership of its copy
    transform.SetInterpolator(sitk.sitkLinear)
    parameters = {
        "seed": int(seed),
        "respiratory_si_mm": {"right": si_right, "left": si_left},
        "respiratory_ap_scale": ap,
        "local_max_mm": local_max * scale,
        "max_displacement_mm": float(np.linalg.norm(total, axis=-1).max()),
        "max_per_axis_mm": np.abs(total).reshape(-1, 3).max(axis=0).tolist(),
        "min_jacobian": _jacobian_min(total, h),
        "settings": asdict(s),
    }
    return EvaluationDeformation(transform, vector, parameters)


def jacobian_image(deformation: EvaluationDeformation, reference: sitk.Image) -> sitk.Image:
    """Jacobian determinant of y -> y + v(y) resampled on ``reference`` (float32).

    Args:
        deformation: the drawn deformation.
        reference: image whose grid the result takes.

    Returns:
        float32 SimpleITK image (1 outside the field's grid).
    """
    jac = sitk.DisplacementFieldJacobianDeterminant(deformation.field)
    return sitk.Resample(jac, reference, sitk.Transform(), sitk.sitkLinear, 1.0, sitk.sitkFloat32)


def deform_scan(
    fixed: sitk.Image,
    body: sitk.Image,
    lung: sitk.Image,
    deformation: EvaluationDeformation,
    seed: int = 0,
    settings: EvaluationDeformationSettings | None = None,
) -> sitk.Image:
    """The second time point on the fixed grid: I_F warped (cubic B-spline), sponge model in the lung (density
    ratio = Jacobian, clipped), a global intensity scale and Gaussian noise inside the body; int16 HU.

    Args:
        fixed: the scan, HU.
        body: body mask on the scan's grid.
        lung: lung mask on the scan's grid.
        deformation: the deformation from ``draw_deformation``.
        seed: seed of the intensity scale and noise (combined with ``EVALUATION_SEED_SPACE``).
        settings: sponge clip, intensity scale and noise; None for the defaults.

    Returns:
        int16 SimpleITK image on ``fixed``'s grid, HU clipped to [-1024, 3071].
    """
    s = settings or EvaluationDeformationSettings()
    rng = np.random.default_rng([EVALUATION_SEED_SPACE, int(seed), 1])
    warped = sitk.Resample(
        sitk.Cast(fixed, sitk.sitkFloat32), fixed, deformation.transform, sitk.sitkBSpline, AIR_HU, sitk.sitkFloat32
    )
    lung_moving = sitk.Resample(lung, fixed, deformation.transform, sitk.sitkNearestNeighbor, 0)
    body_moving = sitk.Resample(body, fixed, deformation.transform, sitk.sitkNearestNeighbor, 0)
    hu = sitk.GetArrayFromImage(warped)
    in_lung = sitk.GetArrayViewFromImage(lung_moving) > 0
    in_body = sitk.GetArrayViewFromImage(body_moving) > 0
    jac = np.clip(sitk.GetArrayFromImage(jacobian_image(deformation, fixed)), *s.sponge_clip)  # copy: temporary image
    # density (HU + 1000) scales with the volume ratio: where I_M samples a larger I_F volume, the tissue is denser
    hu[in_lung] = (hu[in_lung] + 1000.0) * jac[in_lung] - 1000.0
    scale = rng.uniform(*s.intensity_scale)
    hu[in_body] = (hu[in_body] + 1000.0) * scale - 1000.0 + rng.normal(0.0, s.noise_sigma_hu, int(in_body.sum()))
    out = sitk.GetImageFromArray(np.clip(np.rint(hu), -1024, 3071).astype(np.int16))
    out.CopyInformation(fixed)
    return out
