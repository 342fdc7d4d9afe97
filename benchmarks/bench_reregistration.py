"""Speed and memory of the default method (``--method reregistration``) against elastix's own affine + B-spline
registration of the same pair on the same grid, measured in the same run.

Cases: the sample pair (2 mm, 60 landmarks) and a one-lung crop as users cut them for registration (115 x 157 x 129
voxels of 1.37 x 1.37 x 2.5 mm through the lungs of a shared training scan; moving = fixed warped by a known smooth
deformation). Each run is a fresh subprocess: the bundle's own command (``python -m monai.bundle run ...``: reading,
the region, the registration, the calibration and every output), and the reference, elastix's default "affine" and
"bspline" parameter maps (``itk.ParameterObject.GetDefaultParameterMap``; the B-spline map without its bending-energy
penalty, see ``elastix_defaults``) on the two files as they are, registration only. Prints the medians over
``--repeats`` runs of wall time and peak RSS (``VmHWM``), the ratio bundle / elastix, and the bundle's accuracy
(landmark mean F1 and kappa on the sample pair; on the crop the MAE of ``error_mm`` against the true misalignment in
the lungs). Run from the repository root with nothing else running::

    python benchmarks/bench_reregistration.py --repeats 3 --scan <dataset_dir>/thorax_lidc_idri_0002.nii.gz
"""

from __future__ import annotations

import ast
import json
import os
import re
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

from scripts.data.landmark_csv import read_landmarks  # noqa: E402
from scripts.data.landmarks import assessed_rows  # noqa: E402
from scripts.data.synthetic_pair import true_deformation  # noqa: E402
from scripts.evaluation.landmark_metrics import classification_scores  # noqa: E402
from scripts.transforms.ct_masks import ct_masks  # noqa: E402
from scripts.utils.constants import CLASS_THRESHOLDS_MM  # noqa: E402

CROP_SPACING_MM = (1.37, 1.37, 2.5)
CROP_SIZE = (115, 157, 129)  # x, y, z voxels: one lung, cut through it on every side but the top


def measure(command: list[str], cwd: Path = REPO_ROOT) -> dict:
    """Run ``command`` in a subprocess (from the repository root): wall seconds and peak RSS (GB) of that process,
    its ``VmHWM`` polled every 50 ms (``os.wait4``'s ``ru_maxrss`` would count this process's own memory, which the
    child inherits at fork), and the seconds its log gives for the re-registration, the views and each view."""
    peak_kb = 0
    with tempfile.TemporaryFile(mode="w+") as errors:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, stdout=errors, stderr=subprocess.STDOUT, text=True)
        while process.poll() is None:
            peak_kb = max(peak_kb, _high_water_kb(process.pid))
            time.sleep(0.05)
        wall = time.perf_counter() - start
        if process.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"run failed: {' '.join(command)}\n{errors.read()[-2000:]}")
        errors.seek(0)
        log = errors.read()
    out = {"wall_s": wall, "peak_rss_gb": peak_kb / 1024**2}
    for key, pattern in (("reregistration_s", r"re-registered in ([0-9.]+) s"), ("views_s", r"views in ([0-9.]+) s")):
        found = re.findall(pattern, log)
        if found:
            out[key] = float(found[-1])
    per_view = re.findall(r"views in [0-9.]+ s \((\{[^}]*\})\)", log)  # compute_views logs each view's seconds
    if per_view:
        out.update({f"view_{name}_s": float(v) for name, v in ast.literal_eval(per_view[-1]).items()})
    return out


def _high_water_kb(pid: int) -> int:
    """``VmHWM`` (peak resident set, kB) of a running process, 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_bundle(fixed: str, moving: str, output_dir: str, landmarks: str, overrides: list[str] = ()) -> dict:
    """``python -m monai.bundle run`` of the inference config with ``overrides``: wall seconds and peak RSS (GB)."""
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.json",
        "--fixed_image",
        fixed,
        "--moving_image",
        moving,
        "--landmarks",
        landmarks,
        "--output_dir",
        output_dir,
        "--progress",
        "false",
        *overrides,
    ]
    return measure(command)


def elastix_defaults(fixed: str, moving: str, threads: int = 2) -> None:
    """elastix's default affine and B-spline parameter maps on the two files as they are (the reference run), the
    B-spline map without its bending-energy penalty: with it itk-elastix 0.25.4 crashes (segmentation fault) while
    sampling gradients for the step-size estimate on the sample pair."""
    import itk

    parameters = itk.ParameterObject.New()
    for transform in ("affine", "bspline"):
        parameter_map = parameters.GetDefaultParameterMap(transform)
        if transform == "bspline":
            parameter_map["Registration"] = ("MultiResolutionRegistration",)
            parameter_map["Metric"] = ("AdvancedMattesMutualInformation",)
            for key in ("Metric0Weight", "Metric1Weight"):
                del parameter_map[key]
        parameters.AddParameterMap(parameter_map)
    parameters.SetParameter("WriteResultImage", "false")
    images = [itk.imread(path, itk.F) for path in (fixed, moving)]
    itk.elastix_registration_method(
        *images, parameter_object=parameters, number_of_threads=threads, log_to_console=False
    )


def run_elastix(fixed: str, moving: str) -> dict:
    """``elastix_defaults`` in a subprocess: wall seconds and peak RSS (GB)."""
    code = "import sys; from bench_reregistration import elastix_defaults; elastix_defaults(*sys.argv[1:])"
    return measure([sys.executable, "-c", code, fixed, moving], cwd=Path(__file__).resolve().parent)


def landmark_accuracy(csv_path: Path) -> dict:
    """Mean F1 and kappa of ``pred`` against the ``tre`` column over the assessed landmarks, and how many were not
    assessed; MAE of ``error_mm`` (nan where the method writes none: the image-only network)."""
    table = read_landmarks(csv_path)
    keep = assessed_rows(table)
    table = table.rows(keep)
    tre = table.float_columns(["tre"])[:, 0]
    pred = table.float_columns(["pred"])[:, 0].astype(int)
    scores = classification_scores(np.digitize(tre, CLASS_THRESHOLDS_MM), pred)
    error = table.float_columns(["error_mm"])[:, 0] if "error_mm" in table.values else np.full_like(tre, np.nan)
    return {
        "mean_f1": scores["mean_f1"],
        "kappa": scores["kappa"],
        "error_mae_mm": float(np.abs(error - tre).mean()),
        "unassessed": int((~keep).sum()),
    }


def make_crop_pair(scan_path: str, folder: str, seed: int = 0) -> dict[str, str]:
    """A one-lung crop of ``scan_path`` at 1.37 x 1.37 x 2.5 mm, cut through the lung, and it warped by a known smooth
    deformation (``true_deformation``); int16 NIfTI in ``folder``."""
    scan = sitk.ReadImage(str(scan_path), sitk.sitkFloat32)
    _, lung = ct_masks(scan, str(scan_path))
    size = [int(round(n * s / t)) for n, s, t in zip(scan.GetSize(), scan.GetSpacing(), CROP_SPACING_MM)]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(CROP_SPACING_MM)
    grid.SetOrigin(scan.GetOrigin())
    grid.SetDirection(scan.GetDirection())
    image = sitk.Resample(scan, grid, sitk.Transform(), sitk.sitkLinear, -1024.0)
    lung = sitk.Resample(lung, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    found = np.argwhere(sitk.GetArrayViewFromImage(lung) > 0)  # (z, y, x)
    z1 = int(found[:, 0].max())
    right = found[found[:, 2] < np.median(found[:, 2])]  # the lung on the image's left half: the patient's right
    centre_x, centre_y = (int(np.median(right[:, k])) for k in (2, 1))
    start = [max(0, centre_x - CROP_SIZE[0] // 2), max(0, centre_y - CROP_SIZE[1] // 2), max(0, z1 + 3 - CROP_SIZE[2])]
    box = [slice(s, s + n) for s, n in zip(start, CROP_SIZE)]
    fixed, lung = (im[box[0], box[1], box[2]] for im in (image, lung))
    body, lung = ct_masks(fixed, "crop")
    moving = sitk.Resample(fixed, fixed, true_deformation(fixed, body, lung, seed), sitk.sitkBSpline, -1024.0)
    paths = {"fixed": os.path.join(folder, "fixed.nii.gz"), "moving": os.path.join(folder, "moving.nii.gz")}
    for image, path in ((fixed, paths["fixed"]), (moving, paths["moving"])):
        sitk.WriteImage(sitk.Cast(sitk.Clamp(image, sitk.sitkFloat32, -1024, 3071), sitk.sitkInt16), path)
    return paths


def crop_truth(fixed_path: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The true misalignment magnitude (mm) of the crop pair at every voxel and its lung mask."""
    fixed = sitk.ReadImage(fixed_path, sitk.sitkFloat32)
    body, lung = ct_masks(fixed, fixed_path)
    transform = true_deformation(fixed, body, lung, seed)
    field = sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection()
    )
    return np.linalg.norm(sitk.GetArrayFromImage(field), axis=-1), sitk.GetArrayFromImage(lung) > 0


def main(repeats: int = 3, scan: str = "", methods: str = "reregistration,multiview") -> dict:
    """Run every case ``repeats`` times with the bundle (each of ``methods``) and with elastix's defaults; print and
    return the medians. ``scan``: a training scan to crop for the one-lung case
    (``<dataset_dir>/thorax_lidc_idri_0002.nii.gz``); without it only the sample pair is timed."""
    results: dict = {"load_average_at_start": [round(v, 2) for v in os.getloadavg()], "cases": {}}
    with tempfile.TemporaryDirectory(prefix="bench_rereg_") as tmp:
        cases = {
            "sample pair (151 x 109 x 154, 2 mm)": {
                "fixed": str(REPO_ROOT / "sample_data" / "fixed.nii.gz"),
                "moving": str(REPO_ROOT / "sample_data" / "moving.nii.gz"),
                "landmarks": str(REPO_ROOT / "sample_data" / "landmarks.csv"),
            }
        }
        if Path(scan).is_file():
            crop = {**make_crop_pair(scan, tmp), "landmarks": ""}
            cases["one-lung crop (115 x 157 x 129, 1.37 x 1.37 x 2.5 mm)"] = crop
        for index, (case, paths) in enumerate(cases.items()):
            out = Path(tmp) / f"case_{index}"
            names = [m.strip() for m in str(methods).split(",") if m.strip()]
            reference_name = "elastix default affine + B-spline"
            runs: dict[str, list] = {f"bundle --method {m}": [] for m in names}
            runs[reference_name] = []
            for _ in range(repeats):  # interleaved, so that a slow spell of the machine hits every row
                for method in names:
                    outputs = out / method
                    runs[f"bundle --method {method}"].append(
                        run_bundle(
                            paths["fixed"], paths["moving"], str(outputs), paths["landmarks"], ["--method", method]
                        )
                    )
                runs[reference_name].append(run_elastix(paths["fixed"], paths["moving"]))
            rows = {
                name: {k: statistics.median(r[k] for r in rs if k in r) for k in rs[0]} for name, rs in runs.items()
            }
            stem = Path(paths["moving"]).name.split(".")[0]
            for method in names:
                bundle = rows[f"bundle --method {method}"]
                if paths["landmarks"]:
                    bundle.update(landmark_accuracy(out / method / f"{stem}_landmarks.csv"))
                else:
                    truth, lung = crop_truth(paths["fixed"])
                    error = sitk.GetArrayFromImage(sitk.ReadImage(str(out / method / f"{stem}_error_mm.nii.gz")))
                    bundle["lung_error_mae_mm"] = float(np.nanmean(np.abs(error[lung] - truth[lung])))
                if "views_s" in bundle:
                    bundle["views_share"] = bundle["views_s"] / bundle["wall_s"]
            results["cases"][case] = {
                "runs": rows,
                "bundle_over_elastix_wall": {
                    m: rows[f"bundle --method {m}"]["wall_s"] / rows[reference_name]["wall_s"] for m in names
                },
            }
    for case, summary in results["cases"].items():
        print(f"\n{case} (medians of {repeats} runs; load average at start {results['load_average_at_start']})")
        for name, row in summary["runs"].items():
            print(f"  {name:36s} " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
        for method, ratio in summary["bundle_over_elastix_wall"].items():
            print(f"  bundle --method {method} / elastix wall time: {ratio:.2f}")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
