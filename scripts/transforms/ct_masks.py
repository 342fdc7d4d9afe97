"""Body (torso) and lung masks of a chest CT from HU thresholds and morphology (docs/method.md section 2).

Any decent segmentation will do for the artificial deformations: the body mask limits where the DVF, the sponge
model and the noise act, the lung mask places the respiratory motion and the mixed-frequency edges. Arrays are
handled in SimpleITK's numpy order (z, y, x).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

BODY_THRESHOLD_HU = -500.0  # soft tissue, bone and the chest wall lie above; outside air (-1024) and lung lie below
LUNG_THRESHOLD_HU = -400.0  # aerated lung (about -850) and airways lie below
MIN_BODY_ML = 500.0  # a torso is litres; less than this is an empty or all-air image
MIN_LUNG_ML = 100.0  # two lungs hold litres; less than this means the scan shows no lung (e.g. abdomen only)
MIN_LUNG_COMPONENT_FRACTION = 0.25  # air pockets below this fraction of the largest one: stomach or bowel gas
LUNG_CORE_MM = 5.0  # lung cores: air deeper than this; thinner links (e.g. lung base to stomach gas) are cut
LUNG_REACH_MM = 40.0  # lung voxels lie at most this far from a core (the thin apex and recesses)
MIN_SIZE_VOXELS = 8  # every axis must have at least this many voxels to be a 3-D scan
MIN_DIRECTION_DETERMINANT = 1e-6  # |det| of the direction matrix below this: a singular (degenerate) orientation
# Lung that a crop takes out of the body mask (it touches an image face, as outside air does): lung parenchyma
# smoothed over 2 mm stays above -960 HU (0.1st percentile of the lung voxels of every shared scan) and outside air
# sits at -1000 (noise averages out at 2 mm), so a thick region outside the body mask between -975 and -300 HU after
# smoothing is lung and belongs to the body.
CUT_LUNG_SMOOTHING_MM = 2.0
AIR_HU = -1024.0
CUT_LUNG_MIN_HU = -975.0
CUT_LUNG_MAX_HU = -300.0  # dense lung (ground glass, atelectasis) smooths to -650..-300; fat and muscle lie above
MIN_CUT_LUNG_ML = 5.0  # smaller border regions (partial-volume rims, blankets) stay outside
CUT_LUNG_GRID_MM = 2.0  # the thickness test of cut lungs runs on a grid of whole voxels at most this coarse

# in-plane (y, x) connectivity only: fills holes slice by slice, so the lungs count as inside the body even though
# the airways reach the top of the scan
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def check_3d_image(image: sitk.Image, source: str = "image") -> None:
    """Raise ValueError naming ``source`` unless ``image`` is a scalar 3-D volume with at least MIN_SIZE_VOXELS
    voxels per axis (none of size zero), a positive spacing and a non-singular direction matrix.

    Args:
        image: image to check.
        source: name of the image in the message (e.g. its path).

    Raises:
        ValueError: when the image is not a scalar 3-D volume of at least ``MIN_SIZE_VOXELS`` per axis, or has a
            non-positive spacing or a singular direction matrix.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"{source}: expected a scalar 3-D CT volume, got a {image.GetDimension()}-D image with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s) of size {image.GetSize()}"
        )
    if 0 in image.GetSize():
        raise ValueError(f"{source}: the image has a zero-size axis (size {image.GetSize()}): it holds no voxels")
    if min(image.GetSize()) < MIN_SIZE_VOXELS:
        raise ValueError(
            f"{source}: size {image.GetSize()} is not a 3-D volume (fewer than {MIN_SIZE_VOXELS} voxels along an axis)"
        )
    if min(image.GetSpacing()) <= 0:
        raise ValueError(f"{source}: the voxel spacing {image.GetSpacing()} must be positive")
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if abs(np.linalg.det(direction)) < MIN_DIRECTION_DETERMINANT:
        raise ValueError(f"{source}: the direction matrix {np.round(direction, 4).tolist()} is singular")


def _voxel_ml(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing())) / 1000.0


def _largest_components(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    """Components of ``mask`` (26-connected) at least ``min_fraction`` the size of the largest one."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = sizes >= max(1, min_fraction * sizes.max())
    keep[0] = False
    return keep[labels]


def fill_holes_in_plane(mask: np.ndarray) -> np.ndarray:
    """Fill every axial slice's holes of a ``(z, y, x)`` mask (background not connected to the slice border)."""
    labels, _ = ndimage.label(~mask, structure=_IN_PLANE)
    border = np.unique(
        np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
    )
    outside = np.isin(labels, border[border > 0])
    return ~outside


def cut_lung_array(hu: np.ndarray, body: np.ndarray, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Lung that a crop takes out of the body mask: voxels outside ``body`` that look like lung after smoothing
    (between ``CUT_LUNG_MIN_HU`` and ``CUT_LUNG_MAX_HU``: parenchyma with its small vessels) and lie within
    ``LUNG_CORE_MM`` of a part thicker than ``LUNG_CORE_MM`` (an opening), at least ``MIN_CUT_LUNG_ML`` in all. In-plane
    hole filling cannot keep such lung where it touches an image face, as outside air does, or where the crop cut its
    tissue ring off the body's largest part (a lung apex). The opening drops the thin bands that smoothing or thick
    slices' partial volume lift into the lung range along the skin and between the back and a table.

    Args:
        hu: ``(z, y, x)`` CT array, HU.
        body: bool ``(z, y, x)`` body mask before the cut lung is added.
        spacing_zyx: voxel spacing in mm, z-y-x order.

    Returns:
        bool ``(z, y, x)`` mask of the cut lung (outside ``body``).
    """
    cross = ndimage.generate_binary_structure(3, 1)
    air = np.maximum(hu.astype(np.float32), AIR_HU)  # -2048 background (outside a scan or a body) smooths as air
    smooth = ndimage.gaussian_filter(air, [CUT_LUNG_SMOOTHING_MM / float(s) for s in spacing_zyx])
    in_lung_range = (smooth > CUT_LUNG_MIN_HU) & (smooth <= CUT_LUNG_MAX_HU)
    lung_like = ~body & in_lung_range
    if not lung_like.any():
        return lung_like
    # the opening of every lung-like voxel, inside the body too (a thin slab the body misses next to lung it keeps),
    # on a grid coarsened to at most CUT_LUNG_GRID_MM (1 mm voxels two at a time): on crops of the six training scans
    # at 1 mm, 2.6 times faster than a 1.5 mm grid, the same lung kept, at most 0.23 % of the voxels changed
    step = tuple(max(1, int(CUT_LUNG_GRID_MM // float(s))) for s in spacing_zyx)
    coarse_spacing = [float(s) * k for s, k in zip(spacing_zyx, step)]
    coarse = in_lung_range[:: step[0], :: step[1], :: step[2]]
    core = ndimage.distance_transform_edt(coarse, sampling=coarse_spacing) > LUNG_CORE_MM
    if not core.any():
        return np.zeros_like(body)
    reach = ndimage.distance_transform_edt(~core, sampling=coarse_spacing) <= LUNG_CORE_MM + max(coarse_spacing)
    for axis, k in enumerate(step):
        reach = reach.repeat(k, axis=axis)
    cut = lung_like & reach[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    cut_labels, cut_count = ndimage.label(cut, structure=cross)
    sizes_ml = np.bincount(cut_labels.ravel(), minlength=cut_count + 1) * float(np.prod(spacing_zyx)) / 1000.0
    keep = sizes_ml >= MIN_CUT_LUNG_ML
    keep[0] = False
    return keep[cut_labels]


def body_mask_array(hu: np.ndarray, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Torso mask of a ``(z, y, x)`` HU array (bool): threshold, largest component, in-plane hole filling, and lung
    that a crop takes out of that mask (``cut_lung_array``), so a crop through the lungs keeps them.

    Args:
        hu: ``(z, y, x)`` CT array, HU.
        spacing_zyx: voxel spacing in mm, z-y-x order.

    Returns:
        bool array of the shape of ``hu``.
    """
    tissue = hu > BODY_THRESHOLD_HU
    cross = ndimage.generate_binary_structure(3, 1)
    core = _largest_components(ndimage.binary_opening(tissue, structure=cross), min_fraction=1.0)  # cut table links
    body = tissue & ndimage.binary_dilation(core, structure=cross, iterations=2)  # give back thin skin the opening cut
    body = fill_holes_in_plane(body)
    cut = cut_lung_array(hu, body, spacing_zyx)
    return fill_holes_in_plane(body | cut) if cut.any() else body


def _lung_cores(air: np.ndarray, spacing_zyx: tuple[float, ...]) -> np.ndarray:
    """Labels of the lung cores of a ``(z, y, x)`` air mask: parts thicker than ``LUNG_CORE_MM``; large ones whose
    centroid lies within the axial range of the largest (thick bowel gas below the diaphragm is dropped)."""
    depth = ndimage.distance_transform_edt(air, sampling=spacing_zyx)
    labels, count = ndimage.label(depth > LUNG_CORE_MM, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return labels
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = int(sizes.argmax())
    z_index = np.nonzero(labels == largest)[0]
    centroids = ndimage.mean(np.indices(labels.shape)[0], labels, index=np.arange(count + 1))
    keep = (sizes >= MIN_LUNG_COMPONENT_FRACTION * sizes[largest]) & (centroids >= z_index.min())
    keep &= centroids <= z_index.max()
    keep[0] = False
    return np.where(keep[labels], labels, 0)


def lung_mask_array(hu: np.ndarray, body: np.ndarray, spacing_zyx: tuple[float, ...] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Lung (and central airway) mask of a ``(z, y, x)`` HU array inside ``body`` (bool).

    Air below -400 HU; thick lung cores found on a 2x coarser grid; every air voxel goes to its nearest core so
    that gas in the bowel, even where it touches a lung base, stays out; vessels filled slice by slice.

    Args:
        hu: ``(z, y, x)`` CT array, HU.
        body: bool ``(z, y, x)`` body mask.
        spacing_zyx: voxel spacing in mm, z-y-x order.

    Returns:
        bool array of the shape of ``hu``; all False when no lung core is found.
    """
    air = (hu < LUNG_THRESHOLD_HU) & ndimage.binary_erosion(body, iterations=2)
    coarse_spacing = tuple(2.0 * s for s in spacing_zyx)
    cores = _lung_cores(air[::2, ::2, ::2], coarse_spacing)
    if not cores.any():
        return np.zeros_like(air)
    nearest = ndimage.distance_transform_edt(
        cores == 0, sampling=coarse_spacing, return_distances=False, return_indices=True
    )
    territory = cores[tuple(nearest)] > 0  # coarse voxels closer to a kept lung core than to a dropped one
    territory &= ndimage.binary_dilation(cores > 0, iterations=int(np.ceil(LUNG_REACH_MM / min(coarse_spacing))))
    territory = territory.repeat(2, 0).repeat(2, 1).repeat(2, 2)[: air.shape[0], : air.shape[1], : air.shape[2]]
    lung = _largest_components(air & territory, MIN_LUNG_COMPONENT_FRACTION)
    return fill_holes_in_plane(lung) & body


def _mask_image(mask: np.ndarray, reference: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(mask.astype(np.uint8))
    out.CopyInformation(reference)
    return out


def ct_masks(image: sitk.Image, source: str = "image") -> tuple[sitk.Image, sitk.Image]:
    """Body and lung masks (uint8 0/1 images on the grid of ``image``, HU); clear errors naming ``source`` for a
    2-D image, an empty or all-air image, or a scan without lung.

    Args:
        image: 3-D CT image, HU.
        source: name of the image in error messages (e.g. its path).

    Returns:
        Tuple ``(body, lung)`` of uint8 SimpleITK images with ``image``'s geometry.

    Raises:
        ValueError: for an image that is not 3-D, holds NaN or infinite values, has less than ``MIN_BODY_ML`` of body
            or less than ``MIN_LUNG_ML`` of lung.
    """
    check_3d_image(image, source)
    hu = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(hu).all():
        raise ValueError(f"{source}: the image holds NaN or infinite values")
    body = body_mask_array(hu, tuple(image.GetSpacing()[::-1]))
    body_ml = float(body.sum()) * _voxel_ml(image)
    if body_ml < MIN_BODY_ML:
        raise ValueError(
            f"{source}: empty or all-air image: only {body_ml:.0f} ml above {BODY_THRESHOLD_HU:.0f} HU "
            f"(need {MIN_BODY_ML:.0f} ml of body); is it a CT in HU?"
        )
    lung = lung_mask_array(hu, body, tuple(image.GetSpacing()[::-1]))
    lung_ml = float(lung.sum()) * _voxel_ml(image)
    if lung_ml < MIN_LUNG_ML:
        raise ValueError(
            f"{source}: no lung found: {lung_ml:.0f} ml of air inside the body (need {MIN_LUNG_ML:.0f} ml); "
            "the artificial deformations need a chest CT with the lungs in view"
        )
    return _mask_image(body, image), _mask_image(lung, image)
