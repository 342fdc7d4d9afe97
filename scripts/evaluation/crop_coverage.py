"""Does the prediction region keep the lungs of cropped scans? For crop boxes of every shared scan (the whole scan, a
box inside the lungs' bounding box, one lung, cuts through both lungs in y and in x, the top and the bottom third of
the lungs cut off), the fraction of the whole scan's lung voxels inside the crop that the body mask of the crop
(``scripts.transforms.ct_masks.body_mask_array``, the region's fixed-image part) keeps, and the mask's volume against
the whole scan's mask in the same box (1.0: nothing added outside the lungs)::

    python -m scripts.evaluation.crop_coverage --data_dir <dataset_dir> --output docs/real_inputs_coverage.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import fire
import numpy as np
import SimpleITK as sitk

from scripts.data.prepare_data import find_scans, scan_name
from scripts.transforms.ct_masks import body_mask_array, lung_mask_array
from scripts.utils.atomic_write import atomic_write_text

BoxSlices = tuple[slice, slice, slice]


def crop_boxes(lung: np.ndarray) -> dict[str, BoxSlices]:
    """Crop boxes ``(z, y, x)`` of a scan through its lungs (``lung`` its lung mask), as crops made for registration
    cut them: inside the lungs' box by 20/10 voxels in y and 15/15 in x (both lungs, or one), half the lungs cut in y
    or in x, the top or the bottom third of the lungs cut off, and the whole scan."""
    (z0, z1), (y0, y1), (x0, x1) = (
        (int(found[0]), int(found[-1]) + 1)
        for found in (np.nonzero(lung.any(axis=tuple(a for a in range(3) if a != k)))[0] for k in range(3))
    )
    middle, every = (x0 + x1) // 2, slice(None)
    return {
        "whole scan": (every, every, every),
        "inside the lungs' box": (every, slice(y0 + 20, y1 - 10), slice(x0 + 15, x1 - 15)),
        "one lung": (every, slice(y0 + 20, y1 - 10), slice(x0 + 15, middle)),
        "both lungs cut in y": (every, slice(y0 + (y1 - y0) // 3, None), every),
        "both lungs cut in x": (every, every, slice(x0 + (x1 - x0) // 4, x1 - (x1 - x0) // 4)),
        "top of the lungs cut": (slice(None, z1 - (z1 - z0) // 3), every, every),
        "bottom of the lungs cut": (slice(z0 + (z1 - z0) // 3, None), every, every),
    }


def scan_coverage(path: str | Path) -> dict[str, dict]:
    """Lung coverage and relative mask volume of every crop box of one scan."""
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    hu = sitk.GetArrayFromImage(image)
    spacing = tuple(image.GetSpacing()[::-1])
    body = body_mask_array(hu, spacing)
    lung = lung_mask_array(hu, body, spacing)
    out = {}
    for name, box in crop_boxes(lung).items():
        start = time.perf_counter()
        region = body_mask_array(hu[box], spacing)
        out[name] = {
            "size_xyz": list(hu[box].shape[::-1]),
            "lung_voxels_kept": float(region[lung[box]].mean()),
            "volume_over_whole_scan_mask": float(region.sum() / max(body[box].sum(), 1)),
            "seconds": round(time.perf_counter() - start, 1),
        }
    return out


def main(data_dir: str, output: str = "", scans=None) -> dict:
    """Every crop of every scan in ``data_dir``; prints one line per crop and the worst coverage, writes ``output``.

    Args:
        data_dir: folder of the CT scans.
        output: JSON file of the results; "" writes nothing.
        scans: optional scan name or names (default: every scan in ``data_dir``).

    Returns:
        Dict scan name -> crop name -> coverage row (``scan_coverage``).
    """
    results = {}
    for path in find_scans(data_dir, scans):
        results[scan_name(path)] = scan_coverage(path)
        for crop, row in results[scan_name(path)].items():
            print(
                f"{scan_name(path):26s} {crop:24s} lung kept {row['lung_voxels_kept']:.4f}, volume "
                f"{row['volume_over_whole_scan_mask']:.3f} of the whole scan's mask, {row['seconds']} s"
            )
    worst = min(row["lung_voxels_kept"] for rows in results.values() for row in rows.values())
    print(f"worst lung coverage over {sum(len(r) for r in results.values())} crops: {worst:.4f}")
    if output:
        atomic_write_text(Path(output), json.dumps({"worst_lung_coverage": worst, "scans": results}, indent=1))
    return results


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
