"""Benchmark: the body mask (with lungs a crop cut off) on a 1 mm grid, as the network's loading and the re-registration
of thin-slice scans compute it, against the same mask with the cut-lung thickness test on a finer grid.

    python benchmarks/bench_body_mask.py [--scan <dataset_dir>/thorax_lidc_idri_0001.nii.gz] [--repeats 3]

The scan (default: the shipped sample's fixed image) is resampled to 1 mm; the mask is timed on the whole scan and on
a crop to one lung with ``CUT_LUNG_GRID_MM`` as shipped and with ``--reference_grid_mm`` (1.5 mm: 1 mm voxels taken
one at a time). Prints medians over ``repeats``, their ratio, and the fraction of voxels on which the masks differ.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import fire
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.data.image_io import hu_on_grid, isotropic_grid, read_image  # noqa: E402
from scripts.transforms import ct_masks  # noqa: E402

SAMPLE_FIXED = Path(__file__).resolve().parents[1] / "sample_data" / "fixed.nii.gz"


def _median_seconds(hu: np.ndarray, grid_mm: float, repeats: int) -> tuple[float, np.ndarray]:
    """Median seconds of ``body_mask_array`` on ``hu`` (1 mm) with the cut-lung test on a ``grid_mm`` grid, and the
    mask."""
    seconds = []
    with mock.patch.object(ct_masks, "CUT_LUNG_GRID_MM", grid_mm):
        for _ in range(repeats):
            start = time.perf_counter()
            mask = ct_masks.body_mask_array(hu, (1.0, 1.0, 1.0))
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), mask


def main(scan: str = str(SAMPLE_FIXED), repeats: int = 3, reference_grid_mm: float = 1.5) -> dict:
    """Time the shipped body mask against the reference grid on the whole scan and on a one-lung crop at 1 mm.

    Args:
        scan: a chest CT that SimpleITK reads (HU).
        repeats: runs per setting; medians are printed.
        reference_grid_mm: ``CUT_LUNG_GRID_MM`` of the reference.

    Returns:
        Dict case -> shipped seconds, reference seconds, ratio, fraction of voxels that differ.
    """
    image = read_image(scan, "scan")
    hu = hu_on_grid(image, isotropic_grid(image, 1.0))  # the network's 1 mm grid
    body = ct_masks.body_mask_array(hu, (1.0, 1.0, 1.0))
    lung = ct_masks.lung_mask_array(hu, body, (1.0, 1.0, 1.0))
    x_lung = np.nonzero(lung.any(axis=(0, 1)))[0]
    one_lung = (slice(None), slice(None), slice(int(x_lung[0]), int(x_lung[0] + x_lung[-1]) // 2))
    print(
        f"{scan}: {hu.shape[::-1]} voxels at 1 mm; CUT_LUNG_GRID_MM {ct_masks.CUT_LUNG_GRID_MM} against "
        f"{reference_grid_mm}, medians of {repeats}"
    )
    out = {}
    for case, array in (("whole scan", hu), ("one lung", hu[one_lung])):
        shipped, shipped_mask = _median_seconds(array, ct_masks.CUT_LUNG_GRID_MM, repeats)
        reference, reference_mask = _median_seconds(array, reference_grid_mm, repeats)
        differ = float((shipped_mask != reference_mask).mean())
        out[case] = {"seconds": shipped, "reference_seconds": reference, "ratio": reference / shipped, "differ": differ}
        print(
            f"{case:10s} {shipped:6.2f} s against {reference:6.2f} s: {reference / shipped:4.2f}x faster, "
            f"{100 * differ:.3f} % of the voxels differ"
        )
    return out


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
