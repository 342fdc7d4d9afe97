"""MONAI Deploy: the TorchScript package (``ckpt_export`` of ``network_def`` with models/model.pt and the configs
inference.json + apps/deploy/deploy.json), tested the way MonaiBundleInferenceOperator loads it (``extra/*.json``
read from the archive, ``torch.jit.load`` on CPU, the embedded preprocessing on the sample pair, the scripted network
against the eager one), and the Deploy app (apps/deploy/app.py, the SDK's bundle operator on Holoscan) end to end on
a crop of the sample pair against the bundle's own run. The app runs with the interpreter that has the SDK:
``$MISALIGNMENT_DEPLOY_PYTHON`` (.ci/run makes a venv from requirements-deploy.txt) or this one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export

from scripts.networks.misalignment_net import MisalignmentNet

pytestmark = pytest.mark.slow  # subprocesses, servers or whole pairs: pytest -m 'not slow' skips them

REPO_ROOT = Path(__file__).resolve().parents[1]
ROI = 32  # voxels (1 mm) per side of the region the scripted network is run on: one tile, a few seconds on CPU


def embedded_config(package: Path, name: str) -> dict:
    """A config stored in the TorchScript archive (``<archive>/extra/<name>``), read as the Deploy operator's
    ``get_bundle_config`` does (the archive's top folder is the file's stem)."""
    with zipfile.ZipFile(package) as archive:
        member = next(n for n in archive.namelist() if n.endswith(f"/extra/{name}"))
        return json.loads(archive.read(member))


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("deploy") / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(path),
        ckpt_file=str(REPO_ROOT / "models" / "model.pt"),
        meta_file=str(REPO_ROOT / "configs" / "metadata.json"),
        config_file=[str(REPO_ROOT / "configs" / "inference.json"), str(REPO_ROOT / "apps" / "deploy" / "deploy.json")],
        bundle_root=str(REPO_ROOT),
    )
    return path


def test_package_embeds_the_bundle_configs(package):
    metadata = embedded_config(package, "metadata.json")
    inference = embedded_config(package, "inference.json")
    assert metadata == json.loads((REPO_ROOT / "configs" / "metadata.json").read_text())
    assert inference["network_def"]["_target_"] == "scripts.networks.misalignment_net.MisalignmentNet"
    assert embedded_config(package, "deploy.json")["deploy_inferer"]["with_steps"] is False
    extra = {"metadata.json": "", "inference.json": ""}
    torch.jit.load(str(package), map_location="cpu", _extra_files=extra)  # the other way Deploy reads them
    assert json.loads(extra["metadata.json"])["version"] == metadata["version"]


def test_scripted_network_on_the_sample_pair_matches_the_eager_network(package):
    metadata = embedded_config(package, "metadata.json")
    parser = ConfigParser(embedded_config(package, "inference.json"))
    parser["bundle_root"] = str(REPO_ROOT)
    data = parser.get_parsed_content("preprocessing")(parser.get_parsed_content("data")[0])  # the sample pair
    image = data["image"][None].float()  # [1, 2, z, y, x] HU on the 1 mm grid
    channels = metadata["network_data_format"]["inputs"]["image"]["num_channels"]
    assert image.shape[1] == channels == 2

    mask = data["mask"][0].numpy()
    centre = np.round(np.argwhere(mask).mean(axis=0)).astype(int)  # a region in the middle of the body
    region = tuple(slice(c - ROI // 2, c + ROI // 2) for c in centre)
    roi = image[(slice(None), slice(None)) + region]

    scripted = torch.jit.load(str(package), map_location="cpu")
    eager = MisalignmentNet(decoder=parser["decoder"], split=parser["split"], hidden_channels=parser["hidden_channels"])
    state = torch.load(REPO_ROOT / "models" / "model.pt", map_location="cpu", weights_only=True)
    eager.load_state_dict(state)
    eager.eval()
    with torch.inference_mode():
        from_package = scripted(roi)
        reference = eager(roi)
    classes = metadata["network_data_format"]["outputs"]["pred"]["num_channels"]
    assert from_package.shape == (1, classes, ROI, ROI, ROI) and from_package.dtype == torch.float32
    assert torch.allclose(from_package.sum(dim=1), torch.ones(1), atol=1e-4)
    assert torch.allclose(from_package, reference, atol=1e-4)
    assert from_package.std() > 0  # a real map of the trained weights, not a constant


def deploy_python() -> str:
    """An interpreter with the MONAI Deploy SDK, or a skip saying how to get one."""
    configured = os.environ.get("MISALIGNMENT_DEPLOY_PYTHON", "")
    python = configured or sys.executable
    found = subprocess.run(
        [python, "-c", "import monai.deploy.core, holoscan"], capture_output=True, text=True, timeout=300
    )
    if found.returncode == 0:
        return python
    if configured:  # CI set it up: a broken install is a failure, not a skip
        pytest.fail(f"MISALIGNMENT_DEPLOY_PYTHON={configured} cannot import the SDK: {found.stderr[-2000:]}")
    pytest.skip("MONAI Deploy SDK not installed: pip install -r requirements-deploy.txt (.ci/run makes a venv for it)")


def test_deploy_app_on_a_crop_of_the_sample_pair_matches_the_bundle(package, tmp_path):
    """The Holoscan app (CPU) and the bundle command give the same map on a 40 mm crop of the sample pair."""
    python = deploy_python()
    inputs, app_out, bundle_out = tmp_path / "in", tmp_path / "app", tmp_path / "bundle"
    inputs.mkdir()
    for name in ("fixed", "moving"):
        image = sitk.ReadImage(str(REPO_ROOT / "sample_data" / f"{name}.nii.gz"))
        sitk.WriteImage(image[50:70, 73:93, 24:40], str(inputs / f"{name}.nii.gz"))  # 2 mm voxels, in the lungs
    command = [
        python,
        str(REPO_ROOT / "apps" / "deploy" / "app.py"),
        "-i",
        str(inputs),
        "-o",
        str(app_out),
        "-m",
        str(package),
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    workflow = ConfigWorkflow(
        config_file=str(REPO_ROOT / "configs" / "inference.json"),
        workflow_type="infer",
        bundle_root=str(REPO_ROOT),
        fixed_image=str(inputs / "fixed.nii.gz"),
        moving_image=str(inputs / "moving.nii.gz"),
        landmarks="",
        output_dir=str(bundle_out),
        method="network",
        progress=False,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    read = {
        (folder, suffix): sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"moving_{suffix}.nii.gz")))
        for folder in (app_out, bundle_out)
        for suffix in ("probabilities", "misalignment")
    }
    mask = read[bundle_out, "probabilities"].sum(axis=-1) > 0
    app_mask = read[app_out, "probabilities"].sum(axis=-1) > 0
    # the app recomputes the region on the loaded (background-replaced) pair: a few edge voxels may differ
    assert mask.sum() > 500 and (app_mask == mask).mean() > 0.999
    both = mask & app_mask
    difference = np.abs(read[app_out, "probabilities"][both] - read[bundle_out, "probabilities"][both])
    assert np.percentile(difference, 99.9) < 0.02 and difference.max() < 0.05  # bf16 rounding; the edge voxels
    assert (read[app_out, "misalignment"] == read[bundle_out, "misalignment"]).mean() > 0.99
