"""Benchmark: one artificial chest-CT pair at 1 mm (DVF + warp + sponge + noise) and patch throughput.

    python benchmarks/bench_artificial_pair.py --scan <dataset_dir>/thorax_popi_like_00.nii.gz --repeats 3

Prints the median over ``repeats`` of every stage (seconds) and patches/s of misalignment-patch extraction with
hierarchical labels. Uses all the threads torch/SimpleITK see (set OMP_NUM_THREADS / taskset to pin cores).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import fire
import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.data.patch_sampling import (  # noqa: E402
    BalancedCentreSampler,
    candidate_centres,
    magnitude_at,
    misalignment_sample,
    pair_pyramid,
    regnet_sample,
)
from scripts.data.prepare_data import resample_isotropic  # noqa: E402
from scripts.networks.hierarchical_labels import hierarchical_labels  # noqa: E402
from scripts.transforms.artificial_dvf import (  # noqa: E402
    DVF_TYPES,
    coarse_arrays,
    draw_dvf,
    dvf_settings,
    dvf_to_sitk,
)
from scripts.transforms.artificial_intensity import (  # noqa: E402
    add_noise,
    dense_jacobian,
    sponge_model,
    warp_image,
    warp_mask,
)
from scripts.transforms.ct_masks import ct_masks  # noqa: E402


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main(
    scan: str,
    repeats: int = 3,
    max_deformation_mm: float = 10.0,
    patches: int = 40,
    types=DVF_TYPES,
) -> None:
    """Run the benchmark and print medians."""
    print(f"threads: torch {torch.get_num_threads()}, SimpleITK {sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}")
    raw = sitk.ReadImage(scan, sitk.sitkFloat32)
    image, t_resample = _timed(resample_isotropic, raw)
    (body, lung), t_masks = _timed(ct_masks, image, scan)
    print(
        f"{Path(scan).name}: 1 mm size {image.GetSize()} ({np.prod(image.GetSize()) / 1e6:.1f} M voxels); "
        f"once per scan: resample {t_resample:.1f} s, masks {t_masks:.1f} s"
    )
    settings = dvf_settings(max_deformation_mm)
    (coarse_image, coarse_body, coarse_lung, spacing), t_coarse = _timed(coarse_arrays, image, body, lung)
    print(f"once per scan: coarse DVF-grid arrays {t_coarse:.1f} s")
    times: dict[str, list[float]] = {}
    rng = np.random.RandomState(0)
    for dvf_type in [types] if isinstance(types, str) else types:
        for _ in range(repeats):
            row = {}
            dvf, row["dvf"] = _timed(
                draw_dvf, rng, dvf_type, 3, coarse_image, coarse_body, coarse_lung, spacing, settings
            )
            dvf_image = dvf_to_sitk(dvf, image)
            warped, row["warp (cubic)"] = _timed(warp_image, image, dvf_image)
            warped_body, row["warp body (nearest)"] = _timed(warp_mask, body, dvf_image)
            array = sitk.GetArrayFromImage(warped)
            inside = sitk.GetArrayViewFromImage(warped_body) > 0
            jac, row["jacobian"] = _timed(dense_jacobian, dvf_image, array.shape, 2)
            array, row["sponge"] = _timed(sponge_model, array, jac, inside, 1.0)
            array, row["noise"] = _timed(add_noise, rng, array, inside, 5.0)
            row["total"] = sum(row.values())
            for key, value in row.items():
                times.setdefault(f"{dvf_type:18s} {key}", []).append(value)
    print(f"median over {repeats} repeats (s):")
    for key, values in times.items():
        print(f"  {key:40s} {statistics.median(values):6.2f}")
    totals = [statistics.median(v) for k, v in times.items() if k.endswith("total")]
    print(f"pair total, median over types: {statistics.median(totals):.2f} s")

    fixed = sitk.GetArrayFromImage(image)
    pyramid, t_pyramid = _timed(pair_pyramid, fixed, array)
    print(f"pair pyramid (4/2/1 mm, once per loaded pair): {t_pyramid:.2f} s")
    centres = candidate_centres(sitk.GetArrayViewFromImage(body) > 0, 12)
    sampler = BalancedCentreSampler(centres, magnitude_at(dvf, 2, centres))
    picked, _ = sampler.sample(np.random.RandomState(0), patches)
    start = time.perf_counter()
    for centre in picked:
        sample = misalignment_sample(pyramid, dvf, 2, centre)
        hierarchical_labels(sample["magnitude"][0], "6-3-1")
    rate = patches / (time.perf_counter() - start)
    start = time.perf_counter()
    for centre in picked:
        regnet_sample(pyramid, dvf, 2, centre, 2)
    regnet_rate = patches / (time.perf_counter() - start)
    print(
        f"misalignment patches (3 x 2 x 101^3 + |u| 25^3 + labels): {rate:.0f} patches/s; "
        f"RegNet patches (2 x 101^3 + DVF 21^3): {regnet_rate:.0f} patches/s (one process)"
    )


if __name__ == "__main__":
    fire.Fire(main)
