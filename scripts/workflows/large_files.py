"""The bundle's weights as users download them: ``large_files.yml`` lists every shipped weight file with the URL of
the bundle's release and its sha256, for ``python -m monai.bundle download_large_files``. This command does the same
from a mirror (``--base_url``, e.g. an institution's file server) and ends with one line naming a file whose download
fails its hash check. The repository also holds the files themselves, for offline use.

    python -m scripts.workflows.large_files --bundle_path . --base_url https://mirror.example.org/misalignment/
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any, Dict, List
from urllib.parse import urlparse

from monai.apps.utils import HashCheckError, download_url
from monai.bundle import ConfigParser

from scripts.workflows.bundle_run import UsageExit

LARGE_FILES = "large_files.yml"
RELEASE_BASE_URL = "https://github.com/registration-misalignment/chest-ct-misalignment/releases/download/v0.7.0/"


def read_large_files(bundle_path: str | os.PathLike = ".") -> List[Dict[str, Any]]:
    """The entries of ``<bundle_path>/large_files.yml`` (path, url, hash_val, hash_type)."""
    parser = ConfigParser()
    parser.read_config(str(Path(bundle_path) / LARGE_FILES))
    return [dict(entry) for entry in parser.get()["large_files"]]


def mirrored(url: str, base_url: str) -> str:
    """``url``'s file name under ``base_url`` (the release's layout: every file at the top level)."""
    return base_url.rstrip("/") + "/" + posixpath.basename(urlparse(url).path)


def download(bundle_path: str | os.PathLike = ".", base_url: str = "", progress: bool = False) -> List[Path]:
    """Download every file of ``large_files.yml`` that is not in ``bundle_path`` yet (from ``base_url`` instead of
    the release when given), each checked against its sha256 before it is moved into place; returns the paths.

    Args:
        bundle_path: the bundle folder (holds ``large_files.yml``; the files go to their paths below it).
        base_url: a mirror holding the release's files at its top level; "" for the release itself.
        progress: show download progress bars.

    Returns:
        The paths of the files listed (downloaded now or already there with the right hash).
    """
    root = Path(bundle_path)
    written = []
    for entry in read_large_files(root):
        path = root / entry["path"]
        if not path.resolve().is_relative_to(root.resolve()):
            raise UsageExit(f"{LARGE_FILES}: {entry['path']} lies outside the bundle folder")
        url = mirrored(entry["url"], base_url) if base_url else entry["url"]
        try:
            download_url(url, path, entry.get("hash_val") or None, entry.get("hash_type") or "sha256", progress)
        except HashCheckError:
            state = "the file there" if path.exists() else f"the download from {url}"
            raise UsageExit(
                f"{entry['path']}: {state} does not have the {entry.get('hash_type', 'sha256')} of {LARGE_FILES} "
                f"(corrupted or tampered); it was not used"
            ) from None
        except (OSError, RuntimeError) as error:
            raise UsageExit(f"{entry['path']}: cannot download {url} ({error})") from None
        written.append(path)
    return written


if __name__ == "__main__":
    import fire

    fire.Fire(download)
