"""Training patches from registered artificial pairs (``scripts.registration.registered_pairs``).

A pair holds F, the registered moving image D, the exact residual misalignment e (the target: |e| in mm) and the
re-registration's estimate r of it (an input of the residual-informed network). Patch centres are balanced by the
class of |e| inside the lungs, where the misalignment that matters is (or uniform there); the images, the pyramid
and the target block (25^3, the paper's, or larger) follow ``scripts.data.patch_sampling``, and the residual patch
``[3, n, n, n]`` (mm, x y z) covers the target's voxels; for a network whose encoders read r too, r's pyramid windows
follow the images' as three more channels. Thick-slice scans can be drawn less often (``scan_weights``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from scripts.data.patch_sampling import (
    LEVELS,
    MISALIGNMENT_PROBABILITIES,
    MisalignmentPatchDataset,
    RandBalancedCentred,
    centred_range,
    crop_with_background,
    dvf_at_voxels,
    misalignment_sample,
    pair_pyramid,
)
from scripts.transforms.pyramid import smooth_downsample
from scripts.utils.constants import LATENT_SIZE
from scripts.utils.encoder_windows import check_output_size, window_sizes

PAIR_KEYS = ("fixed", "registered", "residual_true", "body_mask", "lung_mask")
ESTIMATE_KEY = "residual_estimate"


def _locate(name: str, folder: Path) -> str:
    """A datalist path: absolute, or relative to the working directory it was written from (as registered_pairs
    writes them), or else relative to the datalist's folder."""
    given = Path(name)
    return str(given if given.is_absolute() or given.exists() else folder / given)


def read_registered_datalist(datalist: str | Path, split: str = "training", estimate_key: str = ESTIMATE_KEY) -> list:
    """Entries of ``split`` in a registered-pairs datalist, each with ``residual`` (the path of its estimate r);
    a ValueError or FileNotFoundError names the datalist and the pair that lacks a file.

    Args:
        datalist: registered-pairs datalist (JSON).
        split: datalist key, e.g. "training" or "validation".
        estimate_key: record key of the re-registration estimate.

    Returns:
        List of entries with absolute paths under ``PAIR_KEYS`` and ``residual``.

    Raises:
        FileNotFoundError: when the datalist or a pair's file does not exist.
        ValueError: when ``split`` has no entries or a pair lacks its estimate or a key.
    """
    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(
            f"datalist {path} does not exist; run python -m scripts.registration.registered_pairs make, then estimate"
        )
    entries = json.loads(path.read_text()).get(split)
    if not entries:
        raise ValueError(f"datalist {path} has no entries under {split!r}")
    out = []
    for entry in entries:
        name = entry.get("record") or entry.get("registered", "?")
        estimate = entry.get(estimate_key)
        if not isinstance(estimate, dict) or "path" not in estimate:
            raise ValueError(
                f"{path}: pair {name} has no re-registration estimate {estimate_key!r}; run python -m "
                "scripts.registration.registered_pairs estimate (the residual-informed network needs r)"
            )
        absent = [k for k in PAIR_KEYS if k not in entry]
        if absent:
            raise ValueError(f"{path}: pair {name} has no {absent}; is this a registered-pairs datalist?")
        files = {k: _locate(entry[k], path.parent) for k in PAIR_KEYS}
        files["residual"] = _locate(estimate["path"], path.parent)
        missing = [f"{k} {f}" for k, f in files.items() if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: pair {name} is missing {missing}")
        out.append({**entry, **files})
    return out


def read_vector(path: str) -> np.ndarray:
    """A vector image as a ``[3, z, y, x]`` float32 array (mm, components x y z)."""
    return np.ascontiguousarray(np.moveaxis(sitk.GetArrayFromImage(sitk.ReadImage(path)), -1, 0), dtype=np.float32)


def load_registered_pair(entry: dict, residual_pyramid: bool = False) -> dict:
    """Pyramid of (F, D), the exact residual e (``residual_true``, the target field, factor 1), the estimate r
    (``residual``) and the masks of one registered pair; with ``residual_pyramid`` also r's levels
    (``residual_pyramid``, the images' smoothing down-sampling) for encoders that read r.

    Args:
        entry: datalist entry from ``read_registered_datalist``.
        residual_pyramid: also compute r's levels 4, 2, 1 mm.

    Returns:
        Dict with ``pyramid``, ``residual_true`` and ``residual`` (float32 ``[3, z, y, x]``, mm), ``factor`` (1),
        ``body_mask``, ``lung_mask`` (bool ``(z, y, x)``) and, if asked, ``residual_pyramid`` (level -> tensor).
    """
    fixed = sitk.GetArrayFromImage(sitk.ReadImage(entry["fixed"]))
    residual = read_vector(entry["residual"])
    pair = {
        "pyramid": pair_pyramid(fixed, sitk.GetArrayFromImage(sitk.ReadImage(entry["registered"]))),
        "residual_true": read_vector(entry["residual_true"]),
        "residual": residual,
        "factor": 1,
        "body_mask": sitk.GetArrayFromImage(sitk.ReadImage(entry["body_mask"])) > 0,
        "lung_mask": sitk.GetArrayFromImage(sitk.ReadImage(entry["lung_mask"])) > 0,
    }
    if residual_pyramid:
        field = torch.from_numpy(residual)[None]
        pair["residual_pyramid"] = {s: smooth_downsample(field, s)[0] for s in LEVELS}
    return pair


class RegisteredPatchd(MapTransform):
    """From a loaded registered pair with ``centre``: ``image_4mm``, ``image_2mm``, ``image_1mm`` (the encoder
    windows; [2,101^3] for the paper's 25^3 block), ``magnitude`` [1,n^3] (|e|, mm) and ``residual`` [3,n^3] (r, mm)
    on the same ``n = output_size`` voxels. With ``residual_windows`` the encoder windows have 5 channels: the pair,
    then r (mm, zero outside the pair) cut from ``residual_pyramid`` (``load_registered_pair(residual_pyramid=True)``).
    """

    def __init__(
        self,
        keys: KeysCollection = "residual_true",
        output_size: int = LATENT_SIZE,
        residual_windows: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_size = check_output_size(output_size)
        self.residual_windows = residual_windows

    def __call__(self, data):
        centre = [int(c) for c in data["centre"]]
        sample = misalignment_sample(data["pyramid"], data[self.first_key(data)], 1, centre, self.output_size)
        voxels = [centred_range(c, self.output_size) for c in centre]
        sample["residual"] = torch.from_numpy(dvf_at_voxels(data["residual"], 1, *voxels))
        if self.residual_windows:
            if "residual_pyramid" not in data:
                raise ValueError(
                    "residual windows need the pair loaded with load_registered_pair(residual_pyramid=True)"
                )
            sizes = window_sizes(self.output_size, LEVELS)
            for s in LEVELS:
                window = crop_with_background(data["residual_pyramid"][s], [c // s for c in centre], sizes[s], 0.0)
                sample[f"image_{s}mm"] = torch.cat([sample[f"image_{s}mm"], window])
        return sample


class RegisteredPatchDataset(MisalignmentPatchDataset):
    """Patches from a registered-pairs datalist, one pair loaded at a time (see ``MisalignmentPatchDataset``).

    Args:
        datalist: ``datalist.json`` of ``scripts.registration.registered_pairs``.
        split: "training" or "validation".
        patches_per_pair: patches drawn from a pair per pass (times its scan's weight, at least 1).
        probabilities: class probabilities of the patch centres' |e| (default 60/20/20 %, the paper's), or
            "uniform" (centres uniform in the region: the pairs' own class mix).
        region: mask the centres lie in ("lung_mask" or "body_mask").
        scan_weights: ``{scan name: weight}``, e.g. 0.5 for the 5 and 8 mm scans; missing scans weigh 1.
        estimate_key: the datalist key of the estimate r to read (``registered_pairs estimate --suffix``).
        residual_windows: the encoder windows carry r as three more channels (``residual_input="encoders"``).
        output_size: edge of the labelled 1 mm block per sample (``1 + 8k``; 25 is the paper's 101^3 patch, 41 or
            57 label 4.4 or 12 times more voxels per sample for 3.0 or 7.3 times the cost of one: 1.45 and 1.6 times
            the labelled voxels per second of the residual recipe on 2 CPU cores; benchmarks/bench_training.py).
        seed, shuffle: as ``MisalignmentPatchDataset``.
    """

    file_keys = PAIR_KEYS + ("residual",)

    def __init__(
        self,
        datalist: str | Path,
        split: str = "training",
        patches_per_pair: int = 50,
        probabilities=None,
        region: str = "lung_mask",
        scan_weights: dict | None = None,
        estimate_key: str = ESTIMATE_KEY,
        output_size: int = LATENT_SIZE,
        residual_windows: bool = False,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        torch.utils.data.IterableDataset.__init__(self)
        self.entries = read_registered_datalist(datalist, split, estimate_key)
        self.patches_per_pair, self.level, self.seed, self.shuffle = patches_per_pair, None, seed, shuffle
        self.scan_weights = dict(scan_weights or {})
        self.epoch = 0
        self.centres = RandBalancedCentred(
            keys="residual_true",
            region=region,
            probabilities=probabilities or MISALIGNMENT_PROBABILITIES,
            margin=check_output_size(output_size) // 2,
        )
        self.patch = RegisteredPatchd(output_size=output_size, residual_windows=residual_windows)

    def load(self, entry: dict) -> dict:
        return load_registered_pair(entry, residual_pyramid=self.patch.residual_windows)

    def patch_count(self, entry: dict) -> int:
        weight = float(self.scan_weights.get(entry.get("scan", ""), 1.0))
        return max(1, int(round(self.patches_per_pair * weight)))
