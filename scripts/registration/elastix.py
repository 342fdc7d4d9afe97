"""Conventional registration of the evaluation protocol (docs/method.md section 9) with itk-elastix.

The paper's five settings from poor to good (``paper``): ``affine``, and a B-spline registration after that affine
with 20, 100, 500 or 2000 iterations (``bspline20`` ... ``bspline2000``). Three coarser settings make the protocol
closer to what users run and give every class enough landmarks: ``none`` (the moving image as it is),
``translation`` and ``rigid``. Two settings by other engines keep an estimator that copies the protocol's own
method from scoring by agreement alone: ``ncc_bspline500`` (the B-spline with normalised correlation instead of
mutual information) and ``ants_syn`` (ANTs: affine, then SyN, ``scripts.registration.ants_registration``); ``all``
is the ten. Both stages use Mattes mutual information (32 bins), adaptive
stochastic gradient descent (step size estimated by displacement distribution, 3000 random samples per iteration)
and 3 resolutions; the B-spline grid ends at 10 mm (schedule 4-2-1); a fixed ``RandomSeed`` makes runs repeatable.
The parameter maps are read from ``configs/elastix/<family>_{affine,bspline}.txt`` (the protocol's and the
re-registration's), the files elastix's own command line reads; the options set only the parameters they name.
The affine result is computed once and shared by every B-spline setting of a run. Registration may run on a
coarser isotropic working grid (``working_spacing_mm``); the deformed moving image is always resampled with the
found transform on the full-resolution fixed grid.

Transformix maps FIXED-space points to MOVING space, T(x_F), which is what the target registration error needs:
TRE_i = || x_M^i - T(x_F^i) ||.

CLI::

    python -m scripts.registration.elastix --fixed F --moving M --output_dir D --setting bspline500 \\
        [--fixed_landmarks P.csv] [--moving_landmarks Q.csv] [--working_spacing_mm 2] [--threads 2]
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import itk
import numpy as np
import SimpleITK as sitk

from scripts.data import image_io
from scripts.data.landmark_csv import LandmarkTable, read_landmarks, write_landmarks
from scripts.registration.ants_registration import AntsOptions
from scripts.registration.ants_registration import register as ants_register
from scripts.utils.atomic_write import atomic_write_image, atomic_write_text
from scripts.utils.constants import BACKGROUND_HU

BSPLINE_ITERATIONS = {"bspline20": 20, "bspline100": 100, "bspline500": 500, "bspline2000": 2000}
PAPER_SETTINGS = ("affine",) + tuple(BSPLINE_ITERATIONS)
LINEAR_SETTINGS = ("translation", "rigid")
OTHER_ENGINE_SETTINGS = ("ncc_bspline500", "ants_syn")
SETTINGS = ("none",) + LINEAR_SETTINGS + PAPER_SETTINGS + OTHER_ENGINE_SETTINGS
MAPPED_COLUMNS = ("x_moving", "y_moving", "z_moving")  # T(x_F): where the registration maps a fixed landmark
TRE_COLUMN = "tre"


@dataclass
class RegistrationOptions:
    """elastix settings shared by all five protocol settings (the iteration counts come from the setting name)."""

    number_of_resolutions: int = 3
    affine_iterations: int = 500
    number_of_spatial_samples: int = 3000
    number_of_histogram_bins: int = 32
    metric: str = "AdvancedMattesMutualInformation"  # or "AdvancedNormalizedCorrelation" (same-modality CT)
    grid_spacing_mm: float = 10.0  # final B-spline control point spacing
    random_seed: int = 20210101
    threads: int = 2
    working_spacing_mm: float | None = None  # None: register at the images' own resolution
    default_value: float = BACKGROUND_HU  # deformed image outside the moving scan
    # ASGD step-size estimation: "DisplacementDistribution" (Qiao et al. 2016) took 8 s where elastix's default
    # "Original" took 74 s for one B-spline stage of the validation scan at 2 mm on 2 busy cores
    asgd_estimation: str = "DisplacementDistribution"
    # the parameter files these options start from: configs/elastix/<family>_affine.txt and _bspline.txt
    parameter_family: ClassVar[str] = "protocol"


def parse_settings(setting: str | list[str] | tuple[str, ...]) -> list[str]:
    """Setting names from ``"bspline500"``, ``"affine,bspline20"``, a list, ``"paper"`` (the paper's five) or
    ``"all"``; clear error if unknown."""
    names = setting.split(",") if isinstance(setting, str) else list(setting)
    names = [str(n).strip() for n in names if str(n).strip()]
    if names == ["all"]:
        return list(SETTINGS)
    if names == ["paper"]:
        return list(PAPER_SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names:
        raise ValueError(
            f"unknown registration setting(s) {unknown or names}; choose from {list(SETTINGS)}, 'paper' or 'all'"
        )
    return [n for n in SETTINGS if n in names]  # protocol order, no duplicates


ELASTIX_PARAMETER_DIR = Path(__file__).resolve().parents[2] / "configs" / "elastix"


def read_parameter_file(path: str | Path) -> dict[str, list[str]]:
    """An elastix parameter file (the text format elastix's command line reads) as a parameter map."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: elastix parameter file not found")
    parameter_object = itk.ParameterObject.New()
    parameter_object.ReadParameterFile(str(path))
    return _maps_of(parameter_object)[0]


def stage_parameter_map(stage: str, options: RegistrationOptions, iterations: int) -> dict[str, list[str]]:
    """The parameter map of ``stage`` ("affine" or "bspline"): ``configs/elastix/<family>_<stage>.txt`` (the family of
    ``options``: the protocol's or the re-registration's settings), with the parameters the options control set from
    them; with the options' defaults the map is the file itself.

    Args:
        stage: "affine" or "bspline" (names the parameter file).
        options: registration options; ``parameter_family`` picks the file, the other fields override its values.
        iterations: ``MaximumNumberOfIterations`` per resolution.

    Returns:
        elastix parameter map (parameter name -> list of string values).

    Raises:
        FileNotFoundError: when the parameter file does not exist.
    """
    out = read_parameter_file(ELASTIX_PARAMETER_DIR / f"{options.parameter_family}_{stage}.txt")
    out.update(
        {
            "Metric": [options.metric],
            "NumberOfHistogramBins": [str(options.number_of_histogram_bins)],
            "ASGDParameterEstimationMethod": [options.asgd_estimation],
            "MaximumNumberOfIterations": [str(iterations)],
            "NumberOfResolutions": [str(options.number_of_resolutions)],
            "NumberOfSpatialSamples": [str(options.number_of_spatial_samples)],
            "RandomSeed": [str(options.random_seed)],
            "DefaultPixelValue": [str(options.default_value)],
        }
    )
    if stage == "bspline":
        n = options.number_of_resolutions
        out["FinalGridSpacingInPhysicalUnits"] = [str(options.grid_spacing_mm)]
        out["GridSpacingSchedule"] = [str(2.0 ** (n - 1 - k)) for k in range(n)]  # e.g. 4 2 1
    return out


def affine_parameter_map(options: RegistrationOptions) -> dict[str, list[str]]:
    """elastix parameter map of the affine stage (centre-of-geometry initialisation, automatic scales)."""
    return stage_parameter_map("affine", options, options.affine_iterations)


def linear_parameter_map(transform: str, options: RegistrationOptions) -> dict[str, list[str]]:
    """elastix parameter map of a translation, rigid (Euler) or affine stage: the affine file with its transform
    replaced.

    Args:
        transform: "translation", "rigid" or "affine".
        options: registration options (see ``stage_parameter_map``).

    Returns:
        elastix parameter map (parameter name -> list of string values).

    Raises:
        ValueError: when ``transform`` is not one of the three.
    """
    transforms = {"translation": "TranslationTransform", "rigid": "EulerTransform", "affine": "AffineTransform"}
    if transform not in transforms:
        raise ValueError(f"unknown linear transform {transform!r}; choose from {sorted(transforms)}")
    out = affine_parameter_map(options)
    out["Transform"] = [transforms[transform]]
    if transform == "translation":
        del out["AutomaticScalesEstimation"]
        # the displacement-distribution step-size estimate failed on translations (no sample left inside the
        # moving image after the first steps); elastix's original estimate works
        out["ASGDParameterEstimationMethod"] = ["Original"]
    return out


def bspline_parameter_map(iterations: int, options: RegistrationOptions) -> dict[str, list[str]]:
    """elastix parameter map of the B-spline stage: ``iterations`` per resolution, grid spacing halved per level.

    Args:
        iterations: ``MaximumNumberOfIterations`` per resolution.
        options: registration options (final grid spacing ``grid_spacing_mm``, number of resolutions, ...).

    Returns:
        elastix parameter map (parameter name -> list of string values).
    """
    return stage_parameter_map("bspline", options, iterations)


def read_image(path: str | Path, what: str = "image") -> sitk.Image:
    """Read a 3-D scalar image (float32) through ``scripts.data.image_io.read_image``: one set of checks (missing,
    truncated or corrupt file, not 3-D, zero-size axis, singular direction, NaN), errors naming ``what`` and the
    file.

    Args:
        path: image file.
        what: name of the image in error messages, e.g. "fixed image".

    Returns:
        The 3-D float32 SimpleITK image.

    Raises:
        MissingInputError: when the file does not exist.
        InputError: when the file fails one of the checks above.
    """
    return image_io.read_image(path, what)


def sitk_to_itk(image: sitk.Image, pixel_type: type = np.float32) -> itk.Image:
    """Same voxels and geometry as an itk image (numpy order (z, y, x) is shared by both libraries).

    Args:
        image: 3-D SimpleITK image.
        pixel_type: numpy dtype of the itk image's voxels (default float32; uint8 for masks).

    Returns:
        itk image with the same origin, spacing and direction (voxels copied).
    """
    out = itk.image_from_array(np.array(sitk.GetArrayViewFromImage(image), dtype=pixel_type))  # a copy, never a view
    out.SetOrigin(image.GetOrigin())
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(itk.matrix_from_array(np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)))
    return out


def itk_to_sitk(image: itk.Image) -> sitk.Image:
    """Same voxels and geometry as a SimpleITK image."""
    out = sitk.GetImageFromArray(itk.array_from_image(image))
    out.SetOrigin(tuple(float(v) for v in image.GetOrigin()))
    out.SetSpacing(tuple(float(v) for v in image.GetSpacing()))
    out.SetDirection(tuple(float(v) for v in itk.array_from_matrix(image.GetDirection()).ravel()))
    return out


def resample_to_working_grid(image: sitk.Image, spacing_mm: float, is_mask: bool = False) -> sitk.Image:
    """Resample to an isotropic ``spacing_mm`` grid over the same extent; images are Gaussian-smoothed first
    (sigma = half the spacing increase) against aliasing, masks use nearest neighbour.

    Args:
        image: 3-D image or mask.
        spacing_mm: isotropic voxel size of the working grid, mm.
        is_mask: nearest-neighbour resampling to uint8 (no smoothing, 0 outside) instead of linear float32 (the
            image's minimum outside).

    Returns:
        The resampled SimpleITK image (same direction, same physical box).
    """
    old = np.array(image.GetSpacing())
    size = np.maximum(1, np.round(old * np.array(image.GetSize()) / spacing_mm)).astype(int)
    if not is_mask:
        sigma = 0.5 * np.sqrt(np.maximum(spacing_mm**2 - old**2, 0.0))
        if sigma.max() > 0:
            image = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), [float(s) for s in sigma])
    # keep the first voxel's corner where it was, so the grid covers the same physical box
    direction = np.array(image.GetDirection()).reshape(3, 3)
    corner = np.array(image.GetOrigin()) - direction @ (old / 2)
    origin = corner + direction @ (np.full(3, spacing_mm) / 2)
    return sitk.Resample(
        image,
        [int(s) for s in size],
        sitk.Transform(),
        sitk.sitkNearestNeighbor if is_mask else sitk.sitkLinear,
        [float(v) for v in origin],
        [float(spacing_mm)] * 3,
        image.GetDirection(),
        0.0 if is_mask else float(np.min(sitk.GetArrayViewFromImage(image))),
        sitk.sitkUInt8 if is_mask else sitk.sitkFloat32,
    )


def _parameter_object(maps: list[dict[str, list[str]]]) -> itk.ParameterObject:
    po = itk.ParameterObject.New()
    for m in maps:
        po.AddParameterMap(m)
    return po


def _maps_of(parameter_object: itk.ParameterObject) -> list[dict[str, list[str]]]:
    return [
        {k: list(v) for k, v in dict(parameter_object.GetParameterMap(i)).items()}
        for i in range(parameter_object.GetNumberOfParameterMaps())
    ]


class ElastixPair:
    """A fixed/moving pair prepared for elastix (float32 itk images on the working grid, optional uint8 masks)."""

    def __init__(
        self,
        fixed: sitk.Image,
        moving: sitk.Image,
        options: RegistrationOptions,
        fixed_mask: sitk.Image | None = None,
        moving_mask: sitk.Image | None = None,
    ) -> None:
        self.options = options
        spacing = options.working_spacing_mm
        prepare = (
            (lambda im, m=False: resample_to_working_grid(im, spacing, m)) if spacing else (lambda im, m=False: im)
        )
        self.fixed = sitk_to_itk(prepare(fixed))
        self.moving = sitk_to_itk(prepare(moving))
        self.fixed_mask = sitk_to_itk(prepare(fixed_mask, True), np.uint8) if fixed_mask is not None else None
        self.moving_mask = sitk_to_itk(prepare(moving_mask, True), np.uint8) if moving_mask is not None else None

    def register(self, maps: list[dict[str, list[str]]], initial: list[dict[str, list[str]]] | None = None):
        """Run elastix with ``maps`` after the ``initial`` transform; returns all maps (initial ones first).

        Args:
            maps: elastix parameter maps to run, in order.
            initial: transform parameter maps of an earlier registration to start from (e.g. the affine result).
                None starts from the identity.

        Returns:
            List of transform parameter maps, the ``initial`` ones first.
        """
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(self.options.threads)
        method = itk.ElastixRegistrationMethod.New(self.fixed, self.moving)
        method.SetParameterObject(_parameter_object(maps))
        if initial:
            method.SetInitialTransformParameterObject(_parameter_object(initial))
        if self.fixed_mask is not None:
            method.SetFixedMask(self.fixed_mask)
        if self.moving_mask is not None:
            method.SetMovingMask(self.moving_mask)
        method.SetLogToConsole(False)
        method.SetNumberOfThreads(self.options.threads)
        method.Update()
        result = _maps_of(method.GetTransformParameterObject())
        return result if initial is None or len(result) > len(maps) else list(initial) + result


def transform_points(transform_maps: list[dict[str, list[str]]], points: np.ndarray, moving: itk.Image) -> np.ndarray:
    """Map ``[N, 3]`` FIXED-space physical points (LPS mm) to MOVING space with transformix: T(x_F).

    Args:
        transform_maps: transform parameter maps of a registration; empty for the identity (setting "none").
        points: ``[N, 3]`` fixed-space physical points, LPS mm (x-y-z order).
        moving: the moving itk image (transformix needs one).

    Returns:
        float64 array ``[N, 3]`` of T(x_F) in moving space, LPS mm.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if not transform_maps:  # setting "none": the identity
        return points.copy()
    mesh = itk.Mesh[itk.F, 3].New()
    for i, p in enumerate(points):
        mesh.SetPoint(i, itk.Point[itk.F, 3]([float(v) for v in p]))
    transformix = itk.TransformixFilter[type(moving)].New()
    transformix.SetMovingImage(moving)
    transformix.SetTransformParameterObject(_parameter_object(transform_maps))
    transformix.SetInputMesh(mesh)
    transformix.SetLogToConsole(False)
    transformix.Update()
    out = transformix.GetOutputMesh()
    return np.array([list(out.GetPoint(i)) for i in range(len(points))], dtype=np.float64)


def on_grid(transform_maps: list[dict[str, list[str]]], reference: sitk.Image) -> list[dict[str, list[str]]]:
    """The transform maps with their output grid set to ``reference``'s (full resolution, whatever grid
    the registration ran on).

    Args:
        transform_maps: transform parameter maps of a registration.
        reference: image whose size, spacing, origin and direction become the maps' output grid.

    Returns:
        New list of maps with the grid entries replaced and ``ResultImagePixelType`` "float".
    """
    grid = {
        "Size": [str(s) for s in reference.GetSize()],
        "Spacing": [repr(float(s)) for s in reference.GetSpacing()],
        "Origin": [repr(float(s)) for s in reference.GetOrigin()],
        "Direction": [repr(float(s)) for s in reference.GetDirection()],
        "ResultImagePixelType": ["float"],
    }
    return [dict(m, **grid) for m in transform_maps]


def displacement_field(transform_maps: list[dict[str, list[str]]], fixed: sitk.Image) -> sitk.Image:
    """``T(x) - x`` in mm (physical x, y, z components) at every voxel ``x`` of ``fixed``'s grid: a float32
    SimpleITK vector image with ``fixed``'s geometry (transformix's deformation field).

    Args:
        transform_maps: transform parameter maps of a registration.
        fixed: image whose grid the field is computed on.

    Returns:
        float32 SimpleITK vector image (components x-y-z, mm) with ``fixed``'s geometry.
    """
    placeholder = sitk_to_itk(sitk.Image([2, 2, 2], sitk.sitkFloat32))
    transformix = itk.TransformixFilter[type(placeholder)].New()
    transformix.SetMovingImage(placeholder)
    transformix.SetTransformParameterObject(_parameter_object(on_grid(transform_maps, fixed)))
    transformix.ComputeDeformationFieldOn()
    transformix.SetLogToConsole(False)
    with tempfile.TemporaryDirectory(prefix="transformix_") as folder:
        transformix.SetOutputDirectory(folder)  # transformix also writes the field to disk: not to the caller's cwd
        transformix.Update()
    field = np.asarray(itk.array_from_image(transformix.GetOutputDeformationField()), dtype=np.float32)
    out = sitk.GetImageFromArray(field, isVector=True)
    out.CopyInformation(fixed)
    return out


def deform_image(transform_maps: list[dict[str, list[str]]], moving: sitk.Image, fixed: sitk.Image) -> sitk.Image:
    """The moving image resampled through the transform on the full-resolution fixed grid (cubic B-spline),
    rounded to int16 HU; no maps (setting "none"): the identity.

    Args:
        transform_maps: transform parameter maps of a registration; empty for the identity.
        moving: moving image, HU.
        fixed: fixed image whose full-resolution grid the result takes.

    Returns:
        int16 SimpleITK image (HU, clipped to the int16 range) on ``fixed``'s grid.
    """
    if not transform_maps:
        resampled = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkBSpline, BACKGROUND_HU, sitk.sitkFloat32)
        return sitk.Cast(sitk.Round(sitk.Clamp(resampled, sitk.sitkFloat32, -32768, 32767)), sitk.sitkInt16)
    maps = on_grid(transform_maps, fixed)
    moving_itk = sitk_to_itk(moving)
    transformix = itk.TransformixFilter[type(moving_itk)].New()
    transformix.SetMovingImage(moving_itk)
    transformix.SetTransformParameterObject(_parameter_object(maps))
    transformix.SetLogToConsole(False)
    transformix.Update()
    deformed = itk_to_sitk(transformix.GetOutput())
    array = np.clip(np.rint(sitk.GetArrayViewFromImage(deformed)), -32768, 32767).astype(np.int16)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(fixed)
    return out


def _stem(path: str | Path) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def landmark_errors(
    fixed_table: LandmarkTable, mapped: np.ndarray, moving_table: LandmarkTable | None = None
) -> LandmarkTable:
    """The fixed landmark table plus columns x/y/z_moving = T(x_F) and, given moving landmarks, ``tre`` (mm).

    Args:
        fixed_table: fixed-image landmark table.
        mapped: ``[N, 3]`` mapped points T(x_F), LPS mm, one row per landmark.
        moving_table: optional corresponding moving-image landmarks (same row order).

    Returns:
        The fixed table with ``x_moving``, ``y_moving``, ``z_moving`` and, with ``moving_table``, ``tre`` columns.

    Raises:
        ValueError: when the two tables have different numbers of landmarks.
    """
    table = fixed_table
    for j, name in enumerate(MAPPED_COLUMNS):
        table = table.with_column(name, mapped[:, j])
    if moving_table is not None:
        if len(moving_table) != len(fixed_table):
            raise ValueError(
                f"{moving_table.source}: {len(moving_table)} moving landmarks but {fixed_table.source} has "
                f"{len(fixed_table)} fixed landmarks; they must correspond row by row"
            )
        tre = np.linalg.norm(moving_table.points() - mapped, axis=1)
        table = table.with_column(TRE_COLUMN, tre)
    return table


def register_pair(
    fixed: str | Path,
    moving: str | Path,
    output_dir: str | Path,
    setting: str | list[str] = "all",
    fixed_landmarks: str | Path | None = None,
    moving_landmarks: str | Path | None = None,
    fixed_mask: str | Path | None = None,
    moving_mask: str | Path | None = None,
    options: RegistrationOptions | None = None,
) -> dict:
    """Register ``moving`` to ``fixed`` with each requested setting; write ``<stem>_<setting>.nii.gz`` (int16 HU on
    the fixed grid), ``<stem>_<setting>_points.csv`` (fixed landmarks + T(x_F) [+ tre]), the elastix transform
    maps (``<stem>_<setting>_transform.json``) and a JSON log; returns the log (seconds per setting, files).

    Args:
        fixed: fixed image file.
        moving: moving image file.
        output_dir: folder of the outputs.
        setting: setting name(s), see ``parse_settings`` (e.g. "all", "paper", "affine,bspline20").
        fixed_landmarks: optional CSV of fixed-image landmarks (LPS mm).
        moving_landmarks: optional CSV of the corresponding moving-image landmarks; needs ``fixed_landmarks``.
        fixed_mask: optional fixed-image mask file for elastix.
        moving_mask: optional moving-image mask file for elastix.
        options: registration options (default ``RegistrationOptions()``).

    Returns:
        The log dict: inputs, options, working size, ``prepare_s``, ``affine_s`` and per setting the written files,
        ``registration_s``, ``resample_s`` and, with both landmark files, ``tre_mean_mm`` and ``tre_median_mm``.

    Raises:
        ValueError: for an unknown setting, a bad landmark file, moving landmarks without fixed ones, or landmark
            tables of different length.
        InputError: for an unreadable or invalid image (``MissingInputError`` for a missing one).
    """
    options = options or RegistrationOptions()
    names = parse_settings(setting)
    fixed_image = read_image(fixed, "fixed image")
    moving_image = read_image(moving, "moving image")
    fixed_table = read_landmarks(fixed_landmarks) if fixed_landmarks else None
    moving_table = read_landmarks(moving_landmarks) if moving_landmarks else None
    if moving_table is not None and fixed_table is None:
        raise ValueError(f"{moving_landmarks}: moving landmarks need --fixed_landmarks as well")
    if fixed_table is not None and moving_table is not None and len(fixed_table) != len(moving_table):
        raise ValueError(
            f"{moving_landmarks}: {len(moving_table)} moving landmarks but {fixed_landmarks} has "
            f"{len(fixed_table)} fixed landmarks; they must correspond row by row"
        )
    masks = [read_image(p, "mask") if p else None for p in (fixed_mask, moving_mask)]
    output_dir = Path(output_dir)
    stem = _stem(moving)

    t0 = time.perf_counter()
    pair = ElastixPair(fixed_image, moving_image, options, *masks)
    log: dict = {
        "fixed": str(fixed),
        "moving": str(moving),
        "options": asdict(options),
        "working_size": list(pair.fixed.shape[::-1]),
        "prepare_s": time.perf_counter() - t0,
        "settings": {},
    }
    t0 = time.perf_counter()
    shares_affine = set(PAPER_SETTINGS) | {"ncc_bspline500"}
    affine = pair.register([affine_parameter_map(options)]) if set(names) & shares_affine else []
    affine_s = time.perf_counter() - t0
    for name in names:
        t0 = time.perf_counter()
        if name == "ants_syn":
            entry = _register_with_ants(fixed_image, moving_image, fixed_table, moving_table, output_dir, stem, options)
            log["settings"][name] = entry
            continue
        if name == "none":
            maps = []
        elif name in LINEAR_SETTINGS:
            maps = pair.register([linear_parameter_map(name, options)])
        elif name == "affine":
            maps = affine
        elif name == "ncc_bspline500":
            ncc = replace(options, metric="AdvancedNormalizedCorrelation")
            maps = pair.register([bspline_parameter_map(500, ncc)], initial=affine)
        else:
            maps = pair.register([bspline_parameter_map(BSPLINE_ITERATIONS[name], options)], initial=affine)
        # every paper setting includes the (shared) affine stage
        register_s = time.perf_counter() - t0 + (affine_s if name in shares_affine else 0.0)
        t0 = time.perf_counter()
        image_path = atomic_write_image(
            deform_image(maps, moving_image, fixed_image), output_dir / f"{stem}_{name}.nii.gz"
        )
        entry = {"image": str(image_path), "registration_s": register_s, "resample_s": time.perf_counter() - t0}
        if fixed_table is not None:
            mapped = transform_points(maps, fixed_table.points(), pair.moving)
            entry.update(_landmark_entry(fixed_table, mapped, moving_table, output_dir / f"{stem}_{name}_points.csv"))
        transform_path = output_dir / f"{stem}_{name}_transform.json"
        entry["transform"] = str(atomic_write_text(transform_path, json.dumps(maps)))
        log["settings"][name] = entry
    log["affine_s"] = affine_s
    atomic_write_text(output_dir / f"{stem}_registration.json", json.dumps(log, indent=1))
    return log


def _landmark_entry(
    fixed_table: LandmarkTable, mapped: np.ndarray, moving_table: LandmarkTable | None, path: Path
) -> dict:
    """Write the fixed landmarks with T(x_F) (and their TRE) to ``path``: the log entry's ``points`` and, with
    moving landmarks, ``tre_mean_mm`` and ``tre_median_mm``."""
    table = landmark_errors(fixed_table, mapped, moving_table)
    entry: dict = {"points": str(write_landmarks(table, path))}
    if moving_table is not None:
        tre = np.array(table.float_columns([TRE_COLUMN])[:, 0])
        entry["tre_mean_mm"] = float(tre.mean())
        entry["tre_median_mm"] = float(np.median(tre))
    return entry


def _register_with_ants(
    fixed_image: sitk.Image,
    moving_image: sitk.Image,
    fixed_table: LandmarkTable | None,
    moving_table: LandmarkTable | None,
    output_dir: Path,
    stem: str,
    options: RegistrationOptions,
) -> dict:
    """The ``ants_syn`` setting: ANTs affine + SyN (``AntsOptions``' defaults, the protocol's seed, one thread: ANTs
    repeats bit for bit only there, so a benchmark's rows can be carried between runs) on the protocol's working grid
    like elastix's settings (its field interpolated onto the fixed grid); the registered image, the mapped landmarks
    and the displacement field written as ``register_pair`` writes them."""
    t0 = time.perf_counter()
    ants_options = AntsOptions(transform="syn", threads=1, random_seed=options.random_seed)
    spacing = options.working_spacing_mm
    fixed_w, moving_w = (
        (resample_to_working_grid(im, spacing) for im in (fixed_image, moving_image))
        if spacing
        else (fixed_image, moving_image)
    )
    field = ants_register(fixed_w, moving_w, ants_options, name=f"{stem} (setting ants_syn)")
    if spacing:
        resampler = sitk.ResampleImageFilter()
        resampler.SetReferenceImage(fixed_image)
        resampler.SetInterpolator(sitk.sitkLinear)
        resampler.SetOutputPixelType(field.GetPixelID())
        resampler.SetUseNearestNeighborExtrapolator(True)
        field = resampler.Execute(field)
    register_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warp = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    deformed = sitk.Resample(moving_image, fixed_image, warp, sitk.sitkBSpline, options.default_value, sitk.sitkFloat32)
    deformed = sitk.Cast(sitk.Round(sitk.Clamp(deformed, sitk.sitkFloat32, -32768, 32767)), sitk.sitkInt16)
    image_path = atomic_write_image(deformed, output_dir / f"{stem}_ants_syn.nii.gz")
    entry = {"image": str(image_path), "registration_s": register_s, "resample_s": time.perf_counter() - t0}
    if fixed_table is not None:
        mapped = np.array([warp.TransformPoint(tuple(float(v) for v in p)) for p in fixed_table.points()])
        entry.update(_landmark_entry(fixed_table, mapped, moving_table, output_dir / f"{stem}_ants_syn_points.csv"))
    entry["transform"] = str(atomic_write_image(field, output_dir / f"{stem}_ants_syn_field.nii.gz", level=1))
    return entry


def main(
    fixed: str,
    moving: str,
    output_dir: str,
    setting: str = "all",
    fixed_landmarks: str | None = None,
    moving_landmarks: str | None = None,
    fixed_mask: str | None = None,
    moving_mask: str | None = None,
    working_spacing_mm: float | None = None,
    threads: int = 2,
    seed: int = RegistrationOptions.random_seed,
    samples: int = RegistrationOptions.number_of_spatial_samples,
    affine_iterations: int = RegistrationOptions.affine_iterations,
    asgd_estimation: str = RegistrationOptions.asgd_estimation,
) -> None:
    """CLI: register with the named setting(s) (``all``, ``affine``, ``bspline20``, ... or a comma list); prints
    the seconds per setting.

    Args:
        fixed: fixed image file.
        moving: moving image file.
        output_dir: folder of the outputs.
        setting: setting name(s), see ``parse_settings``.
        fixed_landmarks: optional CSV of fixed-image landmarks (LPS mm).
        moving_landmarks: optional CSV of the corresponding moving-image landmarks.
        fixed_mask: optional fixed-image mask file.
        moving_mask: optional moving-image mask file.
        working_spacing_mm: isotropic registration grid, mm; None or 0 registers at the images' own resolution.
        threads: number of elastix threads.
        seed: elastix ``RandomSeed``.
        samples: random spatial samples per iteration.
        affine_iterations: iterations per resolution of the affine stage.
        asgd_estimation: ASGD step-size estimation method, e.g. "DisplacementDistribution" or "Original".
    """
    options = RegistrationOptions(
        threads=int(threads),
        random_seed=int(seed),
        number_of_spatial_samples=int(samples),
        affine_iterations=int(affine_iterations),
        asgd_estimation=str(asgd_estimation),
        working_spacing_mm=float(working_spacing_mm) if working_spacing_mm else None,
    )
    log = register_pair(
        fixed, moving, output_dir, setting, fixed_landmarks, moving_landmarks, fixed_mask, moving_mask, options
    )
    for name, entry in log["settings"].items():
        tre = f", mean TRE {entry['tre_mean_mm']:.2f} mm" if "tre_mean_mm" in entry else ""
        print(
            f"{name}: registration {entry['registration_s']:.1f} s (affine {log['affine_s']:.1f} s shared), "
            f"resample {entry['resample_s']:.1f} s{tre} -> {entry['image']}"
        )


if __name__ == "__main__":
    import fire

    fire.Fire(main)
