"""Voxel-level scores of a misalignment weights file on the held-out generated patches of a training config.

The trainer's own validation runs in eval mode with the BatchNorm statistics of the run, which after a short run
are still near their initial values (see scripts.batchnorm_recalibration), so it can report the class prior where
the network already ranks voxels well. This re-scores exported weights (statistics re-estimated before export) on
the config's ``validate`` patches: F1 per class, mean F1, accuracy, Cohen's kappa (scikit-learn), and the one-vs-rest
ROC AUC of each class probability, which shows what the network has learned even while its argmax is one class::

    python -m scripts.patch_validation --weights models/model.pt --dataset_dir ../data/misalignment \
        --val_patches_per_pair 16 --val_num_patches 16
"""

from __future__ import annotations

import json
import logging

import fire
import numpy as np
import torch
from monai.bundle import ConfigParser
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

from scripts.constants import CLASS_NAMES
from scripts.labels import misalignment_classes
from scripts.train_checkpoints import load_network_weights
from scripts.train_engine import PatchTrainingNetwork

logger = logging.getLogger(__name__)


def voxel_scores(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """Scores of ``probabilities [N, 3]`` (correct, poor, wrong) against true classes ``labels [N]``."""
    predicted = probabilities.argmax(axis=1)
    scores: dict = {
        "voxels": int(labels.size),
        "true_counts": np.bincount(labels, minlength=3).tolist(),
        "predicted_counts": np.bincount(predicted, minlength=3).tolist(),
        "accuracy": float(accuracy_score(labels, predicted)),
        "kappa": float(cohen_kappa_score(labels, predicted, labels=[0, 1, 2])),
    }
    f1 = f1_score(labels, predicted, labels=[0, 1, 2], average=None, zero_division=0)
    scores.update({f"f1_{name}": float(v) for name, v in zip(CLASS_NAMES, f1)})
    scores["mean_f1"] = float(np.mean(f1))
    for k, name in enumerate(CLASS_NAMES):
        present = labels == k
        scores[f"auc_{name}"] = (
            float(roc_auc_score(present, probabilities[:, k])) if 0 < present.sum() < labels.size else None
        )
    return scores


def run(
    weights: str = "models/model.pt", config_file: str = "configs/train.json", threads: int = 0, **overrides
) -> dict:
    """Load ``weights`` (exported state_dict or trainer checkpoint) into the config's ``network_def``, predict the
    ``validate#dataloader`` patches in eval mode and print the scores as JSON. Other keyword arguments override
    config ids as on the ``monai.bundle run`` command line (``--dataset_dir``, ``--val_num_patches``, ...)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(message)s")
    if threads > 0:
        torch.set_num_threads(threads)
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.update(dict(overrides))
    net = parser.get_parsed_content("network_def")
    load_network_weights(net, weights)
    net.eval()
    prepare_batch = parser.get_parsed_content("prepare_batch")
    inferer = parser.get_parsed_content("validate#inferer")
    patch_network = PatchTrainingNetwork(net).eval()
    labels, probabilities = [], []
    with torch.no_grad():
        for data in parser.get_parsed_content("validate#dataloader"):
            inputs, magnitude = prepare_batch(data, torch.device("cpu"))
            logits = inferer(inputs, patch_network)
            labels.append(misalignment_classes(magnitude).flatten())
            probabilities.append(net.probabilities(logits.float()).movedim(1, -1).reshape(-1, 3))
    if not labels:
        raise ValueError(f"{config_file}: the validation split gave no patch (check --dataset_dir and its datalist)")
    scores = voxel_scores(torch.cat(labels).numpy(), torch.cat(probabilities).numpy())
    scores["weights"] = weights
    scores["patches"] = int(sum(len(x) for x in labels) // 25**3)
    print(json.dumps(scores, indent=1))
    return scores


if __name__ == "__main__":
    fire.Fire(run, serialize=lambda scores: None)
