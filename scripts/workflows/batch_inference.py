"""Batch QA: the bundle's inference (configs/inference.json, any ``method``) over a list of registered pairs, one
output folder per pair, a summary CSV and a report with one line per pair.

The list is a CSV with a header (columns ``fixed``, ``moving``, optional ``landmarks`` and ``name``) or a JSON list
of such objects (or ``{"pairs": [...]}``); relative paths are relative to the list file. Pair ``i`` writes into
``<output_dir>/<name>`` (default ``<i:04d>_<moving stem>``) and, last, a record ``qa_record.json`` of its inputs,
outputs and summary: a pair whose record matches its inputs (paths, sizes, modification times, method, overrides) and
whose result set is complete (every file its ``<stem>_run.json`` manifest lists, with the same sha256) is skipped. A
bad pair gets one line in the report and the run goes on; the batch exits with status 1 when any pair failed
(``allow_failures`` keeps 0). With ``torch.distributed`` initialised (``configs/multi_gpu_batch.json`` under torchrun)
each process takes its share of the list (``monai.data.DistributedSampler``) and rank 0 writes the summary.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.distributed as dist
from monai.bundle import ConfigWorkflow
from monai.data import DistributedSampler
from tqdm import tqdm

from scripts.data.image_io import image_stem
from scripts.data.result_set import verify_manifest
from scripts.evaluation.landmark_metrics import classification_scores, load_predictions, true_classes
from scripts.inferers.io_transforms import BadInputExit
from scripts.registration.elastix import TRE_COLUMN
from scripts.utils.atomic_write import atomic_write_text
from scripts.utils.constants import CLASS_NAMES
from scripts.workflows.bundle_run import UsageExit, check_overrides

logger = logging.getLogger(__name__)

RECORD_NAME = "qa_record.json"
SUMMARY_NAME = "batch_summary.csv"
REPORT_NAME = "batch_report.txt"
MAP_SUFFIXES = ("misalignment.nii.gz", "probabilities.nii.gz")  # every method writes these
SUMMARY_COLUMNS = (
    ["index", "name", "status", "method", "fixed", "moving", "landmarks", "voxels_in_mask"]
    + [f"fraction_{name}" for name in CLASS_NAMES]
    + [
        "mean_error_mm",
        "landmarks_n",
        "landmarks_unassessed",
        "landmark_mean_f1",
        "landmark_kappa",
        "landmark_accuracy",
    ]
    + ["landmark_error_mae_mm", "rank", "output_dir", "message"]
)


@dataclass
class PairEntry:
    """One row of the pair list: absolute paths, its position and the name of its output folder."""

    index: int
    fixed: str
    moving: str
    landmarks: str = ""
    name: str = ""
    problem: str = ""  # a row that cannot be run (missing column): reported, not run

    def __post_init__(self) -> None:
        if not self.name:
            self.name = f"{self.index:04d}_{image_stem(self.moving) if self.moving else 'pair'}"


@dataclass
class PairResult:
    """What happened to one pair: status ``done``, ``skipped`` (complete outputs found) or ``failed``."""

    entry: PairEntry
    status: str
    message: str = ""
    summary: Dict[str, Any] = field(default_factory=dict)

    def report_line(self) -> str:
        """One line of the report: index, name, status and the reason of a failure."""
        text = f"pair {self.entry.index} ({self.entry.name}): {self.status}"
        return f"{text}: {self.message}" if self.message else text


def read_pair_list(path: str | os.PathLike) -> List[PairEntry]:
    """Pairs from a CSV (header ``fixed,moving[,landmarks][,name]``) or JSON list; paths relative to the list file.

    A row without a fixed or moving path becomes an entry with a ``problem`` (reported as failed, the rest runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pair list {path}: file not found")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"pair list {path}: not valid JSON ({error})") from None
        rows = rows.get("pairs") if isinstance(rows, dict) else rows
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"pair list {path}: expected a list of objects with 'fixed' and 'moving' (or 'pairs')")
    else:
        reader = csv.DictReader(io.StringIO(text))
        missing = {"fixed", "moving"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"pair list {path}: missing column(s) {sorted(missing)}; it has {reader.fieldnames}")
        rows = list(reader)
    entries = []
    for index, row in enumerate(rows):
        values = {key: str(row.get(key) or "").strip() for key in ("fixed", "moving", "landmarks", "name")}
        absent = [key for key in ("fixed", "moving") if not values[key]]
        for key in ("fixed", "moving", "landmarks"):
            if values[key]:
                values[key] = str((path.parent / values[key]).resolve())
        problem = f"row {index + 1} of {path} has no {' and no '.join(absent)} path" if absent else ""
        entries.append(PairEntry(index, problem=problem, **values))
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"pair list {path}: output names {duplicates} occur more than once; give unique 'name's")
    return entries


def _file_signature(path: str) -> Dict[str, Any]:
    stat = Path(path).stat() if path and Path(path).is_file() else None
    return {"path": path, "bytes": stat.st_size if stat else None, "mtime_ns": stat.st_mtime_ns if stat else None}


def summarise_outputs(folder: Path, stem: str, landmarks: str) -> Dict[str, Any]:
    """Class fractions in the mask, the mean expected error (methods with an error map) and, with a ``tre`` column
    in the landmark table, the landmark scores (mean F1, kappa, accuracy; the error map's mean absolute error).

    Args:
        folder: the pair's output folder.
        stem: stem of the moving image (names the output files).
        landmarks: the pair's landmark CSV path, "" for none.

    Returns:
        Dict with ``voxels_in_mask``, ``fraction_<class>`` and, when available, ``mean_error_mm``, ``landmarks_n``,
        ``landmarks_unassessed``, ``landmark_mean_f1``, ``landmark_kappa``, ``landmark_accuracy`` and
        ``landmark_error_mae_mm``.
    """
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{stem}_misalignment.nii.gz")))
    probabilities = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{stem}_probabilities.nii.gz")))
    mask = probabilities.sum(axis=-1) > 0  # the probabilities are 0 outside the predicted region
    count = int(mask.sum())
    summary: Dict[str, Any] = {"voxels_in_mask": count}
    for k, name in enumerate(CLASS_NAMES):
        summary[f"fraction_{name}"] = float((labels[mask] == k).mean()) if count else float("nan")
    error_path = folder / f"{stem}_error_mm.nii.gz"
    if error_path.is_file():
        error = sitk.GetArrayFromImage(sitk.ReadImage(str(error_path)))
        summary["mean_error_mm"] = float(np.nanmean(error[mask])) if count else float("nan")
    table_path = folder / f"{stem}_landmarks.csv"
    if landmarks and table_path.is_file():
        with table_path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if TRE_COLUMN in header:
            predictions = load_predictions(table_path, setting="batch")
            scores = classification_scores(true_classes(predictions.tre), predictions.pred)
            summary.update(
                landmarks_n=scores["n"],
                landmarks_unassessed=predictions.unassessed,
                landmark_mean_f1=scores["mean_f1"],
                landmark_kappa=scores["kappa"],
                landmark_accuracy=scores["accuracy"],
            )
            if "error_mm" in header:
                with table_path.open(newline="") as f:
                    estimated = np.array([float(row["error_mm"]) for row in csv.DictReader(f) if row["error_mm"]])
                summary["landmark_error_mae_mm"] = float(np.abs(estimated - predictions.tre).mean())
    return summary


class BatchInference:
    """Run configs/inference.json on every pair of a list (this process's share of it), skip complete ones and
    write the summary CSV and the report.

    Args:
        pairs_file: CSV or JSON list of pairs (see the module docstring).
        output_dir: one folder per pair inside, plus ``batch_summary.csv`` and ``batch_report.txt``.
        bundle_root: the bundle folder (its ``configs/inference.json``, ``metadata.json`` and ``logging.conf``).
        overrides: config overrides for every pair (e.g. ``{"method": "reregistration"}``, ``{"tile_size": 49}``).
        device: the device string each pair's inference uses (``cuda:<local rank>`` under torchrun with GPUs).
        rank, world_size: this process's share of the list; by default taken from ``torch.distributed`` when it is
            initialised (else 0 and 1).
        progress: show a progress bar over this process's pairs.
        allow_failures: ``main()`` exits with status 0 even when pairs failed (by default 1, for scripts).
    """

    def __init__(
        self,
        pairs_file: str | os.PathLike,
        output_dir: str | os.PathLike,
        bundle_root: str | os.PathLike = ".",
        overrides: Optional[Mapping[str, Any]] = None,
        device: str | torch.device | None = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        progress: bool = True,
        allow_failures: bool = False,
    ) -> None:
        if not str(pairs_file):
            raise ValueError("no pair list: give --pairs_file pairs.csv (columns fixed,moving[,landmarks][,name])")
        self.pairs_file = Path(pairs_file)
        self.output_dir = Path(output_dir)
        self.bundle_root = Path(bundle_root).resolve()
        self.overrides = {k: v for k, v in dict(overrides or {}).items()}
        check_overrides(self.bundle_root / "configs" / "inference.json", self.overrides)  # a typo stops it here
        self.allow_failures = allow_failures
        self.device = None if device is None else str(device)
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        self.progress = progress

    def workflow(self, entry: PairEntry, folder: Path) -> ConfigWorkflow:
        """The bundle's inference workflow for one pair (configs/inference.json with this batch's overrides).

        Args:
            entry: the pair.
            folder: its output folder.

        Returns:
            The ``ConfigWorkflow`` (not yet initialised).
        """
        configs = self.bundle_root / "configs"
        settings: Dict[str, Any] = {"bundle_root": str(self.bundle_root), "progress": False}
        settings.update(self.overrides)
        if self.device is not None:
            settings["device"] = f"$torch.device('{self.device}')"
        settings.update(
            fixed_image=entry.fixed, moving_image=entry.moving, landmarks=entry.landmarks, output_dir=str(folder)
        )
        return ConfigWorkflow(
            config_file=str(configs / "inference.json"),
            meta_file=str(configs / "metadata.json"),
            logging_file=str(configs / "logging.conf"),
            workflow_type="infer",
            **settings,
        )

    def _signature(self, entry: PairEntry) -> Dict[str, Any]:
        return {
            "inputs": [_file_signature(p) for p in (entry.fixed, entry.moving, entry.landmarks)],
            "overrides": {k: str(v) for k, v in sorted(self.overrides.items())},
        }

    def complete_record(self, entry: PairEntry, folder: Path) -> Optional[Dict[str, Any]]:
        """The pair's record if its outputs are there, complete and made from the same inputs; else None.

        Args:
            entry: the pair.
            folder: its output folder.

        Returns:
            The record dict (``signature``, ``outputs``, ``summary``), or None.
        """
        path = folder / RECORD_NAME
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if (
            record.get("signature") != self._signature(entry)
            or verify_manifest(folder, image_stem(entry.moving)) is None
        ):
            return None
        return record

    def run_pair(self, entry: PairEntry) -> PairResult:
        """Run (or skip) one pair; every error becomes a ``failed`` result with one message naming the problem."""
        if entry.problem:
            return PairResult(entry, "failed", entry.problem)
        folder = self.output_dir / entry.name
        record = self.complete_record(entry, folder)
        if record is not None:
            return PairResult(entry, "skipped", "complete outputs found", record["summary"])
        stem = image_stem(entry.moving)
        try:
            workflow = self.workflow(entry, folder)
            workflow.initialize()
            method = str(workflow.parser.get_parsed_content("method"))
            try:
                workflow.run()
            finally:
                workflow.finalize()
            manifest = verify_manifest(folder, stem)
            if manifest is None:
                raise RuntimeError(f"the run left no complete result set of {stem} in {folder}")
            outputs = sorted(f["name"] for f in manifest["files"])
            missing = [s for s in MAP_SUFFIXES if f"{stem}_{s}" not in outputs]
            if missing:
                raise RuntimeError(f"the run wrote no {', '.join(missing)} in {folder}")
            summary = {"method": method, "rank": self.rank, **summarise_outputs(folder, stem, entry.landmarks)}
        except (Exception, BadInputExit) as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            logger.debug("pair %d failed", entry.index, exc_info=True)
            return PairResult(entry, "failed", message)
        record = {"signature": self._signature(entry), "outputs": outputs, "summary": summary}
        atomic_write_text(folder / RECORD_NAME, json.dumps(record, indent=2))
        return PairResult(entry, "done", "", summary)

    def main(self) -> List[PairResult]:
        """``run()`` for the command line: exits with status 1 and one line when any pair failed, unless
        ``allow_failures``."""
        results = self.run()
        failed = sum(r.status == "failed" for r in results)
        if failed and not self.allow_failures:
            raise UsageExit(
                f"batch QA: {failed} of {len(results)} pairs failed (reasons in "
                f"{self.output_dir / REPORT_NAME}); --allow_failures True keeps exit status 0"
            )
        return results

    def shard(self, entries: List[PairEntry]) -> List[PairEntry]:
        """This process's pairs (all of them in a single process)."""
        if self.world_size == 1:
            return list(entries)
        sampler = DistributedSampler(
            entries, even_divisible=False, num_replicas=self.world_size, rank=self.rank, shuffle=False
        )
        return [entries[i] for i in sampler]

    def run(self) -> List[PairResult]:
        """Run this process's share of the list; rank 0 gathers every result and writes the summary and report."""
        entries = read_pair_list(self.pairs_file)
        mine = self.shard(entries)
        logger.info(
            "batch QA: %d of %d pairs in this process (rank %d of %d)",
            len(mine),
            len(entries),
            self.rank,
            self.world_size,
        )
        results = []
        bar = tqdm(mine, desc=f"pairs (rank {self.rank})", unit="pair", disable=not self.progress)
        for entry in bar:
            result = self.run_pair(entry)
            (logger.error if result.status == "failed" else logger.info)("%s", result.report_line())
            results.append(result)
            bar.set_postfix(failed=sum(r.status == "failed" for r in results))
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: List[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, results)
            results = [r for part in gathered for r in part]
        results.sort(key=lambda r: r.entry.index)
        if self.rank == 0:
            self.write_summary(results)
        return results

    def write_summary(self, results: Sequence[PairResult]) -> None:
        """``batch_summary.csv`` (one row per pair) and ``batch_report.txt`` (one line per pair), atomically."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(SUMMARY_COLUMNS), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for result in results:
            entry = result.entry
            row = {key: "" for key in SUMMARY_COLUMNS}
            row.update(
                index=entry.index,
                name=entry.name,
                status=result.status,
                fixed=entry.fixed,
                moving=entry.moving,
                landmarks=entry.landmarks,
                output_dir=str(self.output_dir / entry.name),
                message=result.message,
            )
            row.update({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in result.summary.items()})
            writer.writerow(row)
        atomic_write_text(self.output_dir / SUMMARY_NAME, buffer.getvalue())
        counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
        lines = [r.report_line() for r in results]
        lines.append(", ".join(f"{n} {s}" for s, n in counts.items()) + f" of {len(results)} pairs")
        atomic_write_text(self.output_dir / REPORT_NAME, "\n".join(lines) + "\n")
        logger.info(
            "batch QA: %s; wrote %s and %s", lines[-1], self.output_dir / SUMMARY_NAME, self.output_dir / REPORT_NAME
        )
