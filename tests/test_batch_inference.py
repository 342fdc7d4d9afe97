"""Batch QA (configs/batch_inference.json, scripts.workflows.batch_inference): a list holding one pair twice plus
bad entries runs, skips complete outputs on a second run, re-runs a pair whose output was damaged, reports each bad
entry in one line; the bundle command with both methods; torchrun with 2 CPU processes on gloo shards the list."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.workflows.batch_inference import REPORT_NAME, SUMMARY_NAME, BatchInference, read_pair_list
from tests.helpers.synthetic_pair import write_pair

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_NETWORK = {  # untrained tiny ConvLSTM, one 49^3 tile, float32: the content does not matter here
    "method": "network",
    "checkpoint": "/nonexistent/model.pt",
    "hidden_channels": 4,
    "tile_size": 49,
    "precision": "float32",
    "require_lung": False,  # the phantom's lungs hold a few millilitres, below a real crop's minimum
}


def _pair_list(folder: Path) -> Path:
    """A CSV with the synthetic pair twice (the second with a relative path), a truncated moving image and a
    missing file."""
    paths = write_pair(folder / "data")
    truncated = folder / "data" / "truncated.nii.gz"
    truncated.write_bytes(paths["moving"].read_bytes()[:600])
    rows = [
        [paths["fixed"], paths["moving"], paths["landmarks"]],
        ["data/fixed.nii.gz", "data/moving.nii.gz", "data/landmarks.csv"],
        [paths["fixed"], truncated, ""],
        [paths["fixed"], folder / "data" / "absent.nii.gz", ""],
    ]
    path = folder / "pairs.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["fixed", "moving", "landmarks"], *rows])
    return path


def _summary(folder: Path) -> list[dict]:
    with (folder / SUMMARY_NAME).open(newline="") as f:
        return list(csv.DictReader(f))


def test_pair_list_reading(tmp_path):
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps({"pairs": [{"fixed": "a.nii.gz", "moving": "b.nii.gz"}, {"fixed": "a.nii.gz"}]}))
    entries = read_pair_list(pairs)
    assert [e.name for e in entries] == ["0000_b", "0001_pair"]
    assert entries[0].fixed == str((tmp_path / "a.nii.gz").resolve()) and not entries[0].problem
    assert "row 2" in entries[1].problem and "no moving path" in entries[1].problem
    (tmp_path / "bad.csv").write_text("fixed,image\na,b\n")
    with pytest.raises(ValueError, match=r"bad.csv: missing column\(s\) \['moving'\]"):
        read_pair_list(tmp_path / "bad.csv")


@pytest.mark.slow
def test_batch_runs_skips_complete_pairs_and_reports_bad_ones(tmp_path):
    pairs = _pair_list(tmp_path)
    out = tmp_path / "out"
    batch = BatchInference(pairs, out, REPO_ROOT, overrides=TINY_NETWORK, progress=False)
    results = batch.run()
    assert [r.status for r in results] == ["done", "done", "failed", "failed"]

    report = (out / REPORT_NAME).read_text().splitlines()
    assert len(report) == 5 and report[-1] == "2 done, 0 skipped, 2 failed of 4 pairs"
    assert "truncated.nii.gz: truncated or corrupt gzip stream" in report[2]
    assert "absent.nii.gz: file not found" in report[3]
    rows = _summary(out)
    assert [row["status"] for row in rows] == ["done", "done", "failed", "failed"]
    for row in rows[:2]:
        fractions = [float(row[f"fraction_{name}"]) for name in ("correct", "poor", "wrong")]
        assert abs(sum(fractions) - 1) < 1e-6 and int(row["voxels_in_mask"]) > 0
        assert row["method"] == "network" and row["mean_error_mm"] == ""  # the network gives no error map
        assert int(row["landmarks_n"]) == 5 and 0 <= float(row["landmark_accuracy"]) <= 1
    assert rows[0]["fraction_correct"] == rows[1]["fraction_correct"]  # the same pair twice, same map
    assert not (out / "0002_truncated").exists() or not any((out / "0002_truncated").iterdir())
    first_map = out / "0000_moving" / "moving_misalignment.nii.gz"
    written = first_map.stat().st_mtime_ns

    results = BatchInference(pairs, out, REPO_ROOT, overrides=TINY_NETWORK, progress=False).run()
    assert [r.status for r in results] == ["skipped", "skipped", "failed", "failed"]
    assert first_map.stat().st_mtime_ns == written
    assert [row["fraction_wrong"] for row in _summary(out)[:2]] == [row["fraction_wrong"] for row in rows[:2]]

    first_map.write_bytes(first_map.read_bytes()[: first_map.stat().st_size // 2])  # damaged: that pair runs again
    results = BatchInference(pairs, out, REPO_ROOT, overrides=TINY_NETWORK, progress=False).run()
    assert [r.status for r in results] == ["done", "skipped", "failed", "failed"]
    changed = dict(TINY_NETWORK, tile_size=65)  # other settings: no longer the same outputs
    assert [r.status for r in BatchInference(pairs, out, REPO_ROOT, overrides=changed, progress=False).run()][:2] == [
        "done",
        "done",
    ]


@pytest.mark.slow
def test_batch_command_with_the_reregistration_method(tmp_path):
    """The bundle command on a JSON list (the pair once plus one bad entry), the re-registration method: its mean
    expected error and the error map's landmark error appear in the summary."""
    paths = write_pair(tmp_path / "data")
    pairs = tmp_path / "pairs.json"
    bad = {"fixed": str(paths["fixed"]), "moving": str(paths["landmarks"])}  # a CSV given as the moving image
    pairs.write_text(json.dumps([{k: str(v) for k, v in paths.items()}, bad]))
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/batch_inference.json",
        "--pairs_file",
        str(pairs),
        "--output_dir",
        str(out),
        "--progress",
        "False",
        "--inference_overrides#method",
        "reregistration",
        "--inference_overrides#calibration_file",
        "''",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]  # a pair failed: scripts see it
    assert result.stderr.strip().splitlines()[-1].startswith("batch QA: 1 of 2 pairs failed")
    assert "Traceback" not in result.stderr
    rows = _summary(out)
    assert [row["status"] for row in rows] == ["done", "failed"]
    assert rows[0]["method"] == "reregistration" and float(rows[0]["mean_error_mm"]) >= 0
    assert float(rows[0]["landmark_error_mae_mm"]) >= 0
    assert (out / "0000_moving" / "moving_error_mm.nii.gz").is_file()
    assert "landmarks.csv" in rows[1]["message"] and "cannot be read" in rows[1]["message"]
    again = subprocess.run(
        command + ["--allow_failures", "True"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert [row["status"] for row in _summary(out)] == ["skipped", "failed"]
    assert (out / REPORT_NAME).read_text().splitlines()[-1] == "0 done, 1 skipped, 1 failed of 2 pairs"


@pytest.mark.slow
def test_torchrun_two_gloo_processes_share_the_list(tmp_path):
    pairs = _pair_list(tmp_path)
    out = tmp_path / "out"
    configs = "['configs/batch_inference.json','configs/multi_gpu_batch.json']"
    overrides = [arg for key, value in TINY_NETWORK.items() for arg in (f"--inference_overrides#{key}", str(value))]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        configs,
        "--pairs_file",
        str(pairs),
        "--output_dir",
        str(out),
        "--progress",
        "False",
        "--allow_failures",
        "True",
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = _summary(out)
    assert [row["index"] for row in rows] == ["0", "1", "2", "3"]  # every pair once, gathered on rank 0
    assert [row["status"] for row in rows] == ["done", "done", "failed", "failed"]
    assert {row["rank"] for row in rows[:2]} == {"0", "1"}  # DistributedSampler: pairs 0, 2 on rank 0; 1, 3 on 1
    assert (out / REPORT_NAME).read_text().splitlines()[-1] == "2 done, 0 skipped, 2 failed of 4 pairs"
