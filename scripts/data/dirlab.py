"""Readers for the DIR-Lab 4DCT and COPDgene data: header-less raw images and landmark text files (docs/method.md
section 10).

Images are signed 16-bit little-endian ``.img`` files without header, voxels in (z, y, x) order; the sizes and
spacings are published per case on the DIR-Lab "Reference Data" pages (values below, cross-checked against the
public hsokooti/RegNet ``functions/preprocessing/dirlab.py`` and other public DIR-Lab loaders; RegNet lists copd9 as
0.644 mm, all other sources 0.664 mm, which we use). The superior-inferior axis is flipped, HU = value - 1024, and
values that become -3024 or less lie outside the scan field. Landmark files hold 3 columns of 1-based voxel indices
(x y z) in the raw volume; after the flip the 0-based index is (x - 1, y - 1, nz - z). Images get origin 0 and an
identity direction (as in the RegNet code), so physical point = 0-based index * spacing.

CLI (writes NIfTI + landmark CSVs in the inference contract's format)::

    python -m scripts.data.dirlab --case case1 --fixed_image case1_T00_s.img --moving_image case1_T50_s.img \\
        --fixed_landmarks case1_300_T00_xyz.txt --moving_landmarks case1_300_T50_xyz.txt --output_dir D
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from scripts.data.landmark_csv import table_from_points, write_landmarks
from scripts.utils.atomic_write import atomic_write_image
from scripts.utils.constants import BACKGROUND_HU

HU_SHIFT = 1024  # HU = stored value - 1024
OUTSIDE_SCAN_HU = -3024  # stored -2000 (HU -3024) or less: voxels outside the reconstructed field of view


@dataclass(frozen=True)
class DirLabCase:
    """Published geometry of one DIR-Lab case: size (x, y, z) in voxels and spacing (x, y, z) in mm."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def num_bytes(self) -> int:
        """Size in bytes of one raw int16 volume of this case."""
        return 2 * int(np.prod(self.size))


def _cases(prefix: str, sizes: list[tuple[int, int, int]], spacings: list[float]) -> dict[str, DirLabCase]:
    return {f"{prefix}{i + 1}": DirLabCase(s, (p, p, 2.5)) for i, (s, p) in enumerate(zip(sizes, spacings))}


# DIR-Lab 4DCT, cases 1-10 (T00 inhale = fixed, T50 exhale = moving)
DIRLAB_4DCT: dict[str, DirLabCase] = _cases(
    "case",
    [(256, 256, 94), (256, 256, 112), (256, 256, 104), (256, 256, 99), (256, 256, 106)]
    + [(512, 512, 128), (512, 512, 136), (512, 512, 128), (512, 512, 128), (512, 512, 120)],
    [0.97, 1.16, 1.15, 1.13, 1.10, 0.97, 0.97, 0.97, 0.97, 0.97],
)
# DIR-Lab COPDgene, copd1-10 (iBH inhale = fixed, eBH exhale = moving)
DIRLAB_COPD: dict[str, DirLabCase] = _cases(
    "copd",
    [(512, 512, n) for n in (121, 102, 126, 126, 131, 119, 112, 115, 116, 135)],
    [0.625, 0.645, 0.652, 0.590, 0.647, 0.633, 0.625, 0.586, 0.664, 0.742],
)
DIRLAB_CASES: dict[str, DirLabCase] = {**DIRLAB_4DCT, **DIRLAB_COPD}


def case_geometry(case: str) -> DirLabCase:
    """Geometry of ``case`` (``case1``..``case10`` for 4DCT, ``copd1``..``copd10``); clear error if unknown."""
    key = str(case).strip().lower()
    if key not in DIRLAB_CASES:
        raise ValueError(f"unknown DIR-Lab case {case!r}; choose one of {list(DIRLAB_CASES)}")
    return DIRLAB_CASES[key]


def read_dirlab_image(path: str | Path, case: str, outside_value: float = BACKGROUND_HU) -> sitk.Image:
    """Read a raw DIR-Lab ``.img`` as an int16 HU SimpleITK image: z flipped, origin 0, identity direction; voxels
    outside the scan field (HU <= -3024) set to ``outside_value``.

    Args:
        path: raw DIR-Lab ``.img`` file.
        case: case name, ``case1``..``case10`` or ``copd1``..``copd10``.
        outside_value: value of the voxels outside the scan field, HU.

    Returns:
        int16 SimpleITK image (HU) with the case's published spacing.

    Raises:
        ValueError: for an unknown case or a file whose size does not fit the case.
        FileNotFoundError: when ``path`` does not exist.
    """
    path = Path(path)
    geometry = case_geometry(case)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: DIR-Lab image not found")
    actual = path.stat().st_size
    if actual != geometry.num_bytes:
        matches = [name for name, g in DIRLAB_CASES.items() if g.num_bytes == actual]
        hint = f"; that size fits {matches}" if matches else ""
        raise ValueError(
            f"{path}: {actual} bytes, but DIR-Lab {case} is {geometry.size[0]}x{geometry.size[1]}x{geometry.size[2]} "
            f"int16 = {geometry.num_bytes} bytes{hint}"
        )
    nx, ny, nz = geometry.size
    raw = np.fromfile(path, dtype="<i2").reshape(nz, ny, nx)
    hu = raw[::-1].astype(np.int32) - HU_SHIFT  # flip the superior-inferior axis
    hu[hu <= OUTSIDE_SCAN_HU] = int(outside_value)
    image = sitk.GetImageFromArray(np.clip(hu, -32768, 32767).astype(np.int16))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin((0.0, 0.0, 0.0))
    return image


def read_dirlab_indices(path: str | Path) -> np.ndarray:
    """The ``[N, 3]`` 1-based voxel indices (x y z) of a DIR-Lab landmark text file (whitespace separated)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: DIR-Lab landmark file not found")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.replace(",", " ").split()
        if not fields:
            continue
        if len(fields) != 3:
            raise ValueError(f"{path}: line {number} has {len(fields)} columns, expected 3 (x y z voxel indices)")
        try:
            rows.append([float(v) for v in fields])
        except ValueError:
            raise ValueError(f"{path}: line {number} is not numeric: {line.strip()!r}") from None
    if not rows:
        raise ValueError(f"{path}: no landmarks in file")
    return np.array(rows, dtype=np.float64)


def dirlab_indices_to_points(indices: np.ndarray, case: str, source: str = "landmarks") -> np.ndarray:
    """Physical points (LPS mm) of 1-based raw indices (x y z) on the flipped image of ``case``.

    Args:
        indices: ``[N, 3]`` 1-based raw voxel indices, x-y-z order.
        case: case name.
        source: name of the landmark file in the message.

    Returns:
        float64 array ``[N, 3]`` of physical points, mm (x-y-z order).

    Raises:
        ValueError: for an unknown case or an index outside the case's 1-based range.
    """
    geometry = case_geometry(case)
    size = np.array(geometry.size, dtype=np.float64)
    if (indices < 1).any() or (indices > size).any():
        bad = int(np.nonzero(((indices < 1) | (indices > size)).any(axis=1))[0][0])
        raise ValueError(
            f"{source}: landmark {bad + 1} {indices[bad].tolist()} lies outside the 1-based index range of "
            f"{case} (1..{geometry.size})"
        )
    zero_based = np.stack([indices[:, 0] - 1, indices[:, 1] - 1, size[2] - indices[:, 2]], axis=1)
    return zero_based * np.array(geometry.spacing)


def read_dirlab_landmarks(path: str | Path, case: str) -> np.ndarray:
    """``[N, 3]`` physical points (LPS mm) of a DIR-Lab landmark file, on the image made by ``read_dirlab_image``.

    Args:
        path: DIR-Lab landmark text file.
        case: case name.

    Returns:
        float64 array ``[N, 3]`` of physical points, mm (x-y-z order).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: for a malformed or empty file, an unknown case or an index outside the image.
    """
    return dirlab_indices_to_points(read_dirlab_indices(path), case, str(path))


def _write_landmark_csv(indices: np.ndarray, case: str, source: str, path: Path) -> Path:
    points = dirlab_indices_to_points(indices, case, source)
    extra = {f"voxel_{a}": [f"{v:g}" for v in indices[:, j]] for j, a in enumerate("xyz")}  # raw 1-based, kept
    return write_landmarks(table_from_points(points, extra), path)


def convert_pair(
    case: str,
    fixed_image: str,
    moving_image: str,
    output_dir: str,
    fixed_landmarks: str | None = None,
    moving_landmarks: str | None = None,
    outside_value: float = BACKGROUND_HU,
) -> dict[str, str]:
    """Convert a DIR-Lab pair to ``<case>_fixed.nii.gz``, ``<case>_moving.nii.gz`` and, given the landmark files,
    ``<case>_fixed_landmarks.csv`` / ``<case>_moving_landmarks.csv`` (id,x,y,z,voxel_x,voxel_y,voxel_z).

    Args:
        case: case name, ``case1``..``case10`` or ``copd1``..``copd10``.
        fixed_image: raw ``.img`` of the fixed (inhale) image.
        moving_image: raw ``.img`` of the moving (exhale) image.
        output_dir: folder of the written files.
        fixed_landmarks: optional landmark text file of the fixed image.
        moving_landmarks: optional landmark text file of the moving image (both or neither).
        outside_value: value of the voxels outside the scan field, HU.

    Returns:
        Dict ``fixed_image``, ``moving_image`` (and ``fixed_landmarks``, ``moving_landmarks``) -> written path.

    Raises:
        ValueError: for only one landmark file, landmark files of different length, or a bad image or landmark file.
        FileNotFoundError: when an input file does not exist.
    """
    case = str(case).strip().lower()
    out = Path(output_dir)
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise ValueError("give both --fixed_landmarks and --moving_landmarks, or neither")
    indices = {}
    if fixed_landmarks is not None:
        indices = {"fixed": read_dirlab_indices(fixed_landmarks), "moving": read_dirlab_indices(moving_landmarks)}
        if len(indices["fixed"]) != len(indices["moving"]):
            raise ValueError(
                f"{moving_landmarks}: {len(indices['moving'])} landmarks, but {fixed_landmarks} has "
                f"{len(indices['fixed'])}; fixed and moving landmarks must correspond line by line"
            )
    images = {"fixed": read_dirlab_image(fixed_image, case, outside_value)}
    images["moving"] = read_dirlab_image(moving_image, case, outside_value)
    written = {}
    for role, image in images.items():
        written[f"{role}_image"] = str(atomic_write_image(image, out / f"{case}_{role}.nii.gz"))
    sources = {"fixed": fixed_landmarks, "moving": moving_landmarks}
    for role, idx in indices.items():
        written[f"{role}_landmarks"] = str(
            _write_landmark_csv(idx, case, str(sources[role]), out / f"{case}_{role}_landmarks.csv")
        )
    return written


if __name__ == "__main__":
    import fire

    fire.Fire(convert_pair)
