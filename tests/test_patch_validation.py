"""Voxel-level re-scoring of exported weights on held-out generated patches (scripts.engines.patch_validation)."""

import numpy as np
import pytest
import torch

from scripts.engines.patch_validation import run, voxel_scores
from scripts.networks.misalignment_net import MisalignmentNet
from tests.conftest import REPO_ROOT
from tests.helpers.training_data import prepared_dataset, untrained_weights


def test_scores_of_a_perfect_and_of_a_constant_predictor():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    perfect = np.eye(3)[labels]
    scores = voxel_scores(labels, perfect)
    assert scores["mean_f1"] == 1.0 and scores["kappa"] == 1.0 and scores["auc_wrong"] == 1.0
    constant = np.tile([0.7, 0.2, 0.1], (len(labels), 1))
    scores = voxel_scores(labels, constant)
    assert scores["predicted_counts"] == [8, 0, 0] and scores["kappa"] == 0.0
    assert scores["f1_poor"] == 0.0 and scores["auc_correct"] == 0.5  # ties everywhere: no ranking
    ranked = constant.copy()
    ranked[:, 2] = [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07]  # argmax still "correct", p_wrong ranks perfectly
    scores = voxel_scores(labels, ranked)
    assert scores["predicted_counts"] == [8, 0, 0] and scores["auc_wrong"] == 1.0


def test_run_scores_every_voxel_of_the_validation_patches(tmp_path_factory, tmp_path):
    dataset_dir = prepared_dataset(tmp_path_factory)
    weights = untrained_weights(tmp_path)
    scores = run(
        weights=str(weights),
        config_file=str(REPO_ROOT / "configs" / "train.json"),
        dataset_dir=str(dataset_dir),
        decoder="single_cnn",
        batch_size=1,
        val_patches_per_pair=2,
        val_num_patches=2,
    )
    assert scores["patches"] == 2 and scores["voxels"] == 2 * 25**3
    assert sum(scores["true_counts"]) == sum(scores["predicted_counts"]) == scores["voxels"]
    assert 0.0 <= scores["mean_f1"] <= 1.0


def test_weights_of_another_decoder_are_a_clear_error(tmp_path_factory, tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save(MisalignmentNet(decoder="single_cnn").state_dict(), weights)
    with pytest.raises(Exception, match="weights.pt"):
        run(weights=str(weights), config_file=str(REPO_ROOT / "configs" / "train.json"), dataset_dir=str(tmp_path))
