"""Reproduce the shipped sample pair (sample_data/): a real elastix registration with its exact residual error.

Made the way registered pairs are (scripts.registration.registered_pairs): LIDC-IDRI-0002 (1.25 mm slices, CC BY 3.0)
at 1 mm, cropped to both lungs, deformed with intensity changes, then registered back with elastix (affine), so the
registered image D keeps the residual misalignment such registrations leave. The deformation is drawn as for the
registered training pairs: the evaluation-style motion folds on this scan (its lung bases lie 24 mm above the
scan's lower edge), so ``deform`` falls back to the paper's respiratory motion (20 mm here). The exact residual
``e(x) = t(x) + u(x + t(x))`` gives every landmark's true error ``tre = |e|``. F and D are shipped at ``spacing``
mm (int16) to stay a few MB; landmarks are Förstner points in the lungs. Arrays are in SimpleITK's (z, y, x) order.

CLI::

    python -m scripts.registration.sample_pair --scan <dataset_dir>/thorax_lidc_idri_0002.nii.gz \
        --output_dir sample_data
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from scripts.data.landmark_csv import table_from_points, write_landmarks
from scripts.data.landmark_selection import select_landmarks
from scripts.data.prepare_data import prepare_scan
from scripts.registration.elastix import deform_image
from scripts.registration.registered_pairs import crop_to_lungs, deform, register_with_protocol, true_residual
from scripts.utils.atomic_write import atomic_write_image

logger = logging.getLogger(__name__)

# an affine registration (elastix, Mattes MI) of a breathing motion leaves the lung bases misaligned: the sample
# shows correct, poor and wrong regions (lung voxels 53 / 36 / 11 %)
PROTOCOL = {"kind": "affine", "seed": 7}


def resample_to_spacing(image: sitk.Image, spacing: float, interpolator=sitk.sitkLinear) -> sitk.Image:
    """``image`` on an isotropic ``spacing`` mm grid over the same extent (int16 images smoothed first).

    Args:
        image: 3-D image or mask.
        spacing: isotropic output voxel size, mm.
        interpolator: SimpleITK interpolator; ``sitk.sitkNearestNeighbor`` for masks (no smoothing, 0 outside).

    Returns:
        The resampled image (int16 input: int16 HU clamped to [-1024, 3071]; -1024 outside for images).
    """
    size = [int(np.floor((n - 1) * s / spacing)) + 1 for n, s in zip(image.GetSize(), image.GetSpacing())]
    reference = sitk.Image(size, image.GetPixelID())
    reference.SetSpacing([spacing] * 3)
    reference.SetOrigin(image.GetOrigin())
    reference.SetDirection(image.GetDirection())
    source = image
    if interpolator != sitk.sitkNearestNeighbor:  # anti-aliasing before the coarser grid
        sigma = 0.5 * np.sqrt(max(spacing**2 - min(image.GetSpacing()) ** 2, 0.0))
        source = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), sigma)
    background = 0.0 if interpolator == sitk.sitkNearestNeighbor else -1024.0
    out = sitk.Resample(source, reference, sitk.Transform(), interpolator, background)
    if image.GetPixelID() == sitk.sitkInt16:
        out = sitk.Cast(sitk.Round(sitk.Clamp(out, sitk.sitkFloat32, -1024, 3071)), sitk.sitkInt16)
    return out


def residual_at_points(residual: np.ndarray, reference: sitk.Image, points: np.ndarray) -> np.ndarray:
    """``[N, 3]`` residual vectors (mm) at physical ``points`` from the ``[3, z, y, x]`` field on ``reference``.

    Args:
        residual: ``[3, z, y, x]`` residual field on ``reference``'s grid, mm.
        reference: image whose geometry the field has.
        points: ``[N, 3]`` physical points, LPS mm (x-y-z order).

    Returns:
        Array ``[N, 3]`` of linearly interpolated residual vectors, mm.
    """
    index = np.array([reference.TransformPhysicalPointToContinuousIndex(tuple(map(float, p))) for p in points])
    zyx = index[:, ::-1].T  # continuous (x, y, z) index -> (z, y, x) coordinates
    return np.stack([ndimage.map_coordinates(c, zyx, order=1, mode="nearest") for c in residual], axis=1)


def make_sample_pair(
    scan: str,
    output_dir: str = "sample_data",
    spacing: float = 2.0,
    seed: int = 3,
    landmark_count: int = 60,
    cache_dir: str | None = None,
    threads: int = 2,
) -> dict:
    """Write ``fixed.nii.gz``, ``moving.nii.gz`` (registered, on the fixed grid) and ``landmarks.csv``
    (id, x, y, z, tre) to ``output_dir``; returns a summary of the true residual errors.

    Args:
        scan: source CT file.
        output_dir: folder of the written files.
        spacing: isotropic voxel size of the shipped images, mm.
        seed: seed of the deformation.
        landmark_count: number of landmarks to select in the lungs.
        cache_dir: folder for the prepared 1 mm scan; None uses a temporary folder.
        threads: number of elastix threads.

    Returns:
        Dict with ``size``, ``landmarks``, ``tre_mean``, ``tre_max`` (mm), ``landmark_classes``,
        ``lung_voxel_class_fractions`` and the file ``bytes``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        files = prepare_scan(Path(scan), Path(cache_dir or tmp) / Path(scan).name.split(".")[0])
        loaded = {
            "image": sitk.ReadImage(str(files["image_1mm"]), sitk.sitkFloat32),
            "body": sitk.ReadImage(str(files["body_mask"])),
            "lung": sitk.ReadImage(str(files["lung_mask"])),
        }
    crop = crop_to_lungs(loaded, loaded["lung"])
    rng = np.random.RandomState(seed)
    deformed, field_u, _ = deform(rng, "evaluation", crop["image"], crop["body"], crop["lung"], seed)
    maps = register_with_protocol(crop["image"], deformed, PROTOCOL, threads)
    registered = deform_image(maps, deformed, crop["image"])
    registered.CopyInformation(crop["image"])
    residual = true_residual(field_u, maps, crop["image"])

    fixed_out = resample_to_spacing(sitk.Cast(sitk.Round(crop["image"]), sitk.sitkInt16), spacing)
    moving_out = resample_to_spacing(
        sitk.Cast(sitk.Round(sitk.Clamp(registered, sitk.sitkFloat32, -1024, 3071)), sitk.sitkInt16), spacing
    )
    lung_out = resample_to_spacing(crop["lung"], spacing, sitk.sitkNearestNeighbor)
    points = select_landmarks(fixed_out, lung_out, count=landmark_count, min_spacing_mm=15.0)
    tre = np.linalg.norm(residual_at_points(residual, crop["image"], points), axis=1)
    out = Path(output_dir)
    atomic_write_image(fixed_out, out / "fixed.nii.gz")
    atomic_write_image(moving_out, out / "moving.nii.gz")
    write_landmarks(table_from_points(points, {"tre": np.round(tre, 2)}), out / "landmarks.csv")
    lung = sitk.GetArrayViewFromImage(crop["lung"]) > 0
    magnitude = np.linalg.norm(residual, axis=0)[lung]
    summary = {
        "size": fixed_out.GetSize(),
        "landmarks": len(points),
        "tre_mean": round(float(tre.mean()), 2),
        "tre_max": round(float(tre.max()), 2),
        "landmark_classes": np.bincount(np.digitize(tre, (3.0, 6.0)), minlength=3).tolist(),
        "lung_voxel_class_fractions": np.round(
            np.bincount(np.digitize(magnitude, (3.0, 6.0)), minlength=3) / magnitude.size, 3
        ).tolist(),
        "bytes": {n: (out / n).stat().st_size for n in ("fixed.nii.gz", "moving.nii.gz")},
    }
    logger.info("sample pair written to %s: %s", out, summary)
    return summary


if __name__ == "__main__":
    import fire

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fire.Fire(lambda **kwargs: print(make_sample_pair(**kwargs)))
