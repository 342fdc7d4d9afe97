"""Atomic file writes: every output goes to a temporary name beside the target and is renamed when complete."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import SimpleITK as sitk


def _temporary_path(path: Path) -> Path:
    """A unique hidden name beside ``path`` with the same extension (so SimpleITK picks the right writer); created
    by the writer itself, so the file gets the usual permissions (mkstemp would make it owner-only)."""
    suffix = "".join(path.suffixes) or ".tmp"
    return path.with_name(f".{path.name.split('.')[0]}.{uuid.uuid4().hex[:12]}.tmp{suffix}")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename (no half-written file on failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_path(path)
    try:
        with tmp.open("w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_image(image: sitk.Image, path: str | Path, compress: bool = True) -> Path:
    """Write a SimpleITK image to ``path`` (format from the extension) through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_path(path)
    try:
        sitk.WriteImage(image, str(tmp), compress)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
