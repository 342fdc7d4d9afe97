"""The checks the MONAI model zoo runs on a bundle: code format, metadata schema, network I/O, TorchScript export."""

import json
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out

from tests.conftest import REPO_ROOT, SHARED_DIR

CODE_DIRS = ["scripts", "tests", "benchmarks"]


def _existing(dirs):
    return [d for d in dirs if (REPO_ROOT / d).is_dir()]


@pytest.mark.parametrize(
    "tool",
    [
        ["-m", "black", "--check", "--line-length", "120", "--quiet"],
        ["-m", "isort", "--check-only", "--profile", "black", "--line-length", "120", "--quiet"],
        ["-m", "flake8", "--max-line-length", "120"],
    ],
    ids=["black", "isort", "flake8"],
)
def test_code_format(tool):
    result = subprocess.run(
        [sys.executable, *tool, *_existing(CODE_DIRS)], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_required_files_and_version_in_changelog():
    for name in ["LICENSE", "large_files.yml", "configs/metadata.json", "configs/inference.json", "docs/README.md"]:
        assert (REPO_ROOT / name).is_file(), f"{name} is missing"
    meta = json.loads((REPO_ROOT / "configs/metadata.json").read_text())
    assert meta["version"] in meta["changelog"]


def test_metadata_pins_match_requirements():
    meta = json.loads((REPO_ROOT / "configs/metadata.json").read_text())
    pins = dict(
        line.strip().split("==")
        for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert meta["monai_version"] == pins["monai"]
    assert meta["pytorch_version"] == pins["torch"]
    assert meta["numpy_version"] == pins["numpy"]
    for package, version in meta["required_packages_version"].items():
        assert pins[package] == version, package


def test_verify_metadata_against_the_schema(tmp_path):
    schema = SHARED_DIR / "reference" / "meta_schema_20240725.json"
    if not schema.is_file():
        pytest.skip("../shared/reference/meta_schema_20240725.json is not present")
    meta_file = REPO_ROOT / "configs/metadata.json"
    verify_metadata(meta_file=str(meta_file), filepath=str(schema))  # raises ValueError when invalid
    broken = json.loads(meta_file.read_text())
    del broken["network_data_format"]
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(schema))


def test_verify_net_in_out():
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(REPO_ROOT / "configs/metadata.json"),
        config_file=str(REPO_ROOT / "configs/inference.json"),
        n=1,
        device="cpu",
    )


@pytest.mark.slow
def test_ckpt_export_to_torchscript(tmp_path):
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "configs/inference.json"))
    net = parser.get_parsed_content("network_def").eval()
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    ts_path = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts_path),
        ckpt_file=str(ckpt),
        meta_file=str(REPO_ROOT / "configs/metadata.json"),
        config_file=str(REPO_ROOT / "configs/inference.json"),
    )
    scripted = torch.jit.load(str(ts_path), map_location="cpu")
    image = torch.rand(1, 2, 8, 8, 8) * 1000 - 1000
    with torch.no_grad():
        torch.testing.assert_close(scripted(image), net(image))


def test_large_files_list_every_weight_file_with_its_sha256():
    import hashlib

    import yaml

    entries = yaml.safe_load((REPO_ROOT / "large_files.yml").read_text())["large_files"]
    listed = {e["path"] for e in entries}
    assert {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "models").glob("*.pt")} <= listed
    for entry in entries:
        assert entry["hash_type"] == "sha256"
        digest = hashlib.sha256((REPO_ROOT / entry["path"]).read_bytes()).hexdigest()
        assert digest == entry["hash_val"], f"{entry['path']} does not match large_files.yml"
