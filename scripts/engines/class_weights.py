"""Class weights for the final decision: labels = argmax(w_c * p_c) instead of the paper's plain argmax.

A network trained on few iterations ranks voxels by misalignment (high one-vs-rest AUC) while its argmax is still
the majority class everywhere. Weighting the three class probabilities (a prior shift, p'_c = w_c p_c / sum) moves
the decision boundaries without touching the network; the weights are fitted on generated patches of the TRAINING
pairs to maximise the mean F1 (the paper's headline score) and kept in ``models/class_weights.json`` beside the
weights they were fitted for. ``--class_weights_file ""`` at inference gives the paper's argmax (docs/README.md
compares both)::

    python -m scripts.engines.class_weights --weights models/model.pt --dataset_dir <work_dir>/misalignment \
        --num_patches 48 --output models/class_weights.json
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import fire
import numpy as np

from scripts.engines.patch_prediction import predict_patches
from scripts.utils.atomic_write import atomic_write_text
from scripts.utils.class_decision import fit_class_weights
from scripts.utils.constants import CLASS_NAMES, LATENT_SIZE
from scripts.utils.file_digest import file_sha256

logger = logging.getLogger(__name__)


def write_class_weights(weights: str, labels: np.ndarray, probabilities: np.ndarray, fitted_on: dict, output: str):
    """Fit the class weights on training voxels ``labels [N]``, ``probabilities [N, 3]`` and write ``output`` with the
    sha256 of ``weights`` and what they were fitted on (``fitted_on`` plus voxel and class counts); returns the
    record.

    Args:
        weights: network checkpoint the weights are fitted for (its sha256 is recorded).
        labels: ``[N]`` true classes of the training voxels.
        probabilities: ``[N, 3]`` the network's probabilities at those voxels.
        fitted_on: description of the voxels (datalist, patches, seed, ...).
        output: JSON file to write.

    Returns:
        The written record (``weights``, ``classes``, ``weights_sha256``, ``fitted_on``, ``mean_f1_fitted``,
        ``mean_f1_argmax``).
    """
    class_weights, score, plain = fit_class_weights(labels, probabilities)
    record = {
        "weights": class_weights,
        "classes": list(CLASS_NAMES),
        "weights_sha256": file_sha256(weights),
        "fitted_on": {
            "split": "training",
            **fitted_on,
            "voxels": int(labels.size),
            "true_counts": np.bincount(labels, minlength=3).tolist(),
        },
        "mean_f1_fitted": score,
        "mean_f1_argmax": plain,
    }
    atomic_write_text(Path(output), json.dumps(record, indent=1))
    return record


def fit(
    weights: str = "models/model.pt",
    output: str = "models/class_weights.json",
    config_file: str = "configs/train.json",
    num_patches: int = 48,
    patches_per_pair: int = 8,
    seed: int = 4321,
    **overrides,
) -> dict:
    """Predict ``num_patches`` generated patches of the config's TRAINING pairs (``patches_per_pair`` from each, the
    training class balance) in eval mode, fit the class weights on their voxels and write ``output``.

    Args:
        weights: network checkpoint.
        output: JSON file to write.
        config_file: training config.
        num_patches: number of patches predicted.
        patches_per_pair: patches drawn per training pair.
        seed: seed of the patch draw.
        **overrides: further config ids and values, e.g. ``dataset_dir``.

    Returns:
        The written record (see ``write_class_weights``).
    """
    overrides = {
        "validate#patches#split": "training",
        "val_patches_per_pair": patches_per_pair,
        "val_num_patches": num_patches,
        "val_seed": seed,
        **overrides,
    }
    labels, probabilities = predict_patches(weights, config_file, **overrides)
    fitted_on = {
        "patches": int(labels.size // LATENT_SIZE**3),
        "seed": seed,
        "dataset_dir": str(overrides.get("dataset_dir", "")),
    }
    record = write_class_weights(weights, labels, probabilities, fitted_on, output)
    print(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(message)s")
    fire.Fire(fit, serialize=lambda record: None)
