"""Training and validation streams over the prepared patch datasets (scripts.data.patch_sampling).

``MisalignmentPatchDataset`` yields patch dicts pair by pair; ``TransformedPatches`` adds what training needs on
top: the datalist's files checked before training starts, a transform per sample (input noise, normalisation),
and for validation a fixed set (same epoch every pass, capped count) split over the processes of a DDP run.
"""

import itertools
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import torch.distributed as dist
from torch.utils.data import IterableDataset

logger = logging.getLogger(__name__)

PAIR_FILE_KEYS = ("fixed", "deformed", "dvf", "body_mask", "lung_mask")


def check_pair_files(entries: list, source: str = "datalist", keys: tuple = PAIR_FILE_KEYS) -> None:
    """Raise FileNotFoundError naming the missing files of datalist ``entries`` (absolute paths under ``keys``), if
    any, or ValueError if entries lack keys (a datalist of another kind).

    Args:
        entries: datalist entries with absolute paths.
        source: name of the datalist in the message.
        keys: entry keys that must name existing files.

    Raises:
        ValueError: when an entry lacks one of ``keys``.
        FileNotFoundError: when a named file does not exist.
    """
    missing = [str(e[k]) for e in entries for k in keys if k in e and not Path(e[k]).is_file()]
    absent_keys = sorted({k for e in entries for k in keys if k not in e})
    if absent_keys:
        raise ValueError(f"{source}: entries without {absent_keys}; re-run the command that made the datalist")
    if missing:
        raise FileNotFoundError(
            f"{source} names {len(missing)} missing files, e.g. {missing[:3]}; re-run the command that made it"
        )


def _rank_and_world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TransformedPatches(IterableDataset):
    """Iterate ``patches`` (an iterable patch dataset) and apply ``transform`` to every sample.

    Args:
        patches: e.g. ``scripts.data.patch_sampling.MisalignmentPatchDataset``; its ``entries`` are checked here
            (the files under its ``file_keys``, by default those of a prepare_data datalist).
        transform: applied per sample (a MONAI Compose of dictionary transforms), or None.
        max_samples: stop after this many samples per pass (a small held-out validation set), or None.
        fixed_epoch: if set, every pass replays this epoch of ``patches``: the same samples at every validation.
        shard_by_rank: under torch.distributed, keep every world_size-th sample for this rank (validation: each
            process scores its share, the metrics are summed across processes).
        max_deformation_mm: the maximum deformation the config expects; a warning names the datalist's pairs
            prepared with another one (e.g. the 10 mm misalignment set used for RegNet^4, which expects 20 mm).
    """

    def __init__(
        self,
        patches: Any,
        transform: Optional[Callable[[Dict], Dict]] = None,
        max_samples: Optional[int] = None,
        fixed_epoch: Optional[int] = None,
        shard_by_rank: bool = False,
        max_deformation_mm: Optional[float] = None,
    ) -> None:
        super().__init__()
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
        entries = getattr(patches, "entries", None)
        if entries is not None:
            check_pair_files(entries, keys=getattr(patches, "file_keys", PAIR_FILE_KEYS))
            if max_deformation_mm is not None:
                found = sorted({float(e.get("max_deformation_mm", max_deformation_mm)) for e in entries})
                if found != [float(max_deformation_mm)]:
                    logger.warning(
                        f"pairs prepared with maximum deformation {found} mm; this config expects "
                        f"{max_deformation_mm} mm (see python -m scripts.data.prepare_data --regnet_level)"
                    )
        self.patches = patches
        self.transform = transform
        self.max_samples = max_samples
        self.fixed_epoch = fixed_epoch
        self.shard_by_rank = shard_by_rank
        if shard_by_rank and len(self) == 0:
            raise ValueError(
                f"{len(patches)} samples cannot be shared by {_rank_and_world()[1]} processes: every process needs"
                " at least one (raise the number of validation patches)"
            )

    def __len__(self) -> int:
        count = len(self.patches)
        if self.max_samples is not None:
            count = min(count, self.max_samples)
        if self.shard_by_rank:
            rank, world = _rank_and_world()
            count = len(range(rank, count, world))
        return count

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to ``patches`` unless the epoch is fixed."""
        if self.fixed_epoch is None and hasattr(self.patches, "set_epoch"):
            self.patches.set_epoch(epoch)

    def __iter__(self) -> Iterator[Dict]:
        if self.fixed_epoch is not None:
            self.patches.set_epoch(self.fixed_epoch)
        rank, world = _rank_and_world() if self.shard_by_rank else (0, 1)
        for index, sample in enumerate(itertools.islice(self.patches, self.max_samples)):
            if index % world != rank:
                continue
            yield self.transform(sample) if self.transform is not None else sample
