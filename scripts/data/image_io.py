"""Reading, checking, resampling and atomically writing the CT images of a misalignment run (SimpleITK).

Images stay SimpleITK images (physical LPS mm) until the working grid is built: both images re-oriented to LPS on the
fixed image's extent, at 1 mm for the network or on the fixed image's own voxels for the re-registration. Arrays
taken from them are in SimpleITK's numpy order (z, y, x). Every check raises ``InputError`` (a ``ValueError``) or
``MissingInputError`` (a ``FileNotFoundError``) whose message names the file and the problem.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from scripts.transforms.ct_masks import (
    AIR_HU,
    CUT_LUNG_MIN_HU,
    CUT_LUNG_SMOOTHING_MM,
    LUNG_THRESHOLD_HU,
    body_mask_array,
)
from scripts.utils.class_decision import weighted_argmax
from scripts.utils.constants import BACKGROUND_HU, UNASSESSED_ERROR_MM, UNASSESSED_LABEL

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
GRID_TOLERANCE = 1e-3  # relative to the voxel size / unit direction: grids closer than this are the same grid
MIN_SIZE_VOXELS = 4  # fewer voxels than this along an axis is a 2-D image stored as 3-D
MIN_DIRECTION_DETERMINANT = 1e-6  # |det| of the direction matrix below this: a singular (degenerate) orientation
MIN_WORKING_SPACING_MM = 1.0  # the re-registration's grid is the fixed image's own, no finer than this per axis
GZIP_MAGIC = b"\x1f\x8b"
STREAM_CHUNK_BYTES = 1 << 22  # compressed streams are verified in 4 MiB chunks
METAIMAGE_ELEMENT_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 4,
    "MET_ULONG": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


class InputError(ValueError):
    """A bad input file (wrong dimension, NaN, no overlap, bad landmark table ...); the message names the file."""


class MissingInputError(InputError, FileNotFoundError):
    """An input file that does not exist."""


@dataclass
class Grid:
    """Geometry of an image grid: size (x, y, z voxels), origin and spacing (mm), direction (row-major 3x3)."""

    size: Tuple[int, int, int]
    origin: Tuple[float, float, float]
    spacing: Tuple[float, float, float]
    direction: Tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Grid":
        """The grid of a SimpleITK image."""
        return cls(tuple(image.GetSize()), image.GetOrigin(), image.GetSpacing(), image.GetDirection())

    def as_arrays(self) -> dict:
        """The grid as numpy arrays (what a MONAI collate can batch)."""
        return {
            "size": np.asarray(self.size, dtype=np.int64),
            "origin": np.asarray(self.origin, dtype=np.float64),
            "spacing": np.asarray(self.spacing, dtype=np.float64),
            "direction": np.asarray(self.direction, dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict) -> "Grid":
        """Inverse of ``as_arrays`` (accepts numpy arrays or torch tensors)."""

        def values(key: str) -> list:
            return np.asarray(arrays[key]).reshape(-1).tolist()

        return cls(
            tuple(int(v) for v in values("size")),
            tuple(float(v) for v in values("origin")),
            tuple(float(v) for v in values("spacing")),
            tuple(float(v) for v in values("direction")),
        )

    def image(self, values: np.ndarray) -> sitk.Image:
        """A SimpleITK image on this grid from a ``(z, y, x)`` or ``(z, y, x, c)`` array (c becomes components)."""
        image = sitk.GetImageFromArray(values, isVector=values.ndim == 4)
        if tuple(image.GetSize()) != tuple(self.size):
            raise ValueError(f"array of shape {values.shape} does not fit a grid of size {self.size} (x, y, z)")
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image

    def physical_point(self, index: Sequence[float]) -> np.ndarray:
        """Physical LPS point (mm) of a continuous (x, y, z) index."""
        direction = np.asarray(self.direction).reshape(3, 3)
        return np.asarray(self.origin) + direction @ (np.asarray(index, dtype=float) * np.asarray(self.spacing))

    def continuous_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous (x, y, z) indices of physical LPS points ``[N, 3]`` (mm)."""
        direction = np.asarray(self.direction).reshape(3, 3)
        offset = np.asarray(points, dtype=float).reshape(-1, 3) - np.asarray(self.origin)
        return (np.linalg.solve(direction, offset.T).T) / np.asarray(self.spacing)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Which physical points ``[N, 3]`` lie inside the image (voxel centres +- half a voxel)."""
        index = self.continuous_index(points)
        return np.all((index >= -0.5) & (index <= np.asarray(self.size) - 0.5), axis=1)

    def bounds(self) -> Tuple[np.ndarray, np.ndarray]:
        """Axis-aligned physical bounding box (lower, upper corners, mm) of the image's voxels."""
        corners = [
            self.physical_point([(-0.5 if c == 0 else n - 0.5) for c, n in zip(corner, self.size)])
            for corner in np.ndindex(2, 2, 2)
        ]
        corners_array = np.stack(corners)
        return corners_array.min(axis=0), corners_array.max(axis=0)

    def same_as(self, other: "Grid") -> bool:
        """Whether two grids coincide (size exactly; origin, spacing, direction within GRID_TOLERANCE)."""
        if tuple(self.size) != tuple(other.size):
            return False
        spacing = np.asarray(self.spacing)
        return bool(
            np.allclose(self.spacing, other.spacing, rtol=GRID_TOLERANCE, atol=0)
            and np.all(np.abs(np.subtract(self.origin, other.origin)) <= GRID_TOLERANCE * spacing.min())
            and np.allclose(self.direction, other.direction, atol=GRID_TOLERANCE)
        )

    def resampler(self, interpolator: int, default_value: float, output_type: int) -> sitk.ResampleImageFilter:
        """A SimpleITK resampler onto this grid.

        Args:
            interpolator: SimpleITK interpolator, e.g. ``sitk.sitkLinear`` or ``sitk.sitkNearestNeighbor``.
            default_value: value of output voxels outside the input image.
            output_type: SimpleITK pixel type of the output, e.g. ``sitk.sitkFloat32``.

        Returns:
            A ``sitk.ResampleImageFilter`` with this grid's size, origin, spacing and direction.
        """
        resampler = sitk.ResampleImageFilter()
        resampler.SetSize([int(v) for v in self.size])
        resampler.SetOutputOrigin(self.origin)
        resampler.SetOutputSpacing(self.spacing)
        resampler.SetOutputDirection(self.direction)
        resampler.SetInterpolator(interpolator)
        resampler.SetDefaultPixelValue(default_value)
        resampler.SetOutputPixelType(output_type)
        return resampler


def image_stem(path: str | os.PathLike) -> str:
    """File name without its image extension (``moving.nii.gz`` -> ``moving``)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def read_image(path: str | os.PathLike, role: str = "image") -> sitk.Image:
    """Read a scalar 3-D image as float32; clear errors for a missing, truncated, corrupt, unreadable, non-3-D,
    empty, wrongly oriented or NaN-holding file.

    ``role`` ("fixed image", "moving image", "mask") starts every message, followed by the path.

    Args:
        path: image file (``.nii.gz``, ``.nii``, ``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr`` or any SimpleITK format).
        role: name of the image in error messages, e.g. "fixed image", "moving image", "mask".

    Returns:
        The 3-D float32 SimpleITK image (a singleton 4th axis is dropped).

    Raises:
        MissingInputError: when ``path`` is not a file.
        InputError: when the file is truncated, corrupt or unreadable, not a scalar 3-D volume (at least
            ``MIN_SIZE_VOXELS`` per axis), has a bad spacing or direction, or holds NaN or infinite values.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{role} {path}: file not found")
    check_image_file(path, role)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"{role} {path}: {_itk_read_problem(str(error))}") from None
    size = image.GetSize()
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{role} {path}: expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} "
            f"components per voxel"
        )
    if image.GetDimension() == 4 and size[3] == 1:
        image = image[:, :, :, 0]  # a 3-D volume stored with a singleton 4th axis
        size = image.GetSize()
    if 0 in size:
        raise InputError(f"{role} {path}: the image has a zero-size axis (size {size}): it holds no voxels")
    if image.GetDimension() != 3:
        raise InputError(f"{role} {path}: expected a 3-D image, got a {image.GetDimension()}-D image of size {size}")
    if min(size) < MIN_SIZE_VOXELS:
        raise InputError(f"{role} {path}: expected a 3-D volume, got size {size} (a 2-D slice?)")
    check_geometry(image, f"{role} {path}")
    image = sitk.Cast(image, sitk.sitkFloat32)
    if not np.isfinite(sitk.GetArrayViewFromImage(image)).all() or _nifti_has_nan(path):
        raise InputError(f"{role} {path}: the image holds NaN or infinite values")
    return image


def check_geometry(image: sitk.Image, source: str) -> None:
    """Raise ``InputError`` naming ``source`` for a non-positive spacing or a singular direction matrix (a header
    whose orientation maps the voxels onto a plane or a line, so no physical position is defined).

    Args:
        image: image whose header is checked.
        source: what names the image in the message (e.g. "fixed image <path>").

    Raises:
        InputError: for a non-finite or non-positive spacing, or a direction matrix that is not finite or has
            ``|det| < MIN_DIRECTION_DETERMINANT``.
    """
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise InputError(f"{source}: the voxel spacing {spacing.tolist()} must be positive")
    dimension = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(dimension, dimension)
    if not np.isfinite(direction).all() or abs(np.linalg.det(direction)) < MIN_DIRECTION_DETERMINANT:
        raise InputError(
            f"{source}: the direction matrix in the header is singular ({np.round(direction, 4).tolist()}): fix the "
            "image orientation (NIfTI qform/sform, MetaImage TransformMatrix, NRRD space directions)"
        )


def _itk_read_problem(message: str) -> str:
    """What went wrong, in words, from a SimpleITK read error (ITK's own text, without the object addresses)."""
    if "determinant is 0" in message or "orthonormal" in message:
        return "the direction matrix in the header is singular (not a valid orientation); fix the image orientation"
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    itk_lines = [i for i, line in enumerate(lines) if line.startswith("ITK ERROR")]
    reason = " ".join(lines[itk_lines[0] :]) if itk_lines else (lines[-1] if lines else "unknown reason")
    reason = re.sub(r"^ITK ERROR: \w+\(0x[0-9a-f]+\): ", "", reason)
    return f"cannot be read as an image by SimpleITK ({reason})"


def check_image_file(path: str | os.PathLike, role: str = "image") -> None:
    """Refuse a truncated or corrupt image file before SimpleITK reads it (SimpleITK fills the missing part of a
    short NIfTI file with zeros without a word): a gzip stream is read to its end (CRC and length checked), a NIfTI
    file must hold every voxel its header announces, and so must a MetaImage's data block (zlib stream verified).

    Args:
        path: image file; NIfTI (``.nii``, ``.nii.gz``) and MetaImage (``.mha``, ``.mhd``) are checked, any gzip file
            is read to its end.
        role: name of the image in error messages.

    Raises:
        InputError: when the file is empty, a gzip or zlib stream is truncated or corrupt, a MetaImage data file is
            missing, or the file holds fewer bytes than its header announces.
    """
    path = Path(path)
    name = path.name.lower()
    if path.stat().st_size == 0:
        raise InputError(f"{role} {path}: the file is empty (0 bytes)")
    with path.open("rb") as f:
        gzipped = f.read(2) == GZIP_MAGIC
    data_bytes = _gzip_stream_length(path, role) if gzipped else path.stat().st_size
    if name.endswith((".nii", ".nii.gz")):
        _check_nifti_size(path, role, data_bytes)
    elif name.endswith((".mha", ".mhd")):
        _check_metaimage_data(path, role)


def _gzip_stream_length(path: Path, role: str) -> int:
    """Decompressed length of a gzip file, reading the whole stream; ``InputError`` if it is truncated or corrupt."""
    length = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(STREAM_CHUNK_BYTES):
                length += len(chunk)
    except (EOFError, OSError, zlib.error) as error:
        raise InputError(
            f"{role} {path}: truncated or corrupt gzip stream ({error}); the file is incomplete, copy "
            "or download it again"
        ) from None
    return length


def _check_nifti_size(path: Path, role: str, data_bytes: int) -> None:
    """A NIfTI file (``data_bytes`` long once decompressed) must hold the header's voxels and no zero-size axis."""
    try:
        header = nib.load(str(path)).header
        shape = tuple(int(n) for n in header.get_data_shape())
        needed = int(header.get_data_offset()) + int(np.prod(shape)) * header.get_data_dtype().itemsize
    except Exception:  # nibabel raises many types for a header it cannot parse: SimpleITK's error will name it
        return
    if 0 in shape:
        raise InputError(f"{role} {path}: the image has a zero-size axis (NIfTI shape {shape}): it holds no voxels")
    if data_bytes < needed:
        raise InputError(
            f"{role} {path}: truncated NIfTI file: the header announces {shape} voxels ({needed} bytes with the "
            f"header) but the file holds {data_bytes} bytes; copy or download it again"
        )


def _check_metaimage_data(path: Path, role: str) -> None:
    """A MetaImage's data block (inside the .mha, or the file ``ElementDataFile`` names) must be complete: its zlib
    stream read to its end when ``CompressedData``, otherwise as long as ``DimSize`` x the element size."""
    with path.open("rb") as f:
        head = f.read(1 << 16)
    match = re.search(rb"^ElementDataFile\s*=\s*(.*?)\s*$", head, re.MULTILINE)
    if match is None:
        return  # not a MetaImage header SimpleITK can read either: its own error names the problem
    fields = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition("=") for line in head[: match.start()].decode("latin-1").splitlines())
    )
    data_file = match.group(1).decode("latin-1")
    if "HeaderSize" in fields:
        return  # data after a skipped header of its own: SimpleITK decides
    if data_file == "LOCAL":
        data_path, offset = path, match.end() + (1 if head[match.end() : match.end() + 1] == b"\n" else 0)
    elif data_file.startswith("LIST") or "%" in data_file:
        return  # a list of slice files: SimpleITK checks those
    else:
        data_path, offset = path.parent / data_file, 0
        if not data_path.is_file():
            raise InputError(f"{role} {path}: its data file {data_path} (ElementDataFile) is missing")
    try:
        voxels = int(np.prod([int(v) for v in fields["DimSize"].split()]))
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        needed = voxels * channels * METAIMAGE_ELEMENT_BYTES[fields["ElementType"]]
    except (KeyError, ValueError):
        return  # an unusual header: SimpleITK decides
    if voxels == 0:
        raise InputError(f"{role} {path}: the image has a zero-size axis (DimSize {fields['DimSize']}): no voxels")
    if fields.get("CompressedData", "False").lower() == "true":
        found, problem = _zlib_stream_length(data_path, offset)
        if problem:
            raise InputError(f"{role} {path}: corrupt or truncated compressed data in {data_path} ({problem})")
    else:
        found = data_path.stat().st_size - offset
    if found < needed:
        raise InputError(
            f"{role} {path}: truncated MetaImage data in {data_path}: DimSize {fields['DimSize']} needs {needed} "
            f"bytes, found {found}; copy or download it again"
        )


def _zlib_stream_length(path: Path, offset: int) -> Tuple[int, str]:
    """Decompressed length of the zlib stream at ``offset`` of ``path`` and a problem ("" if the stream is
    complete)."""
    decompressor = zlib.decompressobj()
    length = 0
    try:
        with path.open("rb") as f:
            f.seek(offset)
            while not decompressor.eof and (chunk := f.read(STREAM_CHUNK_BYTES)):
                length += len(decompressor.decompress(chunk))
    except zlib.error as error:
        return length, str(error)
    return length, "" if decompressor.eof else "the zlib stream ends before its end marker"


def _nifti_has_nan(path: Path) -> bool:
    """ITK's NIfTI reader turns NaN into 0, so a floating-point NIfTI file is checked again with nibabel."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return False
    data = nib.load(str(path))
    if not np.issubdtype(data.get_data_dtype(), np.floating):
        return False
    return not np.isfinite(np.asanyarray(data.dataobj)).all()


def check_overlap(
    fixed: sitk.Image, moving: sitk.Image, fixed_path: str, moving_path: str, role: str = "moving image"
) -> float:
    """Fraction of the fixed image's bounding box covered by the moving image's (or mask's, ``role``); error when
    they do not overlap in physical space.

    Args:
        fixed: fixed image.
        moving: moving image (or mask) to compare with it.
        fixed_path: path of the fixed image, for the message.
        moving_path: path of the moving image (or mask), for the message.
        role: name of ``moving`` in the message, e.g. "moving image" or "mask".

    Returns:
        Fraction (0, 1] of the fixed image's physical bounding box inside the moving image's one.

    Raises:
        InputError: when the two bounding boxes do not overlap.
    """
    f_lo, f_hi = Grid.of(fixed).bounds()
    m_lo, m_hi = Grid.of(moving).bounds()
    common = np.clip(np.minimum(f_hi, m_hi) - np.maximum(f_lo, m_lo), 0, None)
    fraction = float(np.prod(common) / np.prod(f_hi - f_lo))
    if fraction <= 0:
        raise InputError(
            f"{role} {moving_path} does not overlap the fixed image {fixed_path} in space: fixed spans "
            f"{np.round(f_lo, 1).tolist()} to {np.round(f_hi, 1).tolist()} mm, {role} spans "
            f"{np.round(m_lo, 1).tolist()} to {np.round(m_hi, 1).tolist()} mm (LPS); check the origins and directions "
            "in the headers"
        )
    return fraction


def isotropic_grid(image: sitk.Image, spacing: float = 1.0) -> Grid:
    """The grid of ``image`` re-oriented to LPS, resampled to ``spacing`` mm with the same origin and extent.

    Args:
        image: 3-D image whose extent is used.
        spacing: isotropic voxel size, mm.

    Returns:
        The LPS ``Grid`` with the same origin and extent (size rounded down).
    """
    return _resized(_lps_grid(image), (float(spacing),) * 3)


def working_grid(image: sitk.Image, spacing: float | None = 1.0, min_spacing: float = MIN_WORKING_SPACING_MM) -> Grid:
    """The grid a pair is loaded on: ``image``'s extent re-oriented to LPS, at ``spacing`` mm isotropic (the
    network's 1 mm), or with ``spacing=None`` at the image's own voxel size, each axis no finer than ``min_spacing``
    (thick slices stay thick, sub-millimetre voxels are coarsened: the re-registration's grid).

    Args:
        image: 3-D image (the fixed image) whose extent is used.
        spacing: isotropic voxel size in mm, or None (or 0) for the image's own voxel size.
        min_spacing: with ``spacing=None``, the smallest voxel size per axis, mm.

    Returns:
        The LPS ``Grid`` the pair is loaded on.
    """
    if spacing:
        return isotropic_grid(image, spacing)
    oriented = _lps_grid(image)
    coarse = tuple(max(float(s), float(min_spacing)) for s in oriented.spacing)
    return oriented if np.allclose(coarse, oriented.spacing) else _resized(oriented, coarse)


def _lps_grid(image: sitk.Image) -> Grid:
    """The grid of ``image`` re-oriented to LPS (axes permuted and flipped, voxels unchanged)."""
    return Grid.of(sitk.DICOMOrient(image, "LPS")) if image.GetDimension() == 3 else Grid.of(image)


def _resized(grid: Grid, spacing: Tuple[float, float, float]) -> Grid:
    """``grid``'s origin, direction and extent at another voxel size."""
    size = tuple(int(np.floor((n - 1) * s / t + 1e-6)) + 1 for n, s, t in zip(grid.size, grid.spacing, spacing))
    return Grid(size, grid.origin, tuple(spacing), grid.direction)


def resample(
    image: sitk.Image,
    grid: Grid,
    interpolator: int = sitk.sitkBSpline,
    default: float = BACKGROUND_HU,
    output_type: int = sitk.sitkFloat32,
) -> sitk.Image:
    """``image`` resampled onto ``grid`` (cubic B-spline by default; voxels outside its field get ``default``).

    Args:
        image: image to resample.
        grid: target grid.
        interpolator: SimpleITK interpolator (default cubic B-spline).
        default: value outside ``image``'s field of view (default ``BACKGROUND_HU``).
        output_type: SimpleITK pixel type of the result (default float32).

    Returns:
        The resampled SimpleITK image on ``grid``.
    """
    return grid.resampler(interpolator, default, output_type).Execute(image)


def hu_on_grid(image: sitk.Image, grid: Grid) -> np.ndarray:
    """The ``(z, y, x)`` HU array of ``image`` on ``grid``: its own voxels when it already lies on that grid (no
    interpolation, no smoothing), cubic B-spline otherwise (``BACKGROUND_HU`` outside its field of view).

    Args:
        image: CT image, HU.
        grid: target grid.

    Returns:
        float32 array ``(z, y, x)`` of ``grid``'s size.
    """
    if Grid.of(image).same_as(grid):
        return sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    return sitk.GetArrayFromImage(resample(image, grid))


def field_of_view(image: sitk.Image, grid: Grid) -> np.ndarray:
    """Which voxels of ``grid`` lie inside ``image``'s field of view (bool ``(z, y, x)``).

    Args:
        image: image whose field of view is used.
        grid: target grid.

    Returns:
        bool array ``(z, y, x)`` of ``grid``'s size; all True when ``image`` lies on ``grid``.
    """
    if Grid.of(image).same_as(grid):
        return np.ones(tuple(grid.size[::-1]), dtype=bool)
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    return sitk.GetArrayFromImage(resample(ones, grid, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)) > 0


def body_mask(hu: np.ndarray, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Body mask of a ``(z, y, x)`` HU array (bool), from ``scripts.transforms.ct_masks`` (threshold, largest part,
    holes, lungs cut open by the field of view).

    Args:
        hu: ``(z, y, x)`` CT array, HU.
        spacing_zyx: voxel spacing in mm, z-y-x order.

    Returns:
        bool array of the same shape as ``hu``.
    """
    return body_mask_array(hu, spacing_zyx)


MIN_LUNG_ML = 20.0  # less lung than this inside the region: the crop shows no lung (a 3 cm cube of lung holds 27 ml)


def lung_volume_ml(hu: np.ndarray, region: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """Millilitres of ``region`` that look like lung parenchyma after 2 mm smoothing (the lung range of
    ``scripts.transforms.ct_masks``): bowel gas smooths to about -1000 HU and stays out, unlike a plain air count.

    Args:
        hu: ``(z, y, x)`` CT array, HU.
        region: bool ``(z, y, x)`` region in which lung is counted.
        spacing_zyx: voxel spacing in mm, z-y-x order.

    Returns:
        Lung-like volume inside ``region``, ml.
    """
    sigma = [CUT_LUNG_SMOOTHING_MM / float(s) for s in spacing_zyx]
    smooth = ndimage.gaussian_filter(np.maximum(hu, AIR_HU), sigma)
    lung_like = (smooth > CUT_LUNG_MIN_HU) & (smooth <= LUNG_THRESHOLD_HU) & region
    return float(lung_like.sum()) * float(np.prod(spacing_zyx)) / 1000.0


AIR_RANGE_HU = (-1200.0, -500.0)  # air and lung in HU (padding such as -2048 or -3024 lies below)
MIN_CT_FRACTION = 1e-3  # a CT shows at least this fraction of voxels in air and of voxels above -500 HU
MIN_CT_CHECK_VOXELS = 200_000  # the HU check reads a strided subsample of about this many voxels
MIN_MOVING_COVERAGE = 0.5  # the moving image covers less of the fixed image's region than this: a warning


@dataclass
class PairOnGrid:
    """A fixed/moving pair on the working grid (1 mm LPS for the network, the fixed image's own grid for the
    re-registration): ``image [2, z, y, x]`` HU (fixed, moving), ``mask [z, y, x]`` bool (where to predict),
    ``region [z, y, x]`` bool (the fixed image's body and lungs inside the moving image's field of view), the
    working ``grid``, the fixed image's original ``fixed_grid`` and ``lung_ml`` (lung inside the region)."""

    image: np.ndarray
    mask: np.ndarray
    grid: Grid
    fixed_grid: Grid
    region: Optional[np.ndarray] = None
    lung_ml: float = 0.0


def check_hounsfield_units(image: sitk.Image, source: str) -> None:
    """Refuse an image that is not a CT in Hounsfield units, naming ``source`` and the likely cause: a CT shows air
    (``AIR_RANGE_HU``) and tissue (above -500 HU); raw stored values without the rescale slope and intercept show
    neither air below -500 nor anything negative, an MR image no negative values, a label mask two or three values.

    Args:
        image: image to check (a strided subsample of about ``MIN_CT_CHECK_VOXELS`` voxels is read).
        source: what names the image in the message (e.g. "fixed image <path>").

    Raises:
        InputError: when less than ``MIN_CT_FRACTION`` of the voxels lie in ``AIR_RANGE_HU`` or above -500 HU; the
            message names the likely cause (label mask, raw stored values, MR image).
    """
    values = sitk.GetArrayViewFromImage(image)
    stride = max(1, round((values.size / MIN_CT_CHECK_VOXELS) ** (1 / 3)))
    sample = np.asarray(values[::stride, ::stride, ::stride], dtype=np.float32)
    air = np.count_nonzero((sample >= AIR_RANGE_HU[0]) & (sample < AIR_RANGE_HU[1])) / sample.size
    tissue = np.count_nonzero(sample >= AIR_RANGE_HU[1]) / sample.size
    if air >= MIN_CT_FRACTION and tissue >= MIN_CT_FRACTION:
        return
    low, high = float(sample.min()), float(sample.max())
    span = f"values from {low:.6g} to {high:.6g}"
    distinct = np.unique(sample)
    if len(distinct) <= 3 and distinct[0] >= 0:
        cause = f"it holds only the values {distinct.tolist()}: a label mask given as an image?"
    elif air < MIN_CT_FRACTION and low > -50 and high > 500:
        cause = (
            f"no air ({span}): raw stored values without the rescale slope and intercept (air reads about 0, "
            "soft tissue about 1000), or an MR image?"
        )
    elif air < MIN_CT_FRACTION:
        cause = f"no air (no voxel between {AIR_RANGE_HU[0]:.0f} and {AIR_RANGE_HU[1]:.0f} HU; {span}): an MR image?"
    else:
        cause = f"no tissue (no voxel above {AIR_RANGE_HU[1]:.0f} HU; {span})"
    raise InputError(f"{source}: not a CT in Hounsfield units: {cause}")


def load_pair(
    fixed_path: str | os.PathLike,
    moving_path: str | os.PathLike,
    mask_path: Optional[str | os.PathLike] = None,
    spacing: float | None = 1.0,
    mask_background: bool = True,
    require_lung: bool = False,
) -> PairOnGrid:
    """Read, check and put a pair on the fixed image's LPS working grid (``working_grid``): ``spacing`` mm isotropic
    (cubic B-spline), or with ``spacing=None`` the fixed image's own voxels, no finer than 1 mm per axis.

    The moving image is resampled from its own physical space, so a moving image on another grid or with a smaller
    field of view is handled (and logged). The region is the fixed image's body and lungs (``body_mask_array``,
    lungs cut open by a crop included) inside the moving image's field of view; the prediction mask is the region,
    or ``mask_path`` (nearest neighbour) inside the moving image's field of view. With ``mask_background`` the images
    are set to the background HU outside their body and lungs (the network's input, as in training; the moving image
    keeps the fixed image's region as well, so its lungs are not blanked where its own mask misses them); without it
    both keep their own HU (the re-registration's input).

    A crop with no lung in it is refused with ``require_lung`` (the network was trained on lungs), else logged; a
    moving image covering less than half of the fixed image's region is logged with the fraction it covers.

    Args:
        fixed_path: fixed image file.
        moving_path: moving image file.
        mask_path: optional mask file (non-zero voxels are assessed); None predicts in the whole region.
        spacing: isotropic working voxel size in mm, or None for the fixed image's own voxels (no finer than 1 mm).
        mask_background: set both images to ``BACKGROUND_HU`` outside their body and lungs (the network's input).
        require_lung: refuse a pair with less than ``MIN_LUNG_ML`` ml of lung in the region (else only logged).

    Returns:
        A ``PairOnGrid`` with ``image [2, z, y, x]`` float32 HU (fixed, moving), bool ``mask`` and ``region``, the
        working ``grid``, the fixed image's ``fixed_grid`` and ``lung_ml``.

    Raises:
        MissingInputError: when an input file does not exist.
        InputError: for an unreadable or invalid image, an image that is not a CT in HU, images or a mask that do not
            overlap, a fixed image with no body, no lung with ``require_lung``, or a mask with no voxel inside the fixed
            or the moving image.
    """
    fixed = read_image(fixed_path, "fixed image")
    moving = read_image(moving_path, "moving image")
    check_hounsfield_units(fixed, f"fixed image {fixed_path}")
    check_hounsfield_units(moving, f"moving image {moving_path}")
    fraction = check_overlap(fixed, moving, str(fixed_path), str(moving_path))
    if not Grid.of(moving).same_as(Grid.of(fixed)):
        logger.warning(
            "moving image %s is not on the fixed image's grid (size %s vs %s, spacing %s vs %s): resampling it onto "
            "the fixed image's grid; it covers %.0f%% of the fixed image's box",
            moving_path,
            moving.GetSize(),
            fixed.GetSize(),
            np.round(moving.GetSpacing(), 3).tolist(),
            np.round(fixed.GetSpacing(), 3).tolist(),
            100 * fraction,
        )
    grid = working_grid(fixed, spacing)
    spacing_zyx = tuple(grid.spacing[::-1])
    in_view = field_of_view(moving, grid)
    arrays = [hu_on_grid(image, grid) for image in (fixed, moving)]
    bodies = [body_mask(hu, spacing_zyx) for hu in arrays]
    bodies[1] &= in_view
    body = bodies[0]
    if not body.any():
        raise InputError(f"fixed image {fixed_path}: no body found (no tissue above -500 HU); is it a CT in HU?")
    region = body & in_view
    covered = float(region.sum()) / float(body.sum())
    if covered < MIN_MOVING_COVERAGE:
        logger.warning(
            "moving image %s covers only %.0f%% of the fixed image's body and lungs: the rest is not assessed",
            moving_path,
            100 * covered,
        )
    lung_ml = lung_volume_ml(arrays[0], region, spacing_zyx)
    if lung_ml < MIN_LUNG_ML:
        problem = (
            f"fixed image {fixed_path}: no lung in view: {lung_ml:.0f} ml of lung-like tissue inside the body where "
            f"the moving image overlaps it (need {MIN_LUNG_ML:.0f} ml)"
        )
        if require_lung:
            raise InputError(problem + "; the network was trained on chest CT with the lungs in view")
        logger.warning("%s; the re-registration runs, but its calibration was fitted on lungs", problem)
    if mask_background:  # the moving image keeps the fixed image's region too: its lungs are never blanked
        arrays[0][~body] = BACKGROUND_HU
        arrays[1][~(bodies[1] | region)] = BACKGROUND_HU
    if mask_path:
        mask_image = read_image(mask_path, "mask")
        check_overlap(fixed, mask_image, str(fixed_path), str(mask_path), "mask")
        mask = sitk.GetArrayFromImage(resample(mask_image, grid, sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)) > 0
        if not mask.any():
            raise InputError(f"mask {mask_path}: no voxel of the mask lies inside the fixed image {fixed_path}")
        mask &= in_view
        if not mask.any():
            raise InputError(f"mask {mask_path}: no voxel of the mask lies inside the moving image {moving_path}")
    else:
        mask = region
    return PairOnGrid(np.stack(arrays).astype(np.float32), mask, grid, Grid.of(fixed), region, lung_ml)


def mask_to_fixed_grid(mask: np.ndarray, grid: Grid, fixed_grid: Grid) -> np.ndarray:
    """A ``[z, y, x]`` mask on ``grid`` -> bool on ``fixed_grid`` (nearest neighbour).

    Args:
        mask: ``(z, y, x)`` mask on ``grid``.
        grid: working grid the mask lies on.
        fixed_grid: the fixed image's original grid.

    Returns:
        bool array ``(z, y, x)`` of ``fixed_grid``'s size.
    """
    image = resample(grid.image(mask.astype(np.uint8)), fixed_grid, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(image).astype(bool)


def to_fixed_grid(
    probabilities: np.ndarray,
    mask: np.ndarray,
    grid: Grid,
    fixed_grid: Grid,
    class_weights: Optional[Sequence[float]] = None,
) -> Tuple[np.ndarray, ...]:
    """Probabilities ``[3, z, y, x]`` and mask on the working ``grid`` -> (probabilities ``[z, y, x, 3]``, labels
    uint8, mask) on ``fixed_grid``: linear interpolation, renormalised to sum 1 inside the nearest-neighbour mask;
    labels = argmax(probabilities), or argmax(class_weights * probabilities) (the mean-F1 decision), and
    ``UNASSESSED_LABEL`` outside the mask (never 0, "correct").

    Args:
        probabilities: ``[3, z, y, x]`` class probabilities on ``grid``.
        mask: ``(z, y, x)`` bool mask of assessed voxels on ``grid``.
        grid: working grid.
        fixed_grid: the fixed image's original grid.
        class_weights: optional per-class weights of the mean-F1 decision; None takes the plain argmax.

    Returns:
        Tuple ``(probabilities, labels, mask)`` on ``fixed_grid``: float32 ``[z, y, x, 3]``, uint8 ``[z, y, x]``
        (``UNASSESSED_LABEL`` outside the mask) and bool ``[z, y, x]``.
    """
    mask_f = mask_to_fixed_grid(mask, grid, fixed_grid)
    channels = [
        sitk.GetArrayFromImage(resample(grid.image(p.astype(np.float32)), fixed_grid, sitk.sitkLinear, 0.0))
        for p in probabilities
    ]
    probs = np.stack(channels, axis=-1)
    total = probs.sum(axis=-1, keepdims=True)
    probs = np.where(mask_f[..., None] & (total > 0), probs / np.maximum(total, 1e-12), 0.0).astype(np.float32)
    labels = np.where(mask_f, weighted_argmax(probs, class_weights, axis=-1), UNASSESSED_LABEL).astype(np.uint8)
    return probs, labels, mask_f


def error_to_fixed_grid(error_mm: np.ndarray, grid: Grid, fixed_grid: Grid, mask_on_fixed: np.ndarray) -> np.ndarray:
    """An error map ``[z, y, x]`` (mm) on the working ``grid`` -> float32 on ``fixed_grid`` (linear),
    ``UNASSESSED_ERROR_MM`` outside ``mask_on_fixed`` (the mask already on the fixed grid, as ``to_fixed_grid``
    returns it): no estimate there, and a value no reader takes for 0 mm (ITK reads a NIfTI NaN as 0).

    Args:
        error_mm: ``(z, y, x)`` error map on ``grid``, mm.
        grid: working grid.
        fixed_grid: the fixed image's original grid.
        mask_on_fixed: bool ``(z, y, x)`` mask already on ``fixed_grid``.

    Returns:
        float32 array ``(z, y, x)`` of ``fixed_grid``'s size, mm.
    """
    values = sitk.GetArrayFromImage(resample(grid.image(error_mm.astype(np.float32)), fixed_grid, sitk.sitkLinear, 0.0))
    return np.where(mask_on_fixed, values, UNASSESSED_ERROR_MM).astype(np.float32)
