"""Voxel-level scores of a misalignment weights file on the held-out generated patches of a training config.

The trainer's own validation runs in eval mode with the BatchNorm statistics of the run, which after a short run
are still near their initial values (see scripts.engines.batchnorm_recalibration), so it can report the class prior
where
the network already ranks voxels well. This re-scores exported weights (statistics re-estimated before export) on
the config's ``validate`` patches: F1 per class, mean F1, accuracy, Cohen's kappa (scikit-learn), and the one-vs-rest
ROC AUC of each class probability, which shows what the network has learned even while its argmax is one class;
with ``--class_weights_file`` also the scores of the class-weighted decision (scripts.engines.class_weights)::

    python -m scripts.engines.patch_validation --weights models/model.pt --dataset_dir <work_dir>/misalignment \
        --val_patches_per_pair 16 --val_num_patches 16 --class_weights_file models/class_weights.json
"""

from __future__ import annotations

import json
import logging

import fire
import numpy as np
import torch
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

from scripts.engines.patch_prediction import predict_patches
from scripts.inferers.class_decision import apply_class_weights, read_class_weights
from scripts.utils.constants import CLASS_NAMES, LATENT_SIZE

logger = logging.getLogger(__name__)


def voxel_scores(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """Scores of ``probabilities [N, 3]`` (correct, poor, wrong) against true classes ``labels [N]``.

    Args:
        labels: ``[N]`` true classes (0, 1, 2).
        probabilities: ``[N, 3]`` class probabilities (their argmax is scored).

    Returns:
        Dict with ``voxels``, ``true_counts``, ``predicted_counts``, ``accuracy``, ``kappa``, ``f1_<class>``,
        ``mean_f1`` and ``auc_<class>`` (None when a class is absent or the only one).
    """
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
    weights: str = "models/model.pt",
    config_file: str = "configs/train.json",
    threads: int = 0,
    class_weights_file: str = "",
    **overrides,
) -> dict:
    """Score ``weights`` on the config's validation patches (see ``predict_patches``) and print the scores as JSON;
    with ``class_weights_file`` (scripts.engines.class_weights) also the scores of the class-weighted decision.

    Args:
        weights: network checkpoint.
        config_file: training config.
        threads: torch CPU threads; 0 leaves torch's setting.
        class_weights_file: class-weights JSON; "" for the argmax only.
        **overrides: config ids and values, e.g. ``dataset_dir``.

    Returns:
        The printed scores (``voxel_scores`` plus ``weights``, ``patches`` and, with weights, ``class_weighted``).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(message)s")
    labels, probabilities = predict_patches(weights, config_file, threads, **overrides)
    scores = voxel_scores(labels, probabilities)
    scores["weights"] = weights
    scores["patches"] = int(labels.size // LATENT_SIZE**3)
    class_weights = read_class_weights(class_weights_file, weights)
    if class_weights is not None:
        weighted = apply_class_weights(torch.from_numpy(probabilities), class_weights).numpy()
        scores["class_weighted"] = {"class_weights": class_weights, **voxel_scores(labels, weighted)}
    print(json.dumps(scores, indent=1))
    return scores


if __name__ == "__main__":
    fire.Fire(run, serialize=lambda scores: None)
