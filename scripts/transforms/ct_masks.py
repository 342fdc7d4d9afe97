"""Body (torso) and lung masks of a chest CT from HU thresholds and morphology (METHOD.md section 2).

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
# Lung cut by the field of view: air that touches an image face is outside air unless it looks like lung. Lung
# parenchyma smoothed over 2 mm stays above -960 HU (0.1st percentile of the lung voxels of every shared scan) and
# outside air sits at -1000 (noise averages out at 2 mm), so thick border-touching air above -975 HU after
# smoothing is a cut lung and belongs to the body.
CUT_LUNG_SMOOTHING_MM = 2.0
CUT_LUNG_MIN_HU = -975.0
MIN_CUT_LUNG_ML = 5.0  # smaller border regions (partial-volume rims, blankets) stay outside

# in-plane (y, x) connectivity only: fills holes slice by slice, so the lungs count as inside the body even though
# the airways reach the top of the scan
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def check_3d_image(image: sitk.Image, source: str = "image") -> None:
    """Raise ValueError naming ``source`` unless ``image`` is a scalar 3-D volume with at least MIN_SIZE_VOXELS
    voxels per axis (none of size zero), a positive spacing and a non-singular direction matrix."""
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
    border = np.unique(np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(), labels[:, :, 0].ravel(),
                                       labels[:, :, -1].ravel()]))  # fmt: skip
    outside = np.isin(labels, border[border > 0])
    return ~outside


def _border_labels(labels: np.ndarray) -> np.ndarray:
    """Labels (> 0) of the components of ``labels`` that touch any face of the volume."""
    faces = (labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1])
    found = np.unique(np.concatenate([f.ravel() for f in faces]))
    return found[found > 0]


def cut_lung_array(hu: np.ndarray, body: np.ndarray, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Lung that the field of view cuts open: air (below ``BODY_THRESHOLD_HU``) outside ``body`` that touches an
    image face and looks like lung (smoothed HU above ``CUT_LUNG_MIN_HU``), thicker than ``LUNG_CORE_MM`` and at least
    ``MIN_CUT_LUNG_ML``. In-plane hole filling cannot keep it: it touches the border, as outside air does. The
    thickness test drops the thin bands of outside air that smoothing lifts above the threshold along the skin and
    between the back and a table."""
    cross = ndimage.generate_binary_structure(3, 1)
    sigma = [CUT_LUNG_SMOOTHING_MM / float(s) for s in spacing_zyx]
    candidates = ~body & (hu <= BODY_THRESHOLD_HU)
    candidates &= ndimage.gaussian_filter(hu.astype(np.float32), sigma) > CUT_LUNG_MIN_HU
    labels, count = ndimage.label(candidates, structure=cross)
    keep = np.zeros(count + 1, dtype=bool)
    border = _border_labels(labels) if count else np.zeros(0, dtype=int)
    if border.size:
        coarse = labels[::2, ::2, ::2]  # thickness on a 2x coarser grid: a quarter of the cost, same decision
        depth = ndimage.distance_transform_edt(coarse > 0, sampling=[2.0 * float(s) for s in spacing_zyx])
        border = np.intersect1d(border, coarse[depth > LUNG_CORE_MM])
    if border.size:
        sizes_ml = np.bincount(labels.ravel(), minlength=count + 1)[border] * float(np.prod(spacing_zyx)) / 1000.0
        keep[border] = sizes_ml >= MIN_CUT_LUNG_ML
    return keep[labels]


def body_mask_array(hu: np.ndarray, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Torso mask of a ``(z, y, x)`` HU array (bool): threshold, largest component, in-plane hole filling, and lung
    that the field of view cuts open (``cut_lung_array``), so a crop through the lungs keeps them."""
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
    """
    air = (hu < LUNG_THRESHOLD_HU) & ndimage.binary_erosion(body, iterations=2)
    coarse_spacing = tuple(2.0 * s for s in spacing_zyx)
    cores = _lung_cores(air[::2, ::2, ::2], coarse_spacing)
    if not cores.any():
        return np.zeros_like(air)
    nearest = ndimage.distance_transform_edt(cores == 0, sampling=coarse_spacing, return_distances=False,
                                             return_indices=True)  # fmt: skip
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
    2-D image, an empty or all-air image, or a scan without lung."""
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
