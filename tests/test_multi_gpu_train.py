"""configs/multi_gpu_train.json with torchrun: 2 CPU processes (gloo), 2 iterations each, gradients kept in sync."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.helpers.training_data import prepared_dataset

pytestmark = pytest.mark.slow  # subprocesses, servers or whole pairs: pytest -m 'not slow' skips them


def test_two_processes_with_gloo_train_in_sync(tmp_path, tmp_path_factory):
    dataset_dir = prepared_dataset(tmp_path_factory)
    overrides = {
        "bundle_root": str(tmp_path),
        "dataset_dir": str(dataset_dir),
        "decoder": "single_cnn",
        "batch_size": 1,
        "max_epochs": 1,
        "patches_per_pair": 2,
        "val_patches_per_pair": 2,
        "val_num_patches": 2,
        "val_interval": 2,
        "ckpt_interval": 2,
        "finalize": [
            "$torch.save(@network_def.state_dict(), @bundle_root + '/rank' + str(dist.get_rank()) + '.pt')",
            "$dist.is_initialized() and dist.destroy_process_group()",
        ],
    }
    override_file = tmp_path / "overrides.json"
    override_file.write_text(json.dumps(overrides))
    configs = [str(REPO_ROOT / "configs" / n) for n in ("train.json", "multi_gpu_train.json")] + [str(override_file)]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29517",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(configs),
        "--meta_file",
        str(REPO_ROOT / "configs" / "metadata.json"),
        "--logging_file",
        str(REPO_ROOT / "configs" / "logging.conf"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    exported = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    weights = [k for k in rank0 if k.endswith("weight") and rank0[k].ndim > 1]
    assert weights
    for key in weights:  # each rank saw other patches: equal weights mean the gradients were all-reduced
        assert torch.equal(rank0[key], rank1[key]), key
        assert torch.equal(rank0[key], exported[key]), key
    assert "val_mean_f1" in result.stdout + result.stderr  # validation ran, metrics merged across the 2 ranks
    assert (tmp_path / "runs" / "train" / "checkpoints" / "checkpoint_final_iteration=2.pt").is_file()
