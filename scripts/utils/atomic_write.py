"""Atomic file writes: every output goes to a temporary name beside the target and is renamed when complete, so a
failed or interrupted run never leaves a half-written file under the real name."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator

import SimpleITK as sitk


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a unique hidden name beside ``path`` with the same extension (so writers that pick a format from it,
    SimpleITK or matplotlib, still do) for any writer; it is renamed onto ``path`` if the block succeeds and removed
    otherwise. The writer creates the file, so it gets the usual permissions (mkstemp would make it owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name.split('.')[0]}.{uuid.uuid4().hex[:12]}.tmp{''.join(path.suffixes)}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically.

    Args:
        path: destination file.
        text: content (written without newline translation).

    Returns:
        ``path`` as a ``Path``.
    """
    with atomic_output(path) as temporary:
        with temporary.open("w", newline="") as f:
            f.write(text)
    return Path(path)


def atomic_write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True, level: int = -1) -> Path:
    """Write a SimpleITK image to ``path`` (format from the extension, compression ``level`` -1 = the writer's
    default) atomically.

    Args:
        image: image to write.
        path: destination file; its extension picks the format.
        compress: compress the file (e.g. gzip for ``.nii.gz``).
        level: compression level; -1 for the writer's default.

    Returns:
        ``path`` as a ``Path``.
    """
    with atomic_output(path) as temporary:
        sitk.WriteImage(image, str(temporary), compress, level)
    return Path(path)
