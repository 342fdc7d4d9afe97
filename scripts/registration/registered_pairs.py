"""Registered artificial pairs: what a real registration leaves behind, with its exact misalignment.

For a training scan S (1 mm, as ``scripts.data.prepare_data`` caches it): draw a deformation u (the paper's
artificial DVF types with a maximum of 10-20 mm per axis, or the evaluation-style respiratory + local motion),
make the deformed image ``I(y) = S(y + u(y))`` with the usual intensity changes, then register I back onto S
with a protocol drawn as users run them. The "elastix" mix: none, translation, rigid, affine, or affine + B-spline
with 20-2000 iterations, Mattes MI or NCC, final grid 10-30 mm. The "engines" mix adds what the estimators' own
registrations do not share: B-spline grids of 5 mm, ANTs affine and ANTs SyN with few or many iterations
(``scripts.registration.ants_registration``), and inputs as users have them: the whole lung crop, one lung of it, or
both images with 5 mm slices (the pair then lives on the thick grid). The "large_errors" mix draws only what
leaves errors of several mm (none, translation, rigid, affine) on the same inputs: the regime where |r| recovers
most of the error, which the two other mixes visit too rarely for the wrong class to reach 10 % of the lung voxels.
With the found transform ``T(x) = x + t(x)``
the registered image is ``D(x) = I(T(x)) = S(T(x) + u(T(x)))``, so the exact residual misalignment at x is

    e(x) = t(x) + u(x + t(x))      (mm, vector)

Each pair stores F = S, D (int16 HU on F's grid) and e (``residual_true``, a float16 vector image), plus a JSON
record with the protocol and the seconds each step took; ``datalist.json`` lists them and a pair counts as done when
its JSON exists (an interrupted run resumes). ``estimate`` then adds the re-registration estimate r
(``residual_estimate``, ``scripts.registration.reregistration``, on the pair as the bundle's inference loads it)
for given estimator settings, recomputed when the settings change::

    python -m scripts.registration.registered_pairs make --output_dir <work_dir>/registered --pairs_per_scan 2
    python -m scripts.registration.registered_pairs make --output_dir <work_dir>/registered --pairs_per_scan 8 \
        --protocol_mix engines      # pairs 2..7 drawn from the "engines" mix
    python -m scripts.registration.registered_pairs make --output_dir <work_dir>/registered --pairs_per_scan 9 \
        --protocol_mix large_errors  # pair 8 drawn from the "large_errors" mix
    python -m scripts.registration.registered_pairs estimate --output_dir <work_dir>/registered
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import fire
import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from scripts.data.image_io import Grid, load_pair
from scripts.data.prepare_data import DEFAULT_VALIDATION_SCANS, find_scans, pair_seed, prepare_scan, scan_name
from scripts.registration.ants_registration import AntsOptions
from scripts.registration.ants_registration import register as ants_register
from scripts.registration.calibration_tables import options_sha256
from scripts.registration.elastix import (
    ElastixPair,
    RegistrationOptions,
    bspline_parameter_map,
    displacement_field,
    linear_parameter_map,
)
from scripts.registration.reregistration import ReregistrationOptions, residual_field_on_pair
from scripts.transforms.artificial_dvf import RandArtificialDVFd, dvf_settings
from scripts.transforms.artificial_intensity import deform_image as deform_artificially
from scripts.transforms.evaluation_deformation import deform_scan, draw_deformation
from scripts.utils.atomic_write import atomic_write_image, atomic_write_text

logger = logging.getLogger(__name__)

TRAINING_SEED_OFFSET = 7_000_000  # evaluation-style draws for training use seeds far from the benchmark's (0..)
PROTOCOLS = ("none", "translation", "rigid", "affine", "bspline")
PROTOCOL_WEIGHTS = (0.08, 0.1, 0.1, 0.17, 0.55)
# the "engines" mix: other engines, finer grids and user-cut inputs beside elastix's usual settings
ENGINE_PROTOCOLS = ("none", "rigid", "affine", "bspline", "ants_affine", "ants_syn")
ENGINE_PROTOCOL_WEIGHTS = (0.05, 0.05, 0.1, 0.4, 0.1, 0.3)
ANTS_SYN_ITERATIONS = {"few": (20, 10, 0), "many": (100, 70, 0)}  # 1 mm levels cost minutes on 2 cores
INPUTS = ("whole", "one_lung", "thick_5mm")
INPUT_WEIGHTS = (0.5, 0.25, 0.25)
THICK_SLICE_MM = 5.0
# the "large_errors" mix: registrations that leave several mm, on the same user inputs
LARGE_ERROR_PROTOCOLS = ("none", "translation", "rigid", "affine")
LARGE_ERROR_PROTOCOL_WEIGHTS = (0.25, 0.3, 0.3, 0.15)
PROTOCOL_MIXES = ("elastix", "engines", "large_errors")
DEFORMATIONS = ("single_frequency", "mixed_frequency", "respiratory_motion", "evaluation")
EVALUATION_ATTEMPTS = 5
CROP_MARGIN_MM = 15  # the scan is cropped to its lungs plus this margin: the misalignment that matters is there


def draw_protocol(rng: np.random.RandomState, mix: str = "elastix") -> dict:
    """A registration protocol as users run them (kind, iterations, metric, final grid spacing, seed; with the
    "engines" mix also the engine's settings and the input variant).

    Args:
        rng: random state of the draw.
        mix: "elastix" (the former draws, unchanged), "engines" or "large_errors" (see the module).

    Returns:
        Dict with ``kind`` and ``seed``; B-spline: ``iterations``, ``metric``, ``grid_spacing_mm``; ANTs SyN:
        ``syn_iterations``; "engines" and "large_errors": ``input``.
    """
    if mix not in PROTOCOL_MIXES:
        raise ValueError(f"unknown protocol mix {mix!r}; choose one of {PROTOCOL_MIXES}")
    engines = mix == "engines"
    kinds, weights = {
        "elastix": (PROTOCOLS, PROTOCOL_WEIGHTS),
        "engines": (ENGINE_PROTOCOLS, ENGINE_PROTOCOL_WEIGHTS),
        "large_errors": (LARGE_ERROR_PROTOCOLS, LARGE_ERROR_PROTOCOL_WEIGHTS),
    }[mix]
    kind = str(rng.choice(kinds, p=weights))
    protocol = {"kind": kind, "seed": int(rng.randint(1, 2**31 - 1))}
    if kind == "bspline":
        protocol.update(
            iterations=int(round(np.exp(rng.uniform(np.log(20), np.log(2000))))),
            metric=str(rng.choice(["AdvancedMattesMutualInformation", "AdvancedNormalizedCorrelation"])),
            grid_spacing_mm=float(rng.choice([5.0, 10.0, 20.0, 30.0] if engines else [10.0, 15.0, 20.0, 25.0, 30.0])),
        )
    if kind == "ants_syn":
        protocol["syn_iterations"] = list(ANTS_SYN_ITERATIONS[str(rng.choice(list(ANTS_SYN_ITERATIONS)))])
    if mix != "elastix":
        protocol["input"] = str(rng.choice(INPUTS, p=INPUT_WEIGHTS))
    return protocol


def user_displacement(fixed: sitk.Image, moving: sitk.Image, protocol: dict, threads: int = 2) -> sitk.Image | None:
    """The displacement ``t`` of ``protocol``'s registration of ``moving`` onto ``fixed`` on ``fixed``'s grid
    (elastix or ANTs), or None for "none".

    Args:
        fixed: fixed image, HU.
        moving: moving image, HU.
        protocol: protocol from ``draw_protocol``.
        threads: number of threads.

    Returns:
        SimpleITK vector image (mm) or None.
    """
    kind = protocol["kind"]
    if kind.startswith("ants_"):
        options = AntsOptions(
            transform=kind.removeprefix("ants_"),
            syn_iterations=tuple(protocol.get("syn_iterations", AntsOptions.syn_iterations)),
            threads=threads,
            random_seed=protocol["seed"],
        )
        return ants_register(fixed, moving, options, name="user registration")
    maps = register_with_protocol(fixed, moving, protocol, threads)
    return None if maps is None else displacement_field(maps, fixed)


def user_input(variant: str, images: dict[str, sitk.Image], rng: np.random.RandomState) -> dict[str, sitk.Image]:
    """The pair as a user has it: ``images`` ("image", "deformed", "body", "lung" on one grid) as they are
    ("whole"), cut to one lung's half of the lung box plus 10 mm ("one_lung"), or with 5 mm slices ("thick_5mm":
    both images smoothed with the slice profile along z and resampled; masks by nearest neighbour).

    Args:
        variant: one of ``INPUTS``.
        images: name -> SimpleITK image, all on one grid.
        rng: random state (the side of the one-lung cut).

    Returns:
        Dict with the same keys on the variant's grid.
    """
    if variant == "whole":
        return images
    if variant == "one_lung":
        lung = sitk.GetArrayViewFromImage(images["lung"]) > 0
        columns = np.flatnonzero(lung.any(axis=(0, 1)))
        middle = int((columns[0] + columns[-1]) // 2)
        margin = int(np.ceil(10.0 / images["lung"].GetSpacing()[0]))
        size_x = images["lung"].GetSize()[0]
        lo, hi = (0, min(size_x, middle + margin)) if rng.rand() < 0.5 else (max(0, middle - margin), size_x)
        size = list(images["lung"].GetSize())
        size[0] = hi - lo
        return {k: sitk.RegionOfInterest(im, size, [lo, 0, 0]) for k, im in images.items()}
    if variant != "thick_5mm":
        raise ValueError(f"unknown input variant {variant!r}; choose one of {INPUTS}")
    reference = images["image"]
    spacing = list(reference.GetSpacing())
    size = list(reference.GetSize())
    size[2] = int(np.floor(size[2] * spacing[2] / THICK_SLICE_MM))
    spacing[2] = THICK_SLICE_MM
    out = {}
    for key, image in images.items():
        is_mask = key in ("body", "lung")
        if not is_mask:  # a slice's profile: Gaussian along z with a FWHM of the slice thickness
            image = sitk.DiscreteGaussian(sitk.Cast(image, sitk.sitkFloat32), [0.0, 0.0, (THICK_SLICE_MM / 2.355) ** 2])
        interpolator = sitk.sitkNearestNeighbor if is_mask else sitk.sitkLinear
        out[key] = sitk.Resample(
            image,
            size,
            sitk.Transform(),
            interpolator,
            reference.GetOrigin(),
            spacing,
            reference.GetDirection(),
            0 if is_mask else -1000.0,
            image.GetPixelID(),
        )
    return out


def register_with_protocol(fixed: sitk.Image, moving: sitk.Image, protocol: dict, threads: int = 2):
    """elastix transform maps of ``protocol`` registering ``moving`` onto ``fixed`` (None for "none").

    Args:
        fixed: fixed image (the scan crop), HU.
        moving: moving image (the deformed scan), HU.
        protocol: protocol from ``draw_protocol``: ``kind`` and ``seed``; with "bspline" also ``iterations``,
            ``metric`` and ``grid_spacing_mm``.
        threads: number of elastix threads.

    Returns:
        List of elastix transform parameter maps (linear stage first), or None for the "none" protocol.
    """
    kind = protocol["kind"]
    if kind == "none":
        return None
    options = RegistrationOptions(random_seed=protocol["seed"], threads=threads)
    pair = ElastixPair(fixed, moving, options)
    linear = "affine" if kind == "bspline" else kind
    maps = pair.register([linear_parameter_map(linear, options)])
    if kind == "bspline":
        options.metric = protocol["metric"]
        options.grid_spacing_mm = protocol["grid_spacing_mm"]
        maps = pair.register([bspline_parameter_map(protocol["iterations"], options)], initial=maps)
    return maps


def crop_to_lungs(images: dict[str, sitk.Image], lung: sitk.Image, margin_mm: float = CROP_MARGIN_MM) -> dict:
    """Every image of ``images`` (same grid as ``lung``) cropped to the lung bounding box plus ``margin_mm``.

    Args:
        images: name -> SimpleITK image, all on ``lung``'s grid.
        lung: lung mask (non-zero inside).
        margin_mm: margin added on every side of the lung bounding box, mm (clipped at the image border).

    Returns:
        Dict with the same keys and the cropped images.

    Raises:
        ValueError: when the lung mask is empty.
    """
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(lung > 0, sitk.sitkUInt8))
    if not stats.HasLabel(1):
        raise ValueError("registered pairs: the scan's lung mask is empty")
    x, y, z, sx, sy, sz = stats.GetBoundingBox(1)
    m = [int(np.ceil(margin_mm / s)) for s in lung.GetSpacing()]
    lo = [max(0, v - mi) for v, mi in zip((x, y, z), m)]
    hi = [min(n, v + s + mi) for v, s, mi, n in zip((x, y, z), (sx, sy, sz), m, lung.GetSize())]
    return {k: sitk.RegionOfInterest(im, [h - low for low, h in zip(lo, hi)], lo) for k, im in images.items()}


def deform(rng: np.random.RandomState, kind: str, image: sitk.Image, body: sitk.Image, lung: sitk.Image, seed: int):
    """The deformed image and its deformation as a SimpleITK transform ``y -> y + u(y)``; ``max_mm`` drawn.

    Args:
        rng: random state (draws ``max_mm`` and the artificial DVF and intensity changes).
        kind: "evaluation" or one of the artificial DVF types ("single_frequency", "mixed_frequency",
            "respiratory_motion").
        image: scan crop, HU.
        body: body mask on the grid of ``image``.
        lung: lung mask on the grid of ``image``.
        seed: pair seed; evaluation-style draws use ``TRAINING_SEED_OFFSET + seed + attempt``.

    Returns:
        Tuple ``(deformed, field_u, info)``: the float32 deformed image, the displacement field u (SimpleITK vector
        image on its coarse grid, mm) and a dict describing the draw (``attempt``, or ``kind``, ``max_deformation_mm``
        and ``variant``).
    """
    if kind == "evaluation":
        for attempt in range(EVALUATION_ATTEMPTS):  # a draw that folds is refused by draw_deformation: draw again
            try:
                deformation = draw_deformation(image, body, lung, seed=TRAINING_SEED_OFFSET + seed + attempt)
                break
            except ValueError as error:
                logger.info("%s", error)
        else:  # its sliding motion folds on some lung crops: fall back to the paper's respiratory motion
            logger.warning("evaluation deformation folds on this scan (seed %d): respiratory motion instead", seed)
            return deform(rng, "respiratory_motion", image, body, lung, seed)
        deformed = deform_scan(image, body, lung, deformation, seed=TRAINING_SEED_OFFSET + seed + attempt)
        return sitk.Cast(deformed, sitk.sitkFloat32), deformation.field, {"attempt": attempt}
    max_mm = float(rng.choice([10.0, 15.0, 20.0]))
    draw = RandArtificialDVFd(settings=dvf_settings(max_mm), dvf_type=kind)
    draw.set_random_state(state=rng)
    data = draw({"image": image, "body_mask": body, "lung_mask": lung})
    deformed, _ = deform_artificially(rng, image, data["dvf"], body)
    return deformed, data["dvf"], {"kind": kind, "max_deformation_mm": max_mm, "variant": int(data["variant"])}


def true_residual(field_u: sitk.Image, transform, fixed: sitk.Image) -> np.ndarray:
    """``e(x) = t(x) + u(x + t(x))`` on ``fixed``'s grid, ``[3, z, y, x]`` mm (x, y, z components).

    Args:
        field_u: the deformation u as a SimpleITK vector image, mm.
        transform: the registration: elastix transform parameter maps, its displacement t as a SimpleITK vector
            image on ``fixed``'s grid, or None for the identity.
        fixed: image whose grid the residual is computed on.

    Returns:
        float32 array ``[3, z, y, x]`` of e, mm (components x-y-z).
    """
    u = sitk.Cast(field_u, sitk.sitkVectorFloat64)
    if transform is None:
        t = np.zeros((3,) + tuple(fixed.GetSize()[::-1]), dtype=np.float32)
        resampled = sitk.Resample(u, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, u.GetPixelID())
    else:
        t_image = transform if isinstance(transform, sitk.Image) else displacement_field(transform, fixed)
        t = np.moveaxis(sitk.GetArrayFromImage(t_image), -1, 0)
        warp = sitk.DisplacementFieldTransform(sitk.Cast(t_image, sitk.sitkVectorFloat64))
        resampled = sitk.Resample(u, fixed, warp, sitk.sitkLinear, 0.0, u.GetPixelID())
    return t + np.moveaxis(sitk.GetArrayFromImage(resampled), -1, 0).astype(np.float32)


def write_vector(field: np.ndarray, reference: sitk.Image, path: Path) -> Path:
    """A ``[3, z, y, x]`` field as a float16-valued float32 vector image (half the compressed size) on ``reference``.

    Args:
        field: ``[3, z, y, x]`` vector field (components x-y-z), mm.
        reference: image whose geometry the written image takes.
        path: output file (written atomically, compression level 1).

    Returns:
        The written path.
    """
    image = sitk.GetImageFromArray(np.moveaxis(field.astype(np.float16).astype(np.float32), 0, -1), isVector=True)
    image.CopyInformation(reference)
    return atomic_write_image(image, path, level=1)


def make_registered_pair(
    scan_files: dict, out_stem: Path, seed: int, kind: str, threads: int = 2, protocol_mix: str = "elastix"
) -> dict:
    """One registered pair of a scan (files written beside ``out_stem``); returns its record.

    Args:
        scan_files: the scan's files from ``prepare_scan`` (``image_1mm``, ``body_mask``, ``lung_mask``).
        out_stem: path prefix of the written files (``<out_stem>_fixed.nii.gz``, ``_registered``, ``_body_mask``,
            ``_lung_mask``, ``_residual_true``).
        seed: seed of the deformation and protocol draws.
        kind: deformation kind, one of ``DEFORMATIONS``.
        threads: number of elastix threads.
        protocol_mix: "elastix", "engines" or "large_errors" (``draw_protocol``).

    Returns:
        The pair's record: file paths, deformation, protocol, seed, size, lung residual median and 95th percentile
        (mm), lung class fractions and seconds per step.

    Raises:
        ValueError: when the scan's lung mask is empty.
    """
    rng = np.random.RandomState(seed)
    seconds = {}
    t0 = time.perf_counter()
    loaded = {
        "image": sitk.ReadImage(str(scan_files["image_1mm"]), sitk.sitkFloat32),
        "body": sitk.ReadImage(str(scan_files["body_mask"])),
        "lung": sitk.ReadImage(str(scan_files["lung_mask"])),
    }
    crop = crop_to_lungs(loaded, loaded["lung"])
    deformed, field_u, extra = deform(rng, kind, crop["image"], crop["body"], crop["lung"], seed)
    kind = extra.pop("kind", kind)
    seconds["deform"] = time.perf_counter() - t0
    protocol = draw_protocol(rng, protocol_mix)
    cut = user_input(protocol.get("input", "whole"), {**crop, "deformed": deformed}, rng)
    crop = {k: cut[k] for k in ("image", "body", "lung")}
    t0 = time.perf_counter()
    t = user_displacement(crop["image"], cut["deformed"], protocol, threads)
    seconds["register"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if t is None:
        registered = cut["deformed"]
    else:
        warp = sitk.DisplacementFieldTransform(sitk.Cast(t, sitk.sitkVectorFloat64))
        registered = sitk.Resample(cut["deformed"], crop["image"], warp, sitk.sitkBSpline, -1000.0, sitk.sitkFloat32)
    registered = sitk.Cast(sitk.Round(sitk.Clamp(registered, sitk.sitkFloat32, -32768, 32767)), sitk.sitkInt16)
    registered.CopyInformation(crop["image"])
    residual = true_residual(field_u, t, crop["image"])
    seconds["resample"] = time.perf_counter() - t0

    files = {k: Path(f"{out_stem}_{k}.nii.gz") for k in ("fixed", "registered", "body_mask", "lung_mask")}
    atomic_write_image(sitk.Cast(sitk.Round(crop["image"]), sitk.sitkInt16), files["fixed"], level=1)
    atomic_write_image(registered, files["registered"], level=1)
    atomic_write_image(crop["body"], files["body_mask"], level=1)
    atomic_write_image(crop["lung"], files["lung_mask"], level=1)
    files["residual_true"] = write_vector(residual, crop["image"], Path(f"{out_stem}_residual_true.nii.gz"))

    lung = sitk.GetArrayViewFromImage(crop["lung"]) > 0
    magnitude = np.linalg.norm(residual, axis=0)[lung]
    classes = np.bincount(np.digitize(magnitude, (3.0, 6.0)), minlength=3) / max(magnitude.size, 1)
    return {
        **{k: str(v) for k, v in files.items()},
        "deformation": kind,
        **extra,
        "protocol": protocol,
        "seed": seed,
        "size": list(crop["image"].GetSize()),
        "lung_residual_mm": {"median": float(np.median(magnitude)), "p95": float(np.percentile(magnitude, 95))},
        "lung_class_fractions": [round(float(c), 4) for c in classes],
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def estimate_pair(record: dict, options: ReregistrationOptions, suffix: str = "residual_estimate") -> dict:
    """Add the re-registration estimate r of one pair (``<stem>_<suffix>.nii.gz``) for ``options``; the pair is
    loaded as the bundle's inference loads it (``options.input_spacing_mm``, ``options.mask_background``) and elastix
    samples its region. Returns the updated record.

    Args:
        record: registered-pair record (``fixed`` and ``registered`` paths, earlier estimates under ``suffix``).
        options: re-registration settings.
        suffix: record key and file-name suffix of the estimate.

    Returns:
        The record with ``suffix`` -> {``path``, ``options_sha256``, ``seconds``}; unchanged when an estimate for
        ``options`` already exists.

    Raises:
        ValueError: when the pair is not loaded on the fixed image's own grid.
    """
    digest = options_sha256(options)
    done = record.get(suffix) if isinstance(record.get(suffix), dict) else {}
    if done.get("options_sha256") == digest and Path(done.get("path", "")).is_file():
        return record
    t0 = time.perf_counter()
    pair = load_pair(record["fixed"], record["registered"], None, options.input_spacing_mm, options.mask_background)
    name = f"registered pair {record['fixed']}"
    estimate = residual_field_on_pair(pair.image, pair.region, pair.grid.spacing, options, name=name)
    seconds = time.perf_counter() - t0
    reference = sitk.ReadImage(record["fixed"])
    if not pair.grid.same_as(Grid.of(reference)):
        raise ValueError(f"{name}: estimates are stored on the fixed image's grid; load it on its own grid")
    path = write_vector(
        estimate, reference, Path(record["registered"].replace("_registered.nii.gz", f"_{suffix}.nii.gz"))
    )
    return {**record, suffix: {"path": str(path), "options_sha256": digest, "seconds": round(seconds, 1)}}


def estimate(
    output_dir: str,
    suffix: str = "residual_estimate",
    working_spacing_mm: float | None = ReregistrationOptions.working_spacing_mm,
    threads: int = 2,
    splits: str | tuple[str, ...] = ("training", "validation"),
    first_only: bool = False,
    **changes,
) -> str:
    """Add the estimate of every pair of ``output_dir/datalist.json`` (default settings, or ``changes`` to them
    such as ``--bspline_iterations 1000``, written under another ``suffix``); ``first_only``: only each scan's
    pair 0 (for settings comparisons). Returns the datalist path.

    Args:
        output_dir: folder holding ``datalist.json`` of ``run``.
        suffix: record key and file-name suffix of the estimates.
        working_spacing_mm: registration grid of the estimator, mm; None or 0 for the images' own resolution.
        threads: number of elastix threads.
        splits: datalist split(s) to process, a name or a tuple of names.
        first_only: only the pairs with index 0.
        **changes: other ``ReregistrationOptions`` fields that differ from the defaults.

    Returns:
        Path of the updated datalist.
    """
    options = ReregistrationOptions(working_spacing_mm=working_spacing_mm or None, threads=threads, **changes)
    datalist_path = Path(output_dir) / "datalist.json"
    datalist = json.loads(datalist_path.read_text())
    for split in (splits,) if isinstance(splits, str) else splits:
        for i, record in enumerate(tqdm(datalist[split], desc=f"estimates ({split})", unit="pair")):
            if first_only and record["index"] != 0:
                continue
            record_path = record.get("record") or record["registered"].replace("_registered.nii.gz", ".json")
            if Path(record_path).is_file():  # the pair's own JSON holds its newest estimates, a datalist may be older
                record = {**record, **json.loads(Path(record_path).read_text())}
            record = estimate_pair(record, options, suffix)
            datalist[split][i] = record
            atomic_write_text(Path(record_path), json.dumps({**record, "record": record_path}, indent=1))
            atomic_write_text(datalist_path, json.dumps(datalist, indent=1))
    return str(datalist_path)


def run(
    data_dir: str,
    output_dir: str,
    pairs_per_scan: int = 6,
    seed: int = 0,
    scans=None,
    validation_scans=DEFAULT_VALIDATION_SCANS,
    threads: int = 2,
    protocol_mix: str = "elastix",
) -> str:
    """Write ``pairs_per_scan`` registered pairs of every scan and ``output_dir/datalist.json`` (every pair in
    ``output_dir``, ``list_pairs``); returns its path.
    Deformation kinds cycle through ``DEFORMATIONS``, shifted by one per scan so that few pairs per scan still
    cover every kind.

    Args:
        data_dir: folder of the CT scans.
        output_dir: folder of the scans' cache (``scans/``), the pairs (``pairs/``) and ``datalist.json``.
        pairs_per_scan: registered pairs per scan.
        seed: run seed (each pair's seed comes from ``pair_seed``).
        scans: optional scan name or names to use (default: every scan in ``data_dir``).
        validation_scans: scan name(s) listed under "validation"; the others go to "training".
        threads: number of elastix threads.
        protocol_mix: "elastix", "engines" or "large_errors" (``draw_protocol``) for the pairs this run writes;
            pairs already written keep theirs.

    Returns:
        Path of the datalist.

    Raises:
        FileNotFoundError: when ``data_dir`` is not a folder, holds no scan, or lacks a named scan.
    """
    out = Path(output_dir)
    paths = find_scans(data_dir, scans)
    bar = tqdm(total=len(paths) * pairs_per_scan, desc="registered pairs", unit="pair")
    for scan_index, path in enumerate(paths):
        name = scan_name(path)
        scan_files = prepare_scan(path, out / "scans" / name)
        for k in range(pairs_per_scan):
            kind = DEFORMATIONS[(k + scan_index) % len(DEFORMATIONS)]
            stem = out / "pairs" / name / f"pair_{k:03d}"
            record_path = stem.with_suffix(".json")
            if not record_path.is_file():
                stem.parent.mkdir(parents=True, exist_ok=True)
                s = pair_seed(seed, name, k, 99.0)
                record = make_registered_pair(scan_files, stem, s, kind, threads, protocol_mix)
                record.update(scan=name, index=k, record=str(record_path))
                atomic_write_text(record_path, json.dumps(record, indent=1))
                tqdm.write(
                    f"{stem.name} {name}: {kind}, {record['protocol']}, lung classes "
                    f"{record['lung_class_fractions']}, {record['seconds']} s"
                )
            bar.update(1)
    bar.close()
    datalist = list_pairs(out, validation_scans)
    datalist_path = out / "datalist.json"
    atomic_write_text(datalist_path, json.dumps(datalist, indent=1))
    return str(datalist_path)


def list_pairs(output_dir: str | Path, validation_scans) -> dict[str, list]:
    """Every pair record under ``output_dir/pairs`` (scans in name order, pairs by index), split into "training" and
    "validation": a run for some scans, or with another mix, lists the pairs earlier runs wrote beside its own.

    Args:
        output_dir: folder of ``run``'s ``pairs/<scan>/pair_NNN.json``.
        validation_scans: scan name(s) listed under "validation"; the others go to "training".
    """
    validation = {validation_scans} if isinstance(validation_scans, str) else set(validation_scans or ())
    datalist: dict[str, list] = {"training": [], "validation": []}
    for scan_dir in sorted(p for p in (Path(output_dir) / "pairs").glob("*") if p.is_dir()):
        for record_path in sorted(scan_dir.glob("pair_[0-9][0-9][0-9].json")):
            record = json.loads(record_path.read_text())
            datalist["validation" if scan_dir.name in validation else "training"].append(record)
    return datalist


if __name__ == "__main__":
    fire.Fire({"make": run, "estimate": estimate})
