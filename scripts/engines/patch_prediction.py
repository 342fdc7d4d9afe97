"""Voxel-wise predictions of a misalignment weights file on the generated patches of a training config.

Shared by scripts.engines.patch_validation (scores on the held-out pair) and scripts.engines.class_weights (a fit on
training pairs):
both need every voxel's true class and probabilities, in eval mode, through the training config's patch pipeline.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.bundle import ConfigParser

from scripts.engines.checkpoints import load_network_weights
from scripts.engines.trainer import PatchTrainingNetwork
from scripts.networks.hierarchical_labels import misalignment_classes


def predict_patches(
    weights: str, config_file: str = "configs/train.json", threads: int = 0, **overrides
) -> tuple[np.ndarray, np.ndarray]:
    """True classes ``[N]`` and probabilities ``[N, 3]`` of every voxel of the config's ``validate#dataloader``
    patches, ``weights`` (exported state_dict or trainer checkpoint) loaded into ``network_def``, eval mode. Other
    keyword arguments override config ids as on the ``monai.bundle run`` command line (``--dataset_dir``, ...).

    Args:
        weights: network checkpoint (state_dict or trainer checkpoint).
        config_file: training config.
        threads: torch CPU threads; 0 leaves torch's setting.
        **overrides: config ids and values, e.g. ``dataset_dir``.

    Returns:
        Tuple ``(labels, probabilities)``: int ``[N]`` true classes and float32 ``[N, 3]``.

    Raises:
        ValueError: when the dataloader gives no patch.
    """
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
        split = parser.get("validate#patches#split", "validation")
        raise ValueError(f"{config_file}: the {split} split gave no patch (check --dataset_dir and its datalist)")
    return torch.cat(labels).numpy(), torch.cat(probabilities).numpy()
