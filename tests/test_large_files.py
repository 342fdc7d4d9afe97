"""Weights as users download them: a local HTTP server on 127.0.0.1 plays the release, MONAI's own
``download_large_files`` and the mirror command fetch every file of large_files.yml into an empty bundle folder with
its hash checked, and a corrupted file is refused by name."""

from __future__ import annotations

import functools
import hashlib
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from scripts.workflows.large_files import RELEASE_BASE_URL, mirrored, read_large_files

pytestmark = pytest.mark.slow  # subprocesses, servers or whole pairs: pytest -m 'not slow' skips them

REPO_ROOT = Path(__file__).resolve().parents[1]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no request lines in the test output
        pass


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """(base URL, folder) of a local server holding the release's files at its top level."""
    folder = tmp_path_factory.mktemp("release")
    for entry in read_large_files(REPO_ROOT):
        shutil.copy(REPO_ROOT / entry["path"], folder / Path(entry["path"]).name)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", folder
    server.shutdown()
    thread.join()


def _empty_bundle(path: Path, base_url: str = "") -> Path:
    """A bundle folder with large_files.yml (its URLs moved to ``base_url`` if given) and no weights."""
    path.mkdir(parents=True)
    text = (REPO_ROOT / "large_files.yml").read_text()
    (path / "large_files.yml").write_text(text.replace(RELEASE_BASE_URL, base_url) if base_url else text)
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_url_is_the_release_of_its_file():
    for entry in read_large_files(REPO_ROOT):
        assert entry["url"] == RELEASE_BASE_URL + Path(entry["path"]).name
        assert mirrored(entry["url"], "http://mirror/x/") == "http://mirror/x/" + Path(entry["path"]).name


def test_large_files_list_exactly_the_shipped_weights():
    listed = {entry["path"] for entry in yaml.safe_load((REPO_ROOT / "large_files.yml").read_text())["large_files"]}
    assert listed == {f"models/{p.name}" for p in (REPO_ROOT / "models").glob("*.pt")}


def test_monai_download_large_files_fetches_every_file_with_its_hash(tmp_path, release):
    base_url, _ = release
    bundle = _empty_bundle(tmp_path / "bundle", base_url)
    command = [sys.executable, "-m", "monai.bundle", "download_large_files", "--bundle_path", str(bundle)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for entry in read_large_files(bundle):
        assert _sha256(bundle / entry["path"]) == entry["hash_val"]


def test_the_mirror_command_refuses_a_corrupted_file_by_name(tmp_path, release):
    base_url, folder = release
    bundle = _empty_bundle(tmp_path / "bundle")
    good = subprocess.run(
        [sys.executable, "-m", "scripts.workflows.large_files", "--bundle_path", str(bundle), "--base_url", base_url],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert good.returncode == 0, good.stderr[-3000:]
    assert all(_sha256(bundle / e["path"]) == e["hash_val"] for e in read_large_files(bundle))

    corrupted_mirror = tmp_path / "mirror"
    shutil.copytree(folder, corrupted_mirror)
    data = bytearray((corrupted_mirror / "model_residual.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupted_mirror / "model_residual.pt").write_bytes(bytes(data))
    (bundle / "models" / "model_residual.pt").unlink()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(corrupted_mirror)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        bad = subprocess.run(
            [
                sys.executable,
                "-m",
                "scripts.workflows.large_files",
                "--bundle_path",
                str(bundle),
                "--base_url",
                f"http://127.0.0.1:{server.server_address[1]}/",
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        server.shutdown()
    assert bad.returncode == 1
    assert (
        bad.stderr.strip().splitlines()[-1].startswith("models/model_residual.pt: the download from http://127.0.0.1")
    )
    assert "Traceback" not in bad.stderr
    assert not (bundle / "models" / "model_residual.pt").exists()  # refused, not moved into place
