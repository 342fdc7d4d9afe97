"""Whole-image inference benchmark: a 256 mm cube at 1 mm cut from a real chest CT, fp32 and bf16.

Prints medians of: wall time (inference = pyramid + tiles + stitching; end to end = also reading, resampling, body
masks and writing the two NIfTI maps), process CPU time, peak RSS, achieved GFLOP/s and its ratio to the peak of a
plain Conv3d(32 -> 32, 3^3) measured in the same run in the fastest form this CPU offers (fp32, fp32 channels-last,
bf16 channels-last), and the fraction of in-mask voxels whose labels agree between bf16 and fp32. Each run is a
fresh subprocess, so its peak RSS is its own. Network FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``
on one tile (meta tensors) times the tiles run. Run from the repository root:

    python benchmarks/bench_inference.py --repeats 3 --scan <dataset_dir>/thorax_popi_like_00.nii.gz
"""

from __future__ import annotations

import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import fire
import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from scripts.data.image_io import load_pair, to_fixed_grid  # noqa: E402
from scripts.data.synthetic_pair import true_deformation  # noqa: E402
from scripts.inferers.misalignment_inferer import MisalignmentInferer, latent_size_for  # noqa: E402
from scripts.networks.misalignment_net import MisalignmentNet  # noqa: E402
from scripts.transforms.ct_masks import ct_masks  # noqa: E402
from scripts.utils.encoder_windows import level_window  # noqa: E402
from scripts.utils.precision import native_bfloat16  # noqa: E402

CHECKPOINT = REPO_ROOT / "models" / "model.pt"


def make_cube_pair(scan_path: str, folder: str, size_mm: int = 256, seed: int = 0) -> Dict[str, str]:
    """Fixed: ``size_mm``^3 at 1 mm centred on the lungs of ``scan_path`` (air outside the scan); moving: it warped
    by the sample pair's smooth respiratory + local deformation. Both int16 NIfTI in ``folder``."""
    scan = sitk.ReadImage(str(scan_path))
    body, lung = ct_masks(scan, str(scan_path))
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(lung)
    centre = np.asarray(stats.GetCentroid(1))
    reference = sitk.Image([size_mm] * 3, sitk.sitkInt16)
    reference.SetOrigin(tuple(centre - (size_mm - 1) / 2.0))
    fixed = sitk.Resample(sitk.Cast(scan, sitk.sitkFloat32), reference, sitk.Transform(), sitk.sitkBSpline, -1024.0)
    fixed = sitk.Cast(sitk.Clamp(fixed, lowerBound=-1024, upperBound=3071), sitk.sitkInt16)
    body, lung = (sitk.Resample(m, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0) for m in (body, lung))
    moving = sitk.Resample(fixed, fixed, true_deformation(fixed, body, lung, seed), sitk.sitkBSpline, -1024.0)
    paths = {"fixed": os.path.join(folder, "fixed.nii.gz"), "moving": os.path.join(folder, "moving.nii.gz")}
    sitk.WriteImage(fixed, paths["fixed"])
    sitk.WriteImage(moving, paths["moving"])
    return paths


def conv3d_peak(size: int = 64, repeats: int = 5) -> Dict[str, float]:
    """Median GFLOP/s of a plain Conv3d(32, 32, 3^3, padding 1) forward on ``[1, 32, size^3]`` in three forms, per
    wall-clock second and (``*_per_cpu_s``, robust to other processes on the machine) per process CPU second; bf16
    only where the CPU has it natively (elsewhere it is hundreds of times slower and never the peak)."""
    flops = 2 * 32 * 32 * 27 * size**3
    forms = {"fp32": (torch.float32, False), "fp32_channels_last": (torch.float32, True)}
    if native_bfloat16("cpu"):
        forms["bf16_channels_last"] = (torch.bfloat16, True)
    out = {}
    with torch.inference_mode():
        for name, (dtype, channels_last) in forms.items():
            conv = torch.nn.Conv3d(32, 32, 3, padding=1).eval().to(dtype)
            x = torch.randn(1, 32, size, size, size).to(dtype)
            if channels_last:
                conv = conv.to(memory_format=torch.channels_last_3d)
                x = x.contiguous(memory_format=torch.channels_last_3d)
            conv(x)
            walls, cpus = [], []
            for _ in range(repeats):
                wall, cpu = time.perf_counter(), time.process_time()
                conv(x)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            out[name] = flops / statistics.median(walls) / 1e9
            out[f"{name}_per_cpu_s"] = flops / statistics.median(cpus) / 1e9
    return out


def tile_flops(network: MisalignmentNet, latent: List[int]) -> Tuple[int, int]:
    """FLOPs of ``forward_tile`` for one latent tile: as the network defines them (counted on meta tensors), and as
    executed by the inferer, whose zero-state ConvLSTM step skips the hidden-state input and the forget gate."""
    meta = copy.deepcopy(network).to("meta")
    inputs = [torch.empty([1, 2] + [level_window(0, n, f)[1] for n in latent], device="meta") for f in meta.factors]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta.forward_tile(inputs)
    total = int(counter.get_total_flops())
    skipped = 0
    cell = getattr(network.decoder, "cell", None)
    if cell is not None:
        hidden, gates = cell.hidden_channels, cell.gates
        taps = int(np.prod(gates.kernel_size))
        skipped = (
            2
            * taps
            * int(np.prod(latent))
            * (gates.in_channels * 4 * hidden - (gates.in_channels - hidden) * 3 * hidden)
        )
    return total, total - skipped


def worker(fixed: str, moving: str, precision: str, tile_size: int, threads: int, labels_out: str) -> None:
    """One timed run in this process; prints a JSON line."""
    torch.set_num_threads(threads)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    network = MisalignmentNet().eval()
    trained = CHECKPOINT.is_file()
    if trained:
        network.load_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    pair = load_pair(fixed, moving)
    loaded = time.perf_counter()
    peak_s, peak_cpu_s = time.perf_counter(), time.process_time()
    peak = conv3d_peak()  # measured right before the inference it is compared with ...
    peak_s, peak_cpu_s = time.perf_counter() - peak_s, time.process_time() - peak_cpu_s
    inferer = MisalignmentInferer(tile_size=tile_size, precision=precision, with_steps=True, progress=False)
    image = torch.from_numpy(pair.image)[None]
    mask = torch.from_numpy(pair.mask)
    infer_wall, infer_cpu = time.perf_counter(), time.process_time()
    out = inferer(image, network, mask=mask)
    infer_wall, infer_cpu = time.perf_counter() - infer_wall, time.process_time() - infer_cpu
    after = conv3d_peak()  # and right after: the better of the two is the peak (other processes may load the CPU)
    peak = {form: max(value, after[form]) for form, value in peak.items()}
    probabilities = out["probabilities"][0].numpy()
    written = time.perf_counter()
    probs, labels, _ = to_fixed_grid(probabilities, pair.mask, pair.grid, pair.fixed_grid)
    with tempfile.TemporaryDirectory() as folder:
        for name, values in (("p.nii.gz", probs), ("l.nii.gz", labels)):
            sitk.WriteImage(pair.fixed_grid.image(values), os.path.join(folder, name))
    written = time.perf_counter() - written
    starts, block = inferer.plan(mask, network.halo)
    latent = [latent_size_for(n, network.halo) for n in block]
    flops, executed = (count * len(starts) for count in tile_flops(network, latent))
    np.save(labels_out, np.where(pair.mask, probabilities.argmax(axis=0), 255).astype(np.uint8))
    np.save(labels_out.replace(".npy", "_p.npy"), probabilities[:, pair.mask].astype(np.float16))
    best = max((k for k in peak if not k.endswith("_per_cpu_s")), key=peak.get)
    best_cpu = max((k for k in peak if k.endswith("_per_cpu_s")), key=peak.get)
    result = {
        "precision": precision,
        "inference_s": infer_wall,
        "inference_cpu_s": infer_cpu,
        "end_to_end_s": time.perf_counter() - start_wall - 2 * peak_s,
        "end_to_end_cpu_s": time.process_time() - start_cpu - 2 * peak_cpu_s,
        "load_s": loaded - start_wall,
        "write_s": written,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "tiles": len(starts),
        "latent_tile": latent,
        "voxels": int(np.prod(pair.mask.shape)),
        "mask_voxels": int(pair.mask.sum()),
        "network_gflop": flops / 1e9,
        "executed_gflop": executed / 1e9,
        "gflops_achieved": flops / 1e9 / infer_wall,
        "conv3d_peak_gflops": peak,
        "conv3d_peak_form": best,
        "ratio_to_conv_peak": flops / 1e9 / infer_wall / peak[best],
        "gflop_per_cpu_s": flops / 1e9 / infer_cpu,
        "ratio_to_conv_peak_per_cpu_s": flops / 1e9 / infer_cpu / peak[best_cpu],
        "threads": torch.get_num_threads(),
        "trained_weights": trained,
        "load_average_1min": os.getloadavg()[0],
    }
    print("RESULT " + json.dumps(result), flush=True)


def main(
    scan: str,
    size_mm: int = 256,
    precisions: str = "float32,bfloat16",
    repeats: int = 3,
    tile_size: int = 97,
    threads: int = 2,
    json_out: str = "",
) -> dict:
    """Build the cube pair, run ``repeats`` fresh workers per precision (each measures the conv peak right before
    its inference), compare bf16 with fp32 labels, print medians."""
    torch.set_num_threads(threads)
    summary: dict = {"scan": str(scan), "size_mm": size_mm, "threads": threads, "tile_size": tile_size}
    with tempfile.TemporaryDirectory() as folder:
        paths = make_cube_pair(scan, folder, size_mm)
        runs: Dict[str, List[dict]] = {}
        for repeat in range(repeats):
            for precision in precisions.split(","):
                labels = os.path.join(folder, f"labels_{precision}.npy")
                command = [
                    sys.executable,
                    __file__,
                    "worker",
                    paths["fixed"],
                    paths["moving"],
                    precision,
                    str(tile_size),
                    str(threads),
                    labels,
                ]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    raise RuntimeError(f"worker failed ({precision}):\n{done.stderr[-3000:]}")
                run = json.loads(lines[-1][len("RESULT ") :])
                runs.setdefault(precision, []).append(run)
                print(f"run {repeat + 1}/{repeats} {precision}: {json.dumps(run)}", flush=True)
        if {"float32", "bfloat16"} <= set(runs):
            a = np.load(os.path.join(folder, "labels_float32.npy"))
            b = np.load(os.path.join(folder, "labels_bfloat16.npy"))
            inside = a != 255
            summary["label_agreement_bf16_vs_fp32"] = float((a[inside] == b[inside]).mean())
            pa = np.load(os.path.join(folder, "labels_float32_p.npy")).astype(np.float32)
            pb = np.load(os.path.join(folder, "labels_bfloat16_p.npy")).astype(np.float32)
            difference = np.abs(pa - pb)
            summary["probability_abs_diff_bf16_vs_fp32"] = {
                "max": float(difference.max()),
                "mean": float(difference.mean()),
            }
    for precision, items in runs.items():
        summary[precision] = {
            k: statistics.median(r[k] for r in items) for k in items[0] if isinstance(items[0][k], (int, float))
        }
        summary[precision]["latent_tile"] = items[0]["latent_tile"]
        summary[precision]["conv3d_peak_gflops"] = {
            form: statistics.median(r["conv3d_peak_gflops"][form] for r in items)
            for form in items[0]["conv3d_peak_gflops"]
        }
    print(json.dumps(summary, indent=2))
    if json_out:
        Path(json_out).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), sys.argv[7])
    else:
        fire.Fire(lambda **kwargs: main(**kwargs) and None)
