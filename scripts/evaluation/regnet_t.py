"""RegNet-t baseline (paper section III, docs/method.md section 8): the 3-level RegNet registers the (fixed, registered
moving) pair coarse to fine (4 -> 2 -> 1 mm) and the magnitude of the total displacement, thresholded at 3 and 6 mm,
is the misalignment class (correct / poor / wrong).

Convention of the training data (scripts.transforms.artificial_dvf): channel 1 is ``D(x) = F(x + u(x))`` with F =
channel 0,
and RegNet predicts ``u`` in mm, components (x, y, z). Level k registers the pair left by the previous levels: the
image sampled through the field, channel 0, is warped, ``F_k(x) = F(x + U(x))``, and the level's output ``r``
satisfies ``D(x) = F_k(x + r(x)) = F(x + r(x) + U(x + r(x)))``. Hence the exact composition used by default::

    U_new(x) = r(x) + U(x + r(x))

(the analogue of RegNet's multi-stage code, which warps the image that is sampled through the field; no inverse
field is needed). ``compose="sum"`` gives the paper's plain sum ``U_new = r + U`` instead. The channel-0 warp is done
on each level's pyramid image (smooth, then warp: equal to warp-then-smooth for a translation, a negligible
difference for the smooth fields here), trilinear with ``torch.nn.functional.grid_sample``, ``BACKGROUND_HU``
outside.

Only landmark points are scored, so RegNet runs on output tiles (``tile`` samples per edge, input ``tile + 80``,
fully convolutional; 101 needs fewer input voxels than 61 or 141 for 300 lung landmarks) that some point needs: at
1 mm the tiles holding a point, at 2 mm and 4 mm the tiles whose output the finer levels read (their input context
of 40 samples and the composition). Arrays are (z, y, x) on the fixed image's 1 mm LPS grid; points are continuous
1 mm voxel coordinates (z, y, x), i.e. mm from voxel 0.

CLI (one registered pair; needs models/regnet_4mm.pt, regnet_2mm.pt, regnet_1mm.pt)::

    python -m scripts.evaluation.regnet_t --fixed F.nii.gz --moving REG.nii.gz --landmarks P.csv --output_dir D
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scripts.data.baseline_pairs import OneMillimetreFixed, write_class_predictions
from scripts.data.patch_sampling import crop_with_background, magnitude_classes, pair_pyramid
from scripts.engines.checkpoints import load_network_weights
from scripts.inferers.misalignment_inferer import inference_copy
from scripts.networks.regnet import RegNet
from scripts.utils.constants import BACKGROUND_HU, CLASS_THRESHOLDS_MM
from scripts.utils.precision import AUTO, resolve_precision

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
LEVELS = (4, 2, 1)  # coarse to fine, mm
CONTEXT = 40  # input samples lost on each side: 101 + 4k in -> 21 + 4k out
DEFAULT_WEIGHTS = {4: "models/regnet_4mm.pt", 2: "models/regnet_2mm.pt", 1: "models/regnet_1mm.pt"}
COMPOSITIONS = ("exact", "sum")


def displacement_classes(displacement: np.ndarray, thresholds=CLASS_THRESHOLDS_MM) -> np.ndarray:
    """Correct (0) / poor (1) / wrong (2) of ``[N, 3]`` displacements (mm): |u| < 3, 3 <= |u| < 6, |u| >= 6.

    Args:
        displacement: ``[N, 3]`` displacements, mm.
        thresholds: increasing class boundaries, mm (default ``CLASS_THRESHOLDS_MM``).

    Returns:
        int64 array ``[N]`` of classes 0, 1, 2.
    """
    magnitude = np.linalg.norm(np.asarray(displacement, dtype=np.float64).reshape(-1, 3), axis=1)
    return magnitude_classes(magnitude, thresholds).astype(np.int64)


def sample_volume(
    volume: torch.Tensor, factor: int, points: torch.Tensor, fill: str | float = "border"
) -> torch.Tensor:
    """Trilinear values ``[M, C]`` of a level-``factor`` volume ``[C, Z, Y, X]`` (sample j on 1 mm voxel
    ``factor * j``) at 1 mm points ``[M, 3]`` (z, y, x); outside: edge value (``"border"``) or the number ``fill``.

    Args:
        volume: ``[C, Z, Y, X]`` tensor on level ``factor``.
        factor: sample spacing of the level in 1 mm voxels.
        points: ``[M, 3]`` 1 mm voxel coordinates, z-y-x order.
        fill: "border" for the edge value outside, or a number (e.g. ``BACKGROUND_HU``).

    Returns:
        Tensor ``[M, C]`` in the dtype of ``volume``.
    """
    shape = torch.tensor(volume.shape[1:], dtype=points.dtype)
    index = points / factor
    normalised = 2 * index / torch.clamp(shape - 1, min=1) - 1  # align_corners=True
    grid = normalised.flip(-1).reshape(1, 1, 1, -1, 3).to(volume.dtype)  # grid_sample wants (x, y, z)
    source = volume[None] if fill == "border" else volume[None] - float(fill)
    padding = "border" if fill == "border" else "zeros"
    values = F.grid_sample(source, grid, mode="bilinear", padding_mode=padding, align_corners=True)[0, :, 0, 0]
    values = values if fill == "border" else values + float(fill)
    return values.T


def total_displacement(fields: list[tuple[torch.Tensor, int]], points: torch.Tensor, compose: str = "exact"):
    """Total displacement ``[M, 3]`` (mm, x y z) at 1 mm points ``[M, 3]`` (z, y, x) of level fields ``(r [3, Z, Y,
    X], factor)`` listed coarse to fine: exact ``U_k(x) = r_k(x) + U_{k-1}(x + r_k(x))`` or the plain ``sum``.

    Args:
        fields: list of ``(r, factor)``, coarse to fine; ``r`` is a ``[3, Z, Y, X]`` tensor (mm, components x-y-z).
        points: ``[M, 3]`` 1 mm voxel coordinates, z-y-x order.
        compose: "exact" or "sum".

    Returns:
        Tensor ``[M, 3]`` (mm, components x-y-z) in the dtype of ``points``; zeros for no fields.

    Raises:
        ValueError: when ``compose`` is not one of ``COMPOSITIONS``.
    """
    if compose not in COMPOSITIONS:
        raise ValueError(f"compose must be one of {COMPOSITIONS}, got {compose!r}")
    total = torch.zeros(points.shape[0], 3, dtype=points.dtype)
    if not fields:
        return total
    field, factor = fields[-1]
    r = sample_volume(field, factor, points).to(points.dtype)
    if compose == "sum":
        return r + total_displacement(fields[:-1], points, compose)
    return r + total_displacement(fields[:-1], points + r.flip(-1), compose)  # r is (x, y, z), points (z, y, x)


def _box_of_tile(lo: tuple[int, ...], tile: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    low = np.asarray(lo) * factor
    return low, low + (tile - 1) * factor


def _intersects(low: np.ndarray, high: np.ndarray, boxes: list[tuple[np.ndarray, np.ndarray]]) -> bool:
    return any(np.all(low <= b_high) and np.all(b_low <= high) for b_low, b_high in boxes)


def plan_tiles(
    points: np.ndarray, shapes: dict[int, tuple[int, ...]], tile: int, margin_mm: float = 25.0
) -> dict[int, list[tuple[int, ...]]]:
    """Output tiles (first sample index, z y x) per level that the points need: at the finest level the tiles within
    1 mm of a point; at a coarser level the tiles meeting the region read by the finer level's tiles (their input
    context, or ``margin_mm`` for the composition's ``x + r(x)`` if larger). ``shapes``: level sample counts
    (z, y, x).

    Args:
        points: ``[N, 3]`` 1 mm voxel coordinates, z-y-x order.
        shapes: level factor -> sample counts (z, y, x) of that level.
        tile: output tile edge, samples.
        margin_mm: minimum reach of a finer level into the coarser one, mm.

    Returns:
        Dict level factor -> list of tile start indices (z, y, x).
    """
    needed = [(p - 1.0, p + 1.0) for p in np.asarray(points, dtype=np.float64).reshape(-1, 3)]
    plan = {}
    for factor in sorted(shapes):  # fine to coarse
        starts = [range(0, n, tile) for n in shapes[factor]]
        chosen = [lo for lo in itertools.product(*starts) if _intersects(*_box_of_tile(lo, tile, factor), needed)]
        plan[factor] = chosen
        reach = max(factor * (CONTEXT + 1), margin_mm)  # input context, or x + r(x) of the composition
        needed = [(low - reach, high + reach) for low, high in (_box_of_tile(lo, tile, factor) for lo in chosen)]
    return plan


def _input_positions(lo: tuple[int, ...], tile: int, factor: int) -> torch.Tensor:
    axes = [torch.arange(c - CONTEXT, c + tile + CONTEXT, dtype=torch.float32) * factor for c in lo]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def _warped_fixed(
    fixed_level: torch.Tensor, factor: int, lo: tuple[int, ...], tile: int, previous: list, compose: str
) -> torch.Tensor:
    """Channel 0 of a tile's input: the level image sampled at ``x + U(x)`` of the previous levels (z y x)."""
    positions = _input_positions(lo, tile, factor)
    moved = positions + total_displacement(previous, positions, compose).flip(-1)
    size = tile + 2 * CONTEXT
    return sample_volume(fixed_level[None], factor, moved, fill=BACKGROUND_HU).reshape(size, size, size)


def _forward(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The network on ``x`` in its weights' dtype (and channels-last-3d, as scripts.inferers.misalignment_inferer
    prepares it); float32."""
    dtype = next((p.dtype for p in network.parameters()), torch.float32)
    return network(x.to(dtype).contiguous(memory_format=torch.channels_last_3d)).float()


def regnet_t_displacement(
    fixed: np.ndarray,
    moving: np.ndarray,
    points: np.ndarray,
    networks: dict[int, torch.nn.Module],
    tile: int = 101,
    compose: str = "exact",
) -> np.ndarray:
    """Total RegNet displacement ``[N, 3]`` (mm, x y z) at ``points`` ``[N, 3]`` (1 mm voxel coordinates z y x) of
    the pair ``fixed``, ``moving`` (HU, (z, y, x), 1 mm, background outside the body); ``networks`` {4, 2, 1}.

    Args:
        fixed: ``(z, y, x)`` fixed image on a 1 mm grid, HU.
        moving: ``(z, y, x)`` registered moving image on the same grid, HU.
        points: ``[N, 3]`` 1 mm voxel coordinates, z-y-x order.
        networks: level factor (4, 2, 1) -> RegNet.
        tile: output tile edge, ``21 + 4k`` samples.
        compose: "exact" or "sum" (see ``total_displacement``).

    Returns:
        float64 array ``[N, 3]`` (mm, components x-y-z).

    Raises:
        ValueError: for a bad ``tile``, ``compose`` or set of levels in ``networks``.
    """
    if tile < 21 or (tile - 21) % 4:
        raise ValueError(f"tile must be 21 + 4k output samples, got {tile}")
    if set(networks) != set(LEVELS):
        raise ValueError(f"networks for the levels {LEVELS} are needed, got {sorted(networks)}")
    pyramid = pair_pyramid(fixed, moving, LEVELS)
    plan = plan_tiles(points, {s: tuple(pyramid[s].shape[1:]) for s in LEVELS}, tile)
    fields: list[tuple[torch.Tensor, int]] = []
    size = tile + 2 * CONTEXT
    with torch.inference_mode():
        for factor in LEVELS:
            level = pyramid[factor]
            field = torch.zeros((3,) + tuple(level.shape[1:]), dtype=torch.float32)
            for lo in plan[factor]:
                centre = [c + tile // 2 for c in lo]
                moving_crop = crop_with_background(level[1:2], centre, size)[0]
                if fields:
                    fixed_crop = _warped_fixed(level[0], factor, lo, tile, fields, compose)
                else:
                    fixed_crop = crop_with_background(level[0:1], centre, size)[0]
                out = _forward(networks[factor], torch.stack([fixed_crop, moving_crop])[None])[0]
                box = tuple(slice(c, min(c + tile, n)) for c, n in zip(lo, level.shape[1:]))
                field[(slice(None),) + box] = out[(slice(None),) + tuple(slice(0, b.stop - b.start) for b in box)]
            fields.append((field, factor))
        total = total_displacement(fields, torch.as_tensor(points, dtype=torch.float32).reshape(-1, 3), compose)
    return total.numpy().astype(np.float64)


def missing_weights(weights: dict[int, str | os.PathLike] | None = None) -> list[str]:
    """The weight files of the three levels that do not exist (relative paths are taken from the bundle root)."""
    weights = weights or DEFAULT_WEIGHTS
    return [str(p) for p in (_resolve(w) for w in weights.values()) if not p.is_file()]


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.is_absolute() else BUNDLE_ROOT / path


def load_regnets(
    weights: dict[int, str | os.PathLike] | None = None, precision: str | None = None
) -> dict[int, torch.nn.Module]:
    """The three RegNets in eval mode from their state dicts; FileNotFoundError naming any missing file. With
    ``precision`` ("float32", "bfloat16" or "auto": bf16 where the CPU has it natively) each is prepared by
    scripts.inferers.misalignment_inferer.inference_copy (BatchNorm folded, conv + ReLU fused, channels-last; native
    bfloat16 is ~3x faster on CPU than plain float32, output within 1 %).

    Args:
        weights: level factor -> state-dict file (relative paths from the bundle root); default ``DEFAULT_WEIGHTS``.
        precision: None (plain float32 networks in eval mode), "float32", "bfloat16" or "auto".

    Returns:
        Dict level factor -> network.

    Raises:
        FileNotFoundError: when a weight file is missing.
        ValueError: when a file does not hold RegNet weights.
    """
    weights = weights or DEFAULT_WEIGHTS
    missing = missing_weights(weights)
    if missing:
        raise FileNotFoundError(f"RegNet weights not found: {', '.join(missing)}")
    networks = {}
    for factor, path in weights.items():
        net = load_network_weights(RegNet(), _resolve(path))  # ValueError naming the file if not a RegNet
        networks[int(factor)] = net.eval() if precision is None else inference_copy(net, resolve_precision(precision))
    return networks


def predict_settings(
    fixed: str | os.PathLike,
    pairs: dict[str, tuple[str | os.PathLike, str | os.PathLike]],
    output_dir: str | os.PathLike,
    weights: dict[int, str | os.PathLike] | None = None,
    tile: int = 101,
    compose: str = "exact",
    threads: int | None = None,
    precision: str = AUTO,
) -> dict[str, tuple[Path, float]]:
    """RegNet-t on every ``setting -> (registered moving image, landmark CSV)`` against one fixed image; writes
    ``<moving stem>_landmarks.csv`` (input columns + pred, one-hot p_*, ``regnet_mm``, ``regnet_ux/uy/uz``) and
    returns ``setting -> (csv, seconds)`` (the fixed image's loading is counted in the first setting).

    Args:
        fixed: fixed image file.
        pairs: setting name -> (registered moving image file, landmark CSV of fixed-image points).
        output_dir: folder of the written CSV files.
        weights: level factor -> state-dict file; default ``DEFAULT_WEIGHTS``.
        tile: output tile edge, ``21 + 4k`` samples.
        compose: "exact" or "sum" (see ``total_displacement``).
        threads: torch CPU threads, or None to leave torch's setting.
        precision: "float32", "bfloat16" or "auto".

    Returns:
        Dict setting -> (path of the written CSV, seconds).

    Raises:
        FileNotFoundError: when a weight file is missing.
    """
    if threads:
        torch.set_num_threads(int(threads))
    start = time.perf_counter()
    networks = load_regnets(weights, precision)
    reference = OneMillimetreFixed(fixed)
    out = {}
    for setting, (moving_path, landmarks_path) in pairs.items():
        table, points = reference.landmarks(landmarks_path)
        u = regnet_t_displacement(reference.hu, reference.moving(moving_path), points, networks, tile, compose)
        extra = {
            "regnet_mm": np.linalg.norm(u, axis=1),
            "regnet_ux": u[:, 0],
            "regnet_uy": u[:, 1],
            "regnet_uz": u[:, 2],
        }
        csv = write_class_predictions(table, displacement_classes(u), moving_path, output_dir, extra)
        out[setting] = (csv, time.perf_counter() - start)
        start = time.perf_counter()
    return out


def main(
    fixed: str,
    moving: str,
    landmarks: str,
    output_dir: str,
    tile: int = 101,
    compose: str = "exact",
    threads: int | None = None,
    precision: str = AUTO,
    weights_4mm: str = DEFAULT_WEIGHTS[4],
    weights_2mm: str = DEFAULT_WEIGHTS[2],
    weights_1mm: str = DEFAULT_WEIGHTS[1],
) -> None:
    """CLI: RegNet-t classes at the landmarks of one (fixed, registered moving) pair; prints the CSV and seconds.

    Args:
        fixed: fixed image file.
        moving: registered moving image file.
        landmarks: landmark CSV of fixed-image points.
        output_dir: folder of the written CSV.
        tile: output tile edge, ``21 + 4k`` samples.
        compose: "exact" or "sum".
        threads: torch CPU threads, or None.
        precision: "float32", "bfloat16" or "auto".
        weights_4mm: state-dict file of the 4 mm RegNet.
        weights_2mm: state-dict file of the 2 mm RegNet.
        weights_1mm: state-dict file of the 1 mm RegNet.
    """
    weights = {4: weights_4mm, 2: weights_2mm, 1: weights_1mm}
    pairs = {"pair": (moving, landmarks)}
    ((csv, seconds),) = predict_settings(fixed, pairs, output_dir, weights, tile, compose, threads, precision).values()
    print(f"{csv} ({seconds:.1f} s)")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
