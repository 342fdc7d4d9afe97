"""MONAI Label: the real server (monailabel 0.8.5) with apps/monailabel on 127.0.0.1, bounded in time; an infer
request over HTTP for the sample pair returns the correct/poor/wrong label map with its names and colours and the
error map's mean; a request without a valid moving image gets a clear error. The server runs with the interpreter
that has monailabel (``$MISALIGNMENT_MONAILABEL_PYTHON``, made by .ci/run from requirements-monailabel.txt, or this
one); the bundle runs with this interpreter. Also the label-map glue (scripts.workflows.label_request) on its own."""

from __future__ import annotations

import email.parser
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from scripts.workflows.label_request import LABEL_VALUES, BundleRunError, infer_pair, viewer_label_map
from tests.helpers.fast_elastix import FAST_ELASTIX
from tests.helpers.synthetic_pair import write_pair

pytestmark = pytest.mark.slow  # subprocesses, servers or whole pairs: pytest -m 'not slow' skips them

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_LIMIT_S = 900  # the server is started under `timeout`: it stops by itself even if the test is killed
STARTUP_S = 240
REREGISTRATION_UNCALIBRATED = {
    "method": "reregistration",
    "calibration_file": "",
    "reregistration_inferer#elastix_options": FAST_ELASTIX,  # the server's glue is checked, not the registration
}


def monailabel_python() -> str:
    """An interpreter with monailabel, or a skip saying how to get one."""
    configured = os.environ.get("MISALIGNMENT_MONAILABEL_PYTHON", "")
    python = configured or sys.executable
    found = subprocess.run([python, "-c", "import monailabel.main"], capture_output=True, text=True, timeout=300)
    if found.returncode == 0:
        return python
    if configured:  # CI set it up: a broken install is a failure, not a skip
        pytest.fail(f"MISALIGNMENT_MONAILABEL_PYTHON={configured} cannot import monailabel: {found.stderr[-2000:]}")
    pytest.skip("monailabel not installed: pip install -r requirements-monailabel.txt in its own venv (.ci/run does)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _multipart(body: bytes, content_type: str) -> dict:
    """Parts of a multipart HTTP answer by field name (bytes)."""
    message = email.parser.BytesParser().parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    return {
        part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
        for part in message.get_payload()
    }


def test_label_map_glue_on_a_synthetic_pair(tmp_path):
    """The glue alone (no server): the network (untrained, tiny) on the synthetic pair; 0 stays outside the region."""
    paths = write_pair(tmp_path / "data")
    tiny = {
        "method": "network",
        "checkpoint": "/nonexistent/model.pt",
        "hidden_channels": 4,
        "tile_size": 49,
        "precision": "float32",
        "require_lung": False,
    }
    label_path, params = infer_pair(paths["fixed"], paths["moving"], REPO_ROOT, tmp_path / "out", overrides=tiny)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(label_path))
    bundle_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "moving_misalignment.nii.gz")))
    inside = labels > 0
    assert 0 < inside.sum() < labels.size and set(np.unique(labels)) <= {0, 1, 2, 3}
    assert (labels[inside] == bundle_labels[inside] + 1).all()
    assert params["label_names"] == LABEL_VALUES == {"correct": 1, "poor": 2, "wrong": 3}
    assert abs(sum(params["fractions"].values()) - 1) < 1e-6 and "error_mm_file" not in params
    with pytest.raises(BundleRunError, match=r"^bad input: moving image .*absent.nii.gz: file not found"):
        infer_pair(paths["fixed"], tmp_path / "absent.nii.gz", REPO_ROOT, tmp_path / "bad", overrides=tiny)
    assert viewer_label_map(tmp_path / "out", "moving", tmp_path / "again.nii.gz").is_file()


def test_monailabel_server_answers_an_infer_request_for_the_sample_pair(tmp_path):
    python = monailabel_python()
    studies = tmp_path / "studies"
    studies.mkdir()
    for name in ("fixed", "moving"):
        shutil.copy(REPO_ROOT / "sample_data" / f"{name}.nii.gz", studies / f"{name}.nii.gz")
    app = tmp_path / "app"  # a copy: MONAI Label writes its logs into the app folder
    app.mkdir()
    shutil.copy(REPO_ROOT / "apps" / "monailabel" / "main.py", app / "main.py")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        "timeout",
        str(SERVER_LIMIT_S),
        python,
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(app),
        "--studies",
        str(studies),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--conf",
        "bundle_python",
        sys.executable,
        "--conf",
        "bundle_overrides",
        json.dumps(REREGISTRATION_UNCALIBRATED),
    ]
    log = (tmp_path / "server.log").open("w")
    env = dict(os.environ, MISALIGNMENT_BUNDLE_ROOT=str(REPO_ROOT))
    server = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        info = None
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/info/", timeout=10) as answer:
                    info = json.loads(answer.read())
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(2)
        assert info is not None, (tmp_path / "server.log").read_text()[-4000:]
        model = info["models"]["misalignment"]
        assert model["labels"] == LABEL_VALUES and model["config"] == {"moving": "", "method": ""}
        assert model["label_colors"]["wrong"] == [232, 34, 31]

        def infer(moving: str) -> urllib.request.Request:
            body = urllib.parse.urlencode({"params": json.dumps({"moving": moving})}).encode()
            return urllib.request.Request(f"{url}/infer/misalignment?image=fixed&output=all", data=body)

        with urllib.request.urlopen(infer("moving"), timeout=600) as answer:
            parts = _multipart(answer.read(), answer.headers["Content-Type"])
        params = json.loads(parts["params"])
        (tmp_path / "answer.nii.gz").write_bytes(parts["image"])
        returned = sitk.ReadImage(str(tmp_path / "answer.nii.gz"))
        fixed = sitk.ReadImage(str(studies / "fixed.nii.gz"))
        assert returned.GetSize() == fixed.GetSize() and np.allclose(returned.GetOrigin(), fixed.GetOrigin())
        labels = sitk.GetArrayFromImage(returned)
        inside = labels > 0
        assert set(np.unique(labels)) <= {0, 1, 2, 3} and len(np.unique(labels[inside])) >= 2
        for name, value in LABEL_VALUES.items():
            assert abs(params["fractions"][name] - (labels[inside] == value).mean()) < 1e-6
        assert params["label_names"] == LABEL_VALUES and params["label_colors"]["correct"] == [31, 180, 31]
        assert params["mean_error_mm"] > 0 and params["error_mm_file"].endswith("moving_error_mm.nii.gz")

        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(infer("no_such_image"), timeout=120)
        assert "no_such_image" in refused.value.read().decode()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
