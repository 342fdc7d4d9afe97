"""Training patches from prepared artificial pairs: balanced patch centres, the three 101^3 levels and targets.

The pyramid (scripts.transforms.pyramid) of the (fixed, deformed) pair is computed once per loaded pair and every patch
is a
crop of it; patch centres are 1 mm voxels whose indices are multiples of 4, so the same point is sample
``centre / s`` of level s (4, 2, 1 mm) and the three patches are centred consistently. The same pair feeds all
three levels (the paper's figure), not a moving image re-warped by the previous RegNet stages as in the code.

Arrays are torch/numpy in ``(z, y, x)`` order (SimpleITK's); image patches are ``[2, 101, 101, 101]`` with channel
0 fixed and channel 1 deformed (scripts.utils.constants); DVF patches are ``[3, n, n, n]`` in mm, components (x, y, z).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

from scripts.transforms.artificial_dvf import dvf_from_sitk
from scripts.transforms.pyramid import smooth_downsample
from scripts.utils.constants import BACKGROUND_HU, CLASS_THRESHOLDS_MM, FIXED_CHANNEL, LATENT_SIZE, PATCH_SIZE
from scripts.utils.encoder_windows import window_sizes

LEVELS = (4, 2, 1)
CENTRE_STEP = 4  # centres on multiples of 4 (1 mm voxels) are samples of every level
REGNET_OUTPUT_SIZE = 21  # RegNet's DVF output edge for a 101^3 input
MISALIGNMENT_PROBABILITIES = (0.6, 0.2, 0.2)  # [0,3), [3,6), [6,inf) mm, paper section III-B1
REGNET_PROBABILITIES = (1 / 3, 1 / 3, 1 / 3)  # RegNet pre-training: equal numbers per class (docs/method.md section 4)
REGNET_MAX_DEFORMATION_MM = {4: 20.0, 2: 15.0, 1: 7.0}
UNIFORM = "uniform"  # centre probabilities: every candidate alike (the region's own class mix)


# --------------------------------------------------------------------------------------------------- DVF sampling
def _axis_weights(index: np.ndarray, factor: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation along one axis: coarse indices (lo, hi) and weight of hi for 1 mm voxel ``index``."""
    q = np.clip(index, 0, factor * (size - 1)) / factor
    lo = np.floor(q).astype(np.int64)
    hi = np.minimum(lo + 1, size - 1)
    return lo, hi, (q - lo).astype(np.float32)


def dvf_at_voxels(coarse: np.ndarray, factor: int, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Dense field ``[3, len(z), len(y), len(x)]`` at the 1 mm voxel grid ``z x y x x`` from the coarse ``[3, ...]``
    field whose sample j lies on voxel ``factor * j`` (linear in between; outside: nearest edge).

    Args:
        coarse: coarse ``[3, cz, cy, cx]`` field (mm, components x-y-z).
        factor: coarse-grid spacing in 1 mm voxels.
        z: 1 mm voxel indices along z.
        y: 1 mm voxel indices along y.
        x: 1 mm voxel indices along x.

    Returns:
        float32 array ``[3, len(z), len(y), len(x)]``, mm.
    """
    weights = [_axis_weights(np.asarray(i), factor, n) for i, n in zip((z, y, x), coarse.shape[1:])]
    box = tuple(slice(int(lo.min()), int(hi.max()) + 1) for lo, hi, _ in weights)
    out = coarse[(slice(None),) + box]  # only the block that is needed
    for axis, ((lo, hi, w), b) in enumerate(zip(weights, box)):
        shape = [1, 1, 1, 1]
        shape[1 + axis] = -1
        w = w.reshape(shape)
        out = np.take(out, lo - b.start, axis=1 + axis) * (1 - w) + np.take(out, hi - b.start, axis=1 + axis) * w
    return out.astype(np.float32)


def centred_range(centre: int, count: int, step: int = 1) -> np.ndarray:
    """``count`` (odd) indices spaced ``step`` centred on ``centre``.

    Args:
        centre: central index.
        count: number of indices (odd).
        step: spacing of the indices.

    Returns:
        int array of ``count`` indices.
    """
    half = count // 2
    return centre + step * np.arange(-half, half + 1)


def magnitude_patch(coarse: np.ndarray, factor: int, centre, size: int = LATENT_SIZE) -> np.ndarray:
    """``[1, size, size, size]`` |u| (mm) on the 1 mm voxels around ``centre`` (z, y, x).

    Args:
        coarse: coarse ``[3, cz, cy, cx]`` field (mm, components x-y-z).
        factor: coarse-grid spacing in 1 mm voxels.
        centre: 1 mm voxel index (z, y, x) of the patch centre.
        size: patch edge in voxels (odd; default ``LATENT_SIZE``).

    Returns:
        float32 array ``[1, size, size, size]``, mm.
    """
    dvf = dvf_at_voxels(coarse, factor, *(centred_range(c, size) for c in centre))
    return np.sqrt((dvf**2).sum(axis=0, keepdims=True))


def dvf_patch(coarse: np.ndarray, factor: int, centre, level: int, size: int = REGNET_OUTPUT_SIZE) -> np.ndarray:
    """``[3, size, size, size]`` DVF (mm, components x, y, z) on the level-``level`` samples around ``centre``.

    Args:
        coarse: coarse ``[3, cz, cy, cx]`` field (mm, components x-y-z).
        factor: coarse-grid spacing in 1 mm voxels.
        centre: 1 mm voxel index (z, y, x) of the patch centre.
        level: sample spacing of the patch in 1 mm voxels (4, 2 or 1).
        size: patch edge in samples (odd; default ``REGNET_OUTPUT_SIZE``).

    Returns:
        float32 array ``[3, size, size, size]``, mm.
    """
    return dvf_at_voxels(coarse, factor, *(centred_range(c, size, level) for c in centre))


# ---------------------------------------------------------------------------------------------- centre sampling
def candidate_centres(mask: np.ndarray, margin: int, step: int = CENTRE_STEP) -> np.ndarray:
    """``[N, 3]`` voxel indices (z, y, x) on multiples of ``step`` inside ``mask`` and ``margin`` voxels from the
    volume border.

    Args:
        mask: ``(z, y, x)`` bool mask of allowed centres.
        margin: minimum distance from the volume border, voxels.
        step: spacing of the candidate indices, voxels.

    Returns:
        int64 array ``[N, 3]`` (z, y, x); ``[0, 3]`` when the volume is smaller than the margins.
    """
    axes = []
    for n in mask.shape:
        first = int(math.ceil(margin / step)) * step
        axes.append(np.arange(first, n - margin, step))
    if any(len(a) == 0 for a in axes):
        return np.zeros((0, 3), dtype=np.int64)
    inside = mask[np.ix_(*axes)]
    idx = np.nonzero(inside)
    return np.stack([axes[a][idx[a]] for a in range(3)], axis=1).astype(np.int64)


def magnitude_at(coarse: np.ndarray, factor: int, centres: np.ndarray) -> np.ndarray:
    """|u| (mm) at 1 mm voxels ``centres`` ``[N, 3]``; exact coarse samples when the indices are multiples of
    ``factor``.

    Args:
        coarse: coarse ``[3, cz, cy, cx]`` field (mm, components x-y-z).
        factor: coarse-grid spacing in 1 mm voxels.
        centres: ``[N, 3]`` 1 mm voxel indices (z, y, x).

    Returns:
        float32 array ``[N]`` of |u|, mm.
    """
    if len(centres) == 0:
        return np.zeros(0, dtype=np.float32)
    if np.all(centres % factor == 0):
        q = centres // factor
        u = coarse[:, q[:, 0], q[:, 1], q[:, 2]]
    else:
        u = np.stack([dvf_at_voxels(coarse, factor, [z], [y], [x])[:, 0, 0, 0] for z, y, x in centres], axis=1)
    return np.sqrt((u**2).sum(axis=0)).astype(np.float32)


def magnitude_classes(magnitude: np.ndarray, thresholds=CLASS_THRESHOLDS_MM) -> np.ndarray:
    """Class index 0, 1, 2 of |u| for [0,3), [3,6), [6,inf) mm (the edge value belongs to the upper class).

    Args:
        magnitude: |u| values, mm (any shape).
        thresholds: increasing class boundaries, mm (default ``CLASS_THRESHOLDS_MM``).

    Returns:
        int array of the same shape as ``magnitude``.
    """
    return np.searchsorted(np.asarray(thresholds), magnitude, side="right")


class BalancedCentreSampler:
    """Draws patch centres so that the |u| class of the centre follows ``probabilities``; a class without
    candidates is dropped and the others renormalised (``effective_probabilities`` says what is used).
    ``probabilities="uniform"``: every candidate equally likely, i.e. the classes as often as the region holds them."""

    def __init__(
        self,
        centres: np.ndarray,
        magnitude: np.ndarray,
        probabilities=MISALIGNMENT_PROBABILITIES,
        thresholds=CLASS_THRESHOLDS_MM,
    ) -> None:
        if len(centres) == 0:
            raise ValueError("no candidate patch centre (mask empty or volume smaller than the margins)")
        classes = magnitude_classes(magnitude, thresholds)
        self.centres = centres
        self.by_class = [np.flatnonzero(classes == k) for k in range(len(thresholds) + 1)]
        if isinstance(probabilities, str):
            if probabilities != UNIFORM:
                raise ValueError(f"probabilities must be {UNIFORM!r} or one number per class, got {probabilities!r}")
            probabilities = [len(c) for c in self.by_class]
        p = np.asarray(probabilities, dtype=float)
        if len(p) != len(self.by_class) or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"probabilities {probabilities} must be {len(self.by_class)} non-negative numbers")
        p = p * np.array([len(c) > 0 for c in self.by_class])
        self.effective_probabilities = p / p.sum()

    def sample(self, rng: np.random.RandomState, count: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``count`` centres ``[count, 3]`` and their classes.

        Args:
            rng: random state.
            count: number of centres to draw.

        Returns:
            Tuple ``(centres, classes)``: int64 ``[count, 3]`` voxel indices (z, y, x) and ``[count]`` class indices.
        """
        classes = rng.choice(len(self.by_class), size=count, p=self.effective_probabilities)
        picks = np.array([self.by_class[k][rng.randint(len(self.by_class[k]))] for k in classes], dtype=np.int64)
        return self.centres[picks], classes


# ------------------------------------------------------------------------------------------------ image patches
def crop_with_background(volume: torch.Tensor, centre, size: int = PATCH_SIZE, fill: float = BACKGROUND_HU):
    """``[C, size, size, size]`` crop of ``volume`` ``[C, z, y, x]`` centred on sample ``centre``; outside the
    volume: ``fill``. (Copied through numpy: 2-4x faster than a strided torch copy on CPU.)

    Args:
        volume: ``[C, z, y, x]`` tensor or array.
        centre: sample index (z, y, x) of the crop centre.
        size: crop edge in samples (default ``PATCH_SIZE``).
        fill: value outside the volume (default ``BACKGROUND_HU``).

    Returns:
        Tensor ``[C, size, size, size]`` with the dtype of ``volume``.
    """
    half = size // 2
    source = volume.numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    out = np.full((source.shape[0], size, size, size), fill, dtype=source.dtype)
    src, dst = [], []
    for c, n in zip(centre, source.shape[1:]):
        lo, hi = int(c) - half, int(c) + half + 1
        a, b = max(lo, 0), min(hi, n)
        if a >= b:
            return torch.from_numpy(out)
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    out[(slice(None), *dst)] = source[(slice(None), *src)]
    return torch.from_numpy(out)


def pair_pyramid(fixed: np.ndarray, deformed: np.ndarray, levels=LEVELS) -> dict[int, torch.Tensor]:
    """Levels ``{s: [2, z_s, y_s, x_s]}`` of the pair (channel 0 fixed, 1 deformed), each from the 1 mm images with
    the smoothing down-sampling of scripts.transforms.pyramid.

    Args:
        fixed: ``(z, y, x)`` fixed image at 1 mm, HU.
        deformed: ``(z, y, x)`` deformed image on the same grid, HU.
        levels: down-sampling factors (default ``LEVELS`` = 4, 2, 1).

    Returns:
        Dict level -> float32 tensor ``[2, z_s, y_s, x_s]``.
    """
    pair = torch.stack([torch.as_tensor(fixed, dtype=torch.float32), torch.as_tensor(deformed, dtype=torch.float32)])
    if FIXED_CHANNEL != 0:
        pair = pair.flip(0)
    return {s: smooth_downsample(pair[None], s)[0] for s in levels}


def misalignment_sample(
    pyramid: dict[int, torch.Tensor], coarse_dvf: np.ndarray, factor: int, centre, output_size: int = LATENT_SIZE
) -> dict:
    """Inputs and target of the misalignment network at 1 mm voxel ``centre`` (multiples of 4): the encoder windows
    of every level (101^3 for the paper's 25^3 output block; ``window_sizes`` for a larger ``output_size``) and
    |u| on the ``output_size``^3 block.

    Args:
        pyramid: ``pair_pyramid`` of the pair (levels 4, 2, 1).
        coarse_dvf: coarse ``[3, cz, cy, cx]`` field (mm, components x-y-z).
        factor: coarse-grid spacing in 1 mm voxels.
        centre: 1 mm voxel index (z, y, x), multiples of ``CENTRE_STEP``.
        output_size: edge of the |u| block in voxels (default ``LATENT_SIZE``).

    Returns:
        Dict with ``image_4mm``, ``image_2mm``, ``image_1mm`` (``[2, n, n, n]`` tensors), ``magnitude``
        (``[1, output_size, output_size, output_size]`` float32, mm) and ``centre`` (tensor of 3 indices).

    Raises:
        ValueError: when ``centre`` is not a multiple of ``CENTRE_STEP`` on every axis.
    """
    centre = [int(c) for c in centre]
    if any(c % CENTRE_STEP for c in centre):
        raise ValueError(f"patch centre {centre} must be a multiple of {CENTRE_STEP} on every axis")
    sizes = window_sizes(output_size, LEVELS)
    sample = {f"image_{s}mm": crop_with_background(pyramid[s], [c // s for c in centre], sizes[s]) for s in LEVELS}
    sample["magnitude"] = torch.from_numpy(magnitude_patch(coarse_dvf, factor, centre, output_size))
    sample["centre"] = torch.tensor(centre)
    return sample


def regnet_sample(pyramid: dict[int, torch.Tensor], coarse_dvf: np.ndarray, factor: int, centre, level: int) -> dict:
    """RegNet pre-training sample of level ``level``: ``image`` [2,101^3] and ``dvf`` [3,21^3] (mm, x y z).

    Args:
        pyramid: ``pair_pyramid`` of the pair.
        coarse_dvf: coarse ``[3, cz, cy, cx]`` field (mm, components x-y-z).
        factor: coarse-grid spacing in 1 mm voxels.
        centre: 1 mm voxel index (z, y, x), multiples of ``level``.
        level: pyramid level (4, 2 or 1 mm).

    Returns:
        Dict with ``image`` (``[2, 101, 101, 101]`` tensor), ``dvf`` (``[3, 21, 21, 21]`` float32, mm) and ``centre``.

    Raises:
        ValueError: when ``centre`` is not a multiple of ``level`` on every axis.
    """
    centre = [int(c) for c in centre]
    if any(c % level for c in centre):
        raise ValueError(f"patch centre {centre} must be a multiple of the level {level}")
    return {
        "image": crop_with_background(pyramid[level], [c // level for c in centre]),
        "dvf": torch.from_numpy(dvf_patch(coarse_dvf, factor, centre, level)),
        "centre": torch.tensor(centre),
    }


# --------------------------------------------------------------------------------------------- loading of pairs
def read_datalist(datalist: str | Path, split: str = "training") -> list[dict]:
    """Entries of ``split`` in a prepare_data datalist with paths made absolute.

    Args:
        datalist: JSON datalist written by ``scripts.data.prepare_data``.
        split: key of the entries to read, e.g. "training" or "validation".

    Returns:
        List of entry dicts; ``fixed``, ``deformed``, ``dvf``, ``body_mask`` and ``lung_mask`` are absolute paths.

    Raises:
        FileNotFoundError: when ``datalist`` does not exist.
        ValueError: when it holds no entries under ``split``.
    """
    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} does not exist; run python -m scripts.data.prepare_data first")
    entries = json.loads(path.read_text()).get(split)
    if not entries:
        raise ValueError(f"datalist {path} has no entries under {split!r}")
    keys = ("fixed", "deformed", "dvf", "body_mask", "lung_mask")
    return [{**e, **{k: str(path.parent / e[k]) for k in keys}} for e in entries]


def load_pair(entry: dict, levels=LEVELS) -> dict:
    """Read one prepared pair: pyramid of (fixed, deformed), coarse DVF ``[3, ...]`` and its factor, masks.

    Args:
        entry: datalist entry with ``fixed``, ``deformed``, ``dvf``, ``body_mask`` and ``lung_mask`` paths.
        levels: not used; the pyramid always has ``LEVELS``.

    Returns:
        Dict with ``pyramid`` (``pair_pyramid``), ``dvf`` (float32 ``[3, cz, cy, cx]``, mm), ``factor`` (int) and
        ``body_mask``, ``lung_mask`` (bool ``(z, y, x)``).

    Raises:
        FileNotFoundError: when one of the entry's files does not exist.
    """
    for key in ("fixed", "deformed", "dvf", "body_mask", "lung_mask"):
        if not Path(entry[key]).is_file():
            raise FileNotFoundError(f"{entry[key]} ({key} of scan {entry.get('scan')}) does not exist")
    fixed = sitk.ReadImage(entry["fixed"])
    dvf = sitk.ReadImage(entry["dvf"])
    factor = int(round(dvf.GetSpacing()[0] / fixed.GetSpacing()[0]))
    return {
        "pyramid": pair_pyramid(
            sitk.GetArrayFromImage(fixed), sitk.GetArrayFromImage(sitk.ReadImage(entry["deformed"]))
        ),
        "dvf": dvf_from_sitk(dvf),
        "factor": factor,
        "body_mask": sitk.GetArrayFromImage(sitk.ReadImage(entry["body_mask"])) > 0,
        "lung_mask": sitk.GetArrayFromImage(sitk.ReadImage(entry["lung_mask"])) > 0,
    }


class RandBalancedCentred(Randomizable, MapTransform):
    """Adds ``centre`` (1 mm voxel, multiples of 4) to a loaded pair, balanced by |u| class (see
    BalancedCentreSampler), inside ``region`` ("body_mask" or "lung_mask"), ``margin`` voxels from the border."""

    def __init__(
        self,
        keys: KeysCollection = "dvf",
        region: str = "body_mask",
        probabilities=MISALIGNMENT_PROBABILITIES,
        margin: int = LATENT_SIZE // 2,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.region, self.probabilities, self.margin = region, probabilities, margin

    def randomize(self, data=None) -> None:
        """Nothing to pre-draw: the sampler draws with ``self.R``."""

    def sampler(self, pair: dict) -> BalancedCentreSampler:
        """The pair's sampler (cached in the pair dict under ``_sampler_<region>``)."""
        key = f"_sampler_{self.region}_{self.margin}"
        if key not in pair:
            centres = candidate_centres(pair[self.region], self.margin)
            magnitude = magnitude_at(pair[self.first_key(pair)], pair["factor"], centres)
            pair[key] = BalancedCentreSampler(centres, magnitude, self.probabilities)
        return pair[key]

    def __call__(self, data):
        d = dict(data)
        centre, _ = self.sampler(data).sample(self.R, 1)
        d["centre"] = centre[0]
        return d


class MisalignmentPatchd(MapTransform):
    """From a loaded pair with ``centre``: ``image_4mm``, ``image_2mm``, ``image_1mm`` [2,101^3] and
    ``magnitude`` [1,25^3] (see misalignment_sample)."""

    def __init__(self, keys: KeysCollection = "dvf", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data):
        return misalignment_sample(data["pyramid"], data[self.first_key(data)], data["factor"], data["centre"])


class RegNetPatchd(MapTransform):
    """From a loaded pair with ``centre``: ``image`` [2,101^3] at ``level`` and ``dvf`` [3,21^3] (mm)."""

    def __init__(self, level: int, keys: KeysCollection = "dvf", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level}")
        self.level = level

    def __call__(self, data):
        return regnet_sample(data["pyramid"], data[self.first_key(data)], data["factor"], data["centre"], self.level)


class MisalignmentPatchDataset(torch.utils.data.IterableDataset):
    """Patches from a prepare_data datalist: loads one pair at a time (pyramid once), draws ``patches_per_pair``
    balanced patches from it, then moves on; pairs are shuffled per epoch and split over DataLoader workers.

    ``level=None`` gives misalignment samples (image_4mm/2mm/1mm, magnitude); ``level`` in (4, 2, 1) gives RegNet
    samples (image, dvf) with equal class probabilities and a margin that keeps the 21^3 DVF target inside.
    """

    def __init__(
        self,
        datalist: str | Path,
        split: str = "training",
        patches_per_pair: int = 50,
        probabilities=None,
        region: str = "body_mask",
        level: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.entries = read_datalist(datalist, split)
        self.patches_per_pair, self.level, self.seed, self.shuffle = patches_per_pair, level, seed, shuffle
        self.epoch = 0
        if level is None:
            self.centres = RandBalancedCentred(region=region, probabilities=probabilities or MISALIGNMENT_PROBABILITIES)
            self.patch = MisalignmentPatchd()
        else:
            margin = max(LATENT_SIZE // 2, level * (REGNET_OUTPUT_SIZE // 2))
            self.centres = RandBalancedCentred(
                region=region, probabilities=probabilities or REGNET_PROBABILITIES, margin=margin
            )
            self.patch = RegNetPatchd(level)

    def __len__(self) -> int:
        return sum(self.patch_count(e) for e in self.entries)

    def load(self, entry: dict) -> dict:
        """One pair with its pyramid, target field, factor and masks (``load_pair``)."""
        return load_pair(entry)

    def patch_count(self, entry: dict) -> int:
        """Patches drawn from ``entry`` per pass."""
        return self.patches_per_pair

    def set_epoch(self, epoch: int) -> None:
        """Different pair order and patches per epoch, reproducibly."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.RandomState((self.seed * 1_000_003 + self.epoch) % 2**32)
        order = rng.permutation(len(self.entries)) if self.shuffle else np.arange(len(self.entries))
        for i in order[worker::workers]:
            self.centres.set_random_state(seed=int((self.seed * 7919 + self.epoch * 104_729 + i) % 2**32))
            pair = self.load(self.entries[i])
            for _ in range(self.patch_count(self.entries[i])):
                sample = self.patch(self.centres(pair))
                sample["scan"] = self.entries[i].get("scan", "")
                yield sample
        self.epoch += 1
