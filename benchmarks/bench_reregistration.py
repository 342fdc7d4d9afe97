"""Speed and memory of ``--method reregistration``: the sample pair and a 256 mm chest cube at 1 mm, registered on
the pair's own 1 mm grid (the default) and on a 2 mm working grid (the faster reference, measured in the same run;
the shipped calibration is fitted for the default, so the 2 mm run thresholds |r|).

Each run is the bundle's own command in a fresh subprocess (``python -m monai.bundle run ... --method
reregistration``), so wall time includes reading, resampling, the registration, the calibration and writing every
output, and the peak RSS (``os.wait4``) is the run's own. Prints medians over ``--repeats`` runs, the ratio of the
native run to the 2 mm run, and what the working grid changes in accuracy: on the sample pair the landmark mean F1
and the MAE of ``error_mm`` against the true TRE; on the cube (moving = fixed warped by a known deformation) the MAE
of ``error_mm`` against the true misalignment in the lungs and the fraction of voxels whose class agrees. Run from
the repository root (pause any training first; 2 cores are easily shared)::

    python benchmarks/bench_reregistration.py --repeats 3
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire
import numpy as np
import SimpleITK as sitk

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inference import DEFAULT_SCAN, make_cube_pair  # noqa: E402

from scripts.data.synthetic_pair import true_deformation  # noqa: E402
from scripts.evaluation.landmark_metrics import classification_scores  # noqa: E402
from scripts.transforms.ct_masks import ct_masks  # noqa: E402
from scripts.utils.constants import CLASS_THRESHOLDS_MM  # noqa: E402

GRIDS = {"2 mm working grid (reference)": 2.0, "native 1 mm (default)": 0.0}


def run_once(fixed: str, moving: str, output_dir: str, working_spacing_mm: float, landmarks: str = "") -> dict:
    """One re-registration run of the bundle in a subprocess: wall seconds and peak RSS (GB) of that process."""
    overrides = ["--method", "reregistration", "--working_spacing_mm", str(working_spacing_mm)]
    return run_bundle(fixed, moving, output_dir, landmarks, overrides)


def run_bundle(fixed: str, moving: str, output_dir: str, landmarks: str, overrides: list[str]) -> dict:
    """``python -m monai.bundle run`` of the inference config with ``overrides`` in a subprocess: wall seconds and
    peak RSS (GB) of that process."""
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
               "--fixed_image", fixed, "--moving_image", moving, "--landmarks", landmarks, "--output_dir", output_dir,
               "--progress", "false", *overrides]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"run failed: {' '.join(command)}\n{stderr[-2000:]}")
    return {"wall_s": wall, "peak_rss_gb": usage.ru_maxrss / 1024**2}


def landmark_accuracy(csv_path: Path) -> dict:
    """Mean F1 and kappa of ``pred`` and MAE of ``error_mm`` against the ``tre`` column (nan where the method writes no
    ``error_mm``: the image-only network)."""
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    tre = np.array([float(r["tre"]) for r in rows])
    scores = classification_scores(np.digitize(tre, CLASS_THRESHOLDS_MM), np.array([int(r["pred"]) for r in rows]))
    error = np.array([float(r.get("error_mm", "nan")) for r in rows])
    return {"mean_f1": scores["mean_f1"], "kappa": scores["kappa"], "error_mae_mm": float(np.abs(error - tre).mean())}


def cube_truth(fixed_path: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The true misalignment magnitude (mm) of the cube pair at every voxel and its lung mask."""
    fixed = sitk.ReadImage(fixed_path)
    body, lung = ct_masks(fixed, fixed_path)
    transform = true_deformation(fixed, body, lung, seed)
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(),
                                              fixed.GetSpacing(), fixed.GetDirection())  # fmt: skip
    return np.linalg.norm(sitk.GetArrayFromImage(field), axis=-1), sitk.GetArrayFromImage(lung) > 0


def main(repeats: int = 3, scan: str = str(DEFAULT_SCAN), cube: bool = True) -> dict:
    """Run every case and grid ``repeats`` times; print and return the medians."""
    results: dict = {"load_average_at_start": [round(v, 2) for v in os.getloadavg()], "cases": {}}
    with tempfile.TemporaryDirectory(prefix="bench_rereg_") as tmp:
        cases = {
            "sample pair": {
                "fixed": str(REPO_ROOT / "sample_data" / "fixed.nii.gz"),
                "moving": str(REPO_ROOT / "sample_data" / "moving.nii.gz"),
                "landmarks": str(REPO_ROOT / "sample_data" / "landmarks.csv"),
            }
        }
        if cube and Path(scan).is_file():
            cases["256 mm cube at 1 mm"] = {**make_cube_pair(scan, tmp), "landmarks": ""}
        for case, paths in cases.items():
            rows = {}
            labels = {}
            for grid, spacing in GRIDS.items():
                out = Path(tmp) / f"{case}_{spacing}".replace(" ", "_")
                runs = [run_once(paths["fixed"], paths["moving"], str(out), spacing, paths["landmarks"])
                        for _ in range(repeats)]  # fmt: skip
                row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                stem = Path(paths["moving"]).name.split(".")[0]
                if paths["landmarks"]:
                    row.update(landmark_accuracy(out / f"{stem}_landmarks.csv"))
                else:
                    truth, lung = cube_truth(paths["fixed"])
                    error = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{stem}_error_mm.nii.gz")))
                    row["lung_error_mae_mm"] = float(np.abs(error[lung] - truth[lung]).mean())
                    labels[grid] = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{stem}_misalignment.nii.gz")))
                    row["lung_mean_f1"] = classification_scores(
                        np.digitize(truth[lung], CLASS_THRESHOLDS_MM), labels[grid][lung].astype(int)
                    )["mean_f1"]
                rows[grid] = row
            fast, reference = (rows[g] for g in GRIDS)
            summary = {"grids": rows, "native_over_2mm_wall": reference["wall_s"] / fast["wall_s"]}
            if labels:
                a, b = labels.values()
                summary["label_agreement_2mm_vs_native"] = float((a == b).mean())
            results["cases"][case] = summary
    for case, summary in results["cases"].items():
        print(f"\n{case} (medians of {repeats} runs; load average at start {results['load_average_at_start']})")
        for grid, row in summary["grids"].items():
            print(f"  {grid:26s} " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
        print(f"  native / 2 mm wall time: {summary['native_over_2mm_wall']:.2f}")
        if "label_agreement_2mm_vs_native" in summary:
            print(f"  voxel labels equal (2 mm vs native): {summary['label_agreement_2mm_vs_native']:.3f}")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
