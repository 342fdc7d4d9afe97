"""Write a dataset of artificial training pairs (fixed, deformed, DVF, masks as NIfTI) and its datalist.json.

    python -m scripts.data.prepare_data --data_dir <dataset_dir> --output_dir <work_dir>/misalignment
    python -m scripts.data.prepare_data ... --regnet_level 4     # RegNet^4 pre-training pairs (max 20 mm per axis)

Each scan is resampled once to 1 mm (cubic B-spline, axis-aligned grid) and masked; pair k of a scan uses DVF
``DVF_RECIPE[k % 14]`` on the scan itself for k < 14 and on its "next image" (the scan warped by a random 15 mm
field) for 14 <= k < 28, the paper's 28 DVFs per scan. Every file is written under a temporary name and renamed, a
pair counts as done when its ``.json`` exists, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from pathlib import Path

import fire
import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from scripts.data.patch_sampling import REGNET_MAX_DEFORMATION_MM
from scripts.transforms.artificial_dvf import (
    DVF_RECIPE,
    RandArtificialDVFd,
    dvf_settings,
)
from scripts.transforms.artificial_intensity import RandNextImaged, apply_background, deform_image
from scripts.transforms.ct_masks import check_3d_image, ct_masks
from scripts.utils.atomic_write import atomic_write_image, atomic_write_text
from scripts.utils.constants import BACKGROUND_HU

SCAN_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
RECIPE_ORDER = (0, 4, 9, 13, 1, 5, 10, 2, 6, 11, 3, 7, 12, 8)  # interleave types so that small counts see all
DEFAULT_VALIDATION_SCANS = ("thorax_ricord1a_419639",)


def scan_name(path: Path) -> str:
    """File name without its image suffix."""
    for suffix in SCAN_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def find_scans(data_dir: str | Path, scans=None) -> list[Path]:
    """CT files in ``data_dir`` (optionally only the named ones), with clear errors for missing ones.

    Args:
        data_dir: folder of the CT files (``SCAN_SUFFIXES``).
        scans: optional scan name or list of names (file names without suffix); None takes every scan.

    Returns:
        Paths of the scans, sorted by name (or in the order of ``scans``).

    Raises:
        FileNotFoundError: when ``data_dir`` is not a folder, holds no scan, or lacks a named scan.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir {root} is not a directory")
    found = {scan_name(p): p for p in sorted(root.iterdir()) if p.name.endswith(SCAN_SUFFIXES)}
    if scans is None:
        if not found:
            raise FileNotFoundError(f"no CT volume ({', '.join(SCAN_SUFFIXES)}) in {root}")
        return list(found.values())
    names = [scans] if isinstance(scans, str) else list(scans)
    missing = [n for n in names if n not in found]
    if missing:
        raise FileNotFoundError(f"scans {missing} not found in {root} (have {sorted(found)})")
    return [found[n] for n in names]


def write_image(image: sitk.Image, path: Path) -> None:
    """Atomic write with fast compression (level 1: the dataset is large and rewritten rarely).

    Args:
        image: image to write.
        path: output file.
    """
    atomic_write_image(image, path, level=1)


def write_json(data, path: Path) -> None:
    """Atomic JSON write.

    Args:
        data: JSON-serialisable object.
        path: output file (indent 1).
    """
    atomic_write_text(path, json.dumps(data, indent=1))


def resample_isotropic(
    image: sitk.Image, spacing_mm: float = 1.0, interpolator=sitk.sitkBSpline, default_value: float = -1024.0
) -> sitk.Image:
    """``image`` on an axis-aligned (identity direction) grid of ``spacing_mm`` covering its bounding box; cubic
    B-spline for images (float32), nearest neighbour for masks (pass ``sitk.sitkNearestNeighbor``).

    Args:
        image: 3-D image or mask.
        spacing_mm: isotropic output voxel size, mm.
        interpolator: SimpleITK interpolator; ``sitk.sitkNearestNeighbor`` keeps the pixel type (masks).
        default_value: value outside the image, HU.

    Returns:
        The resampled SimpleITK image (float32 unless nearest neighbour).
    """
    size = np.array(image.GetSize())
    corners = [
        image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
        for corner in np.array(np.meshgrid(*[[0, n - 1] for n in size])).reshape(3, -1).T
    ]
    lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
    out_size = [int(np.floor((h - low) / spacing_mm + 1e-3)) + 1 for low, h in zip(lo, hi)]
    pixel = sitk.sitkFloat32 if interpolator != sitk.sitkNearestNeighbor else image.GetPixelID()
    return sitk.Resample(
        image,
        out_size,
        sitk.Transform(),
        interpolator,
        tuple(lo),
        (spacing_mm,) * 3,
        tuple(np.eye(3).ravel()),
        default_value,
        pixel,
    )


def pair_seed(seed: int, scan: str, index: int, max_deformation_mm: float) -> int:
    """Seed of one pair from the run seed, scan name, pair index and M: reproducible and order-independent.

    Args:
        seed: run seed.
        scan: scan name.
        index: pair index within the scan.
        max_deformation_mm: maximum deformation M, mm (rounded to 0.01 mm).

    Returns:
        A 32-bit unsigned seed.
    """
    words = [int(seed), zlib.crc32(scan.encode()), int(index), int(round(100 * max_deformation_mm))]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def prepare_scan(path: Path, scan_dir: Path) -> dict:
    """1 mm image, body and lung masks of a scan (cached in ``scan_dir``); the masked fixed image too.

    Args:
        path: CT file.
        scan_dir: cache folder of the scan.

    Returns:
        Dict with the paths ``image_1mm``, ``body_mask``, ``lung_mask`` and ``fixed`` (all NIfTI in ``scan_dir``).

    Raises:
        ValueError: for a scan that is not 3-D, is empty or has no lung (from ``check_3d_image`` and ``ct_masks``).
    """
    files = {k: scan_dir / f"{k}.nii.gz" for k in ("image_1mm", "body_mask", "lung_mask", "fixed")}
    if not all(f.is_file() for f in files.values()):
        raw = sitk.ReadImage(str(path), sitk.sitkFloat32)
        check_3d_image(raw, str(path))
        image = resample_isotropic(raw)
        body, lung = ct_masks(image, str(path))
        write_image(sitk.Cast(sitk.Round(image), sitk.sitkInt16), files["image_1mm"])
        write_image(body, files["body_mask"])
        write_image(lung, files["lung_mask"])
        write_image(sitk.Cast(sitk.Round(apply_background(image, body)), sitk.sitkInt16), files["fixed"])
    return files


def make_pair(scan_files: dict, dvf_type: str, variant: int, next_image: bool, seed: int, settings, options: dict):
    """Generate one pair; returns SimpleITK images fixed, deformed, dvf, body, lung (fixed None: the scan's).

    Args:
        scan_files: the scan's files from ``prepare_scan``.
        dvf_type: one of ``DVF_TYPES``.
        variant: parameter variant of the DVF type.
        next_image: first warp the scan by a random "next image" field.
        seed: seed of every random draw of the pair.
        settings: ``DVFSettings`` for the pair's maximum deformation.
        options: keyword arguments of ``scripts.transforms.artificial_intensity.deform_image`` (sponge, noise).

    Returns:
        Tuple ``(fixed, deformed, dvf, body, lung)`` of SimpleITK images; ``fixed`` is None unless ``next_image``.
    """
    data = {
        "image": sitk.ReadImage(str(scan_files["image_1mm"]), sitk.sitkFloat32),
        "body_mask": sitk.ReadImage(str(scan_files["body_mask"])),
        "lung_mask": sitk.ReadImage(str(scan_files["lung_mask"])),
    }
    rng = np.random.RandomState(seed)
    if next_image:
        step = RandNextImaged(settings=settings)
        step.set_random_state(state=rng)
        data = step(data)
    draw = RandArtificialDVFd(settings=settings, dvf_type=dvf_type, variant=variant)
    draw.set_random_state(state=rng)
    data = draw(data)
    deformed, _ = deform_image(rng, data["image"], data["dvf"], data["body_mask"], **options)
    fixed = apply_background(data["image"], data["body_mask"]) if next_image else None
    return fixed, deformed, data["dvf"], data["body_mask"], data["lung_mask"]


def run(
    data_dir: str,
    output_dir: str,
    dvfs_per_scan: int = 28,
    max_deformation_mm: float | None = None,
    seed: int = 0,
    scans=None,
    validation_scans=DEFAULT_VALIDATION_SCANS,
    regnet_level: int | None = None,
    noise_sigma_hu: float = 5.0,
    noise_mean_range_hu: float = 0.0,
    sponge: bool = True,
    skip_bad_scans: bool = False,
) -> str:
    """Write the pairs and ``output_dir/datalist.json``; returns the datalist path.

    ``max_deformation_mm`` defaults to 10 (misalignment network) or, with ``regnet_level`` 4/2/1, to 20/15/7.
    ``validation_scans`` go to the "validation" list, the others to "training". A scan that is 2-D, empty or has
    no lung stops the run with its file named (``skip_bad_scans=True``: skipped with a message instead).

    Args:
        data_dir: folder of the CT scans.
        output_dir: folder of the scans' cache (``scans/``), the pairs (``pairs/``) and ``datalist.json``.
        dvfs_per_scan: pairs per scan (at least 1; 28 is the paper's).
        max_deformation_mm: maximum deformation M per axis, mm (default see above).
        seed: run seed (each pair's seed comes from ``pair_seed``).
        scans: optional scan name or names to use (default: every scan in ``data_dir``).
        validation_scans: scan name(s) listed under "validation".
        regnet_level: None for misalignment-network pairs, or 4, 2, 1 for RegNet pre-training pairs.
        noise_sigma_hu: sigma of the Gaussian noise added to the deformed image, HU.
        noise_mean_range_hu: the noise mean is drawn from U(-range, range), HU; 0 keeps it 0.
        sponge: apply the sponge model (mass preservation in the lung).
        skip_bad_scans: skip a bad scan with a message instead of stopping.

    Returns:
        Path of the datalist.

    Raises:
        ValueError: for a bad ``regnet_level`` or ``dvfs_per_scan``, a bad scan (without ``skip_bad_scans``), or when
            every scan was skipped.
        FileNotFoundError: when ``data_dir`` is not a folder, holds no scan, or lacks a named scan.
    """
    if regnet_level is not None and regnet_level not in REGNET_MAX_DEFORMATION_MM:
        raise ValueError(f"regnet_level must be one of {sorted(REGNET_MAX_DEFORMATION_MM)}, got {regnet_level}")
    if max_deformation_mm is None:
        max_deformation_mm = 10.0 if regnet_level is None else REGNET_MAX_DEFORMATION_MM[regnet_level]
    if dvfs_per_scan < 1:
        raise ValueError(f"dvfs_per_scan must be at least 1, got {dvfs_per_scan}")
    settings = dvf_settings(max_deformation_mm)
    options = dict(sponge=sponge, noise_sigma_hu=noise_sigma_hu, noise_mean_range_hu=noise_mean_range_hu)
    out = Path(output_dir)
    validation = {validation_scans} if isinstance(validation_scans, str) else set(validation_scans or ())
    paths = find_scans(data_dir, scans)
    datalist: dict[str, list] = {"training": [], "validation": []}
    skipped = []
    bar = tqdm(total=len(paths) * dvfs_per_scan, desc="pairs", unit="pair")
    for path in paths:
        name = scan_name(path)
        try:
            scan_files = prepare_scan(path, out / "scans" / name)
        except ValueError as error:
            if not skip_bad_scans:
                raise
            tqdm.write(f"skipping {path}: {error}", file=sys.stderr)
            skipped.append(name)
            bar.update(dvfs_per_scan)
            continue
        for k in range(dvfs_per_scan):
            dvf_type, variant = DVF_RECIPE[RECIPE_ORDER[k % len(DVF_RECIPE)]]
            next_image = (k // len(DVF_RECIPE)) % 2 == 1
            s = pair_seed(seed, name, k, max_deformation_mm)
            stem = out / "pairs" / name / f"pair_{k:03d}"
            meta_path = stem.with_suffix(".json")
            if not meta_path.is_file():
                start = time.perf_counter()
                fixed, deformed, dvf, body, lung = make_pair(
                    scan_files, dvf_type, variant, next_image, s, settings, options
                )
                files = {
                    "fixed": scan_files["fixed"],
                    "body_mask": scan_files["body_mask"],
                    "lung_mask": scan_files["lung_mask"],
                }
                if next_image:
                    files = {k2: Path(f"{stem}_{k2}.nii.gz") for k2 in files}
                    write_image(sitk.Cast(sitk.Round(fixed), sitk.sitkInt16), files["fixed"])
                    write_image(body, files["body_mask"])
                    write_image(lung, files["lung_mask"])
                files["deformed"] = Path(f"{stem}_deformed.nii.gz")
                files["dvf"] = Path(f"{stem}_dvf.nii.gz")
                deformed_int = sitk.Cast(
                    sitk.Round(sitk.Clamp(deformed, sitk.sitkFloat32, BACKGROUND_HU, 32767)), sitk.sitkInt16
                )
                write_image(deformed_int, files["deformed"])
                write_image(sitk.Cast(dvf, sitk.sitkVectorFloat32), files["dvf"])
                meta = {key: str(p.relative_to(out)) for key, p in files.items()}
                meta.update(
                    scan=name,
                    index=k,
                    dvf_type=dvf_type,
                    variant=variant,
                    next_image=next_image,
                    max_deformation_mm=max_deformation_mm,
                    seed=s,
                    regnet_level=regnet_level,
                    seconds=round(time.perf_counter() - start, 1),
                )
                write_json(meta, meta_path)
            meta = json.loads(meta_path.read_text())
            datalist["validation" if name in validation else "training"].append(meta)
            bar.update(1)
    bar.close()
    if not datalist["training"] and not datalist["validation"]:
        raise ValueError(f"no pair was written: every scan in {data_dir} was skipped ({skipped})")
    datalist_path = out / "datalist.json"
    write_json(datalist, datalist_path)
    tqdm.write(
        f"{datalist_path}: {len(datalist['training'])} training, {len(datalist['validation'])} validation pairs"
        + (f"; skipped {skipped}" if skipped else "")
    )
    return str(datalist_path)


if __name__ == "__main__":
    fire.Fire(run)
