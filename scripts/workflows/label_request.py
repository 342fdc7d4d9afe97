"""One misalignment request for a viewer (the MONAI Label app for 3D Slicer): run the bundle's inference
(configs/inference.json, its default method unless overridden) on a fixed and a registered moving image in a
subprocess, and turn its outputs into a label map a viewer shows over the fixed image.

The subprocess uses the bundle's own interpreter (``python``; MONAI Label lives in its own environment, see
requirements-monailabel.txt). The label map is 0 outside the predicted region and 1 correct, 2 poor, 3 wrong inside
(a viewer's label 0 is background), uint8 on the fixed image's grid.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from scripts.data.image_io import image_stem
from scripts.inferers.overlay import CLASS_COLOURS
from scripts.utils.atomic_write import atomic_write_image
from scripts.utils.constants import CLASS_NAMES

LABEL_VALUES = {name: k + 1 for k, name in enumerate(CLASS_NAMES)}  # correct 1, poor 2, wrong 3; 0 background
LABEL_COLOURS = {
    name: [int(colour[i : i + 2], 16) for i in (1, 3, 5)] for name, colour in zip(CLASS_NAMES, CLASS_COLOURS)
}
BUNDLE_TIMEOUT_S = 3600


class BundleRunError(RuntimeError):
    """The bundle run failed; the message is its own one-line reason (e.g. ``bad input: moving image X: ...``)."""


def _reason(output: str) -> str:
    """The bundle's one-line reason from its log: the ``bad input`` line, else the last non-empty line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if "bad input:" in line:
            return line[line.index("bad input:") :]
    return lines[-1] if lines else "no output"


def run_bundle(
    fixed: str | os.PathLike,
    moving: str | os.PathLike,
    output_dir: str | os.PathLike,
    bundle_root: str | os.PathLike,
    overrides: Optional[Mapping[str, Any]] = None,
    python: Optional[str] = None,
    timeout_s: float = BUNDLE_TIMEOUT_S,
) -> Path:
    """``python -m monai.bundle run --config_file configs/inference.json`` on one pair (no landmarks) into
    ``output_dir``; ``BundleRunError`` with the bundle's own reason when it fails.

    Args:
        fixed: fixed image file.
        moving: registered moving image file.
        output_dir: folder of the bundle's outputs.
        bundle_root: bundle folder (holds ``configs/inference.json``).
        overrides: extra bundle arguments, name -> value ("" passed as an empty value).
        python: interpreter of the bundle run; None uses ``sys.executable``.
        timeout_s: time limit of the subprocess, seconds.

    Returns:
        ``output_dir`` as a ``Path``.

    Raises:
        BundleRunError: when the run times out or exits with an error.
    """
    bundle_root = Path(bundle_root).resolve()
    command = [
        python or sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(bundle_root / "configs" / "inference.json"),
        "--bundle_root",
        str(bundle_root),
        "--fixed_image",
        str(fixed),
        "--moving_image",
        str(moving),
        "--landmarks",
        "''",
        "--output_dir",
        str(output_dir),
        "--progress",
        "False",
    ]
    for key, value in dict(overrides or {}).items():
        command += [f"--{key}", "''" if value == "" else str(value)]
    try:
        result = subprocess.run(command, cwd=bundle_root, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BundleRunError(f"the bundle run on {moving} took longer than {timeout_s:.0f} s") from None
    if result.returncode != 0:
        raise BundleRunError(_reason(result.stdout + "\n" + result.stderr))
    return Path(output_dir)


def viewer_label_map(output_dir: str | os.PathLike, stem: str, destination: str | os.PathLike) -> Path:
    """``<stem>_misalignment.nii.gz`` -> a label map with 0 outside the predicted region (where the probabilities
    are 0) and class + 1 inside, written atomically to ``destination``.

    Args:
        output_dir: folder of the bundle's outputs.
        stem: stem of the moving image (names the output files).
        destination: label map file to write.

    Returns:
        The written path (uint8 label map on the fixed image's grid).
    """
    output_dir = Path(output_dir)
    labels = sitk.ReadImage(str(output_dir / f"{stem}_misalignment.nii.gz"))
    probabilities = sitk.GetArrayFromImage(sitk.ReadImage(str(output_dir / f"{stem}_probabilities.nii.gz")))
    inside = probabilities.sum(axis=-1) > 0
    values = np.where(inside, sitk.GetArrayViewFromImage(labels).astype(np.uint8) + 1, 0).astype(np.uint8)
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(labels)
    return atomic_write_image(image, destination)


def infer_pair(
    fixed: str | os.PathLike,
    moving: str | os.PathLike,
    bundle_root: str | os.PathLike,
    result_dir: str | os.PathLike | None = None,
    overrides: Optional[Mapping[str, Any]] = None,
    python: Optional[str] = None,
) -> Tuple[str, Dict[str, Any]]:
    """Run the bundle on a pair; returns the viewer label map's path and the result parameters: label names and
    values, label colours (RGB 0-255), the class fractions, and for methods with an error map its path and mean.

    Args:
        fixed: fixed image file.
        moving: registered moving image file.
        bundle_root: bundle folder.
        result_dir: folder of the outputs; None creates a temporary one.
        overrides: extra bundle arguments, name -> value.
        python: interpreter of the bundle run; None uses ``sys.executable``.

    Returns:
        Tuple ``(label_path, params)``: the label map path and a dict with ``label_names``, ``label_colors``,
        ``fractions``, ``voxels``, ``fixed``, ``moving`` and, with an error map, ``error_mm_file`` and
        ``mean_error_mm``.

    Raises:
        BundleRunError: when the bundle run fails.
    """
    result_dir = Path(result_dir or tempfile.mkdtemp(prefix="misalignment_"))
    stem = image_stem(moving)
    run_bundle(fixed, moving, result_dir, bundle_root, overrides, python)
    label_path = viewer_label_map(result_dir, stem, result_dir / f"{stem}_labels.nii.gz")
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    inside = values > 0
    params: Dict[str, Any] = {
        "label_names": dict(LABEL_VALUES),
        "label_colors": dict(LABEL_COLOURS),
        "fractions": {
            name: float((values[inside] == v).mean()) if inside.any() else 0.0 for name, v in LABEL_VALUES.items()
        },
        "voxels": int(inside.sum()),
        "fixed": str(fixed),
        "moving": str(moving),
    }
    error_path = result_dir / f"{stem}_error_mm.nii.gz"
    if error_path.is_file():
        error = sitk.GetArrayFromImage(sitk.ReadImage(str(error_path)))
        params["error_mm_file"] = str(error_path)
        params["mean_error_mm"] = float(error[inside].mean()) if inside.any() else 0.0
    return str(label_path), params
