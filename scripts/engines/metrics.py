"""Validation metrics for the misalignment network: voxel-level F1 per class, mean F1 and Cohen's kappa.

All come from one ignite ``ConfusionMatrix`` over correct/poor/wrong (3 classes), which also syncs across
processes under DDP. MONAI has no kappa metric; kappa is computed from the same confusion matrix (identical to
``sklearn.metrics.cohen_kappa_score`` on the voxels, without keeping every voxel as ignite's CohenKappa would).
"""

from typing import Callable, Dict, Mapping, Tuple

import torch
from ignite.metrics import ConfusionMatrix, DiceCoefficient, Metric, MetricsLambda

from scripts.networks.hierarchical_labels import misalignment_classes
from scripts.utils.constants import CLASS_NAMES

KEY_METRIC = "val_mean_f1"


def class_output(class_grouping: torch.Tensor) -> Callable[[Mapping], Tuple[torch.Tensor, torch.Tensor]]:
    """ignite ``output_transform``: evaluator output ``{"pred": logits, "label": magnitude}`` -> (probs, classes).

    ``logits [B, steps, n_fine, D, H, W]``: the last step's fine probabilities merged by ``class_grouping``
    ``[3, n_fine]`` give ``[B, 3, D, H, W]``; ``magnitude [B, 1, D, H, W]`` (mm) gives classes ``[B, D, H, W]``.
    """

    def transform(output: Mapping) -> Tuple[torch.Tensor, torch.Tensor]:
        logits, magnitude = output["pred"], output["label"]
        fine = torch.softmax(logits[:, -1].float(), dim=1)
        probs = torch.einsum("gf,bf...->bg...", class_grouping.to(fine.device), fine)
        return probs, misalignment_classes(magnitude[:, 0]).long()

    return transform


def cohen_kappa(cm: torch.Tensor) -> torch.Tensor:
    """Unweighted Cohen's kappa of a confusion matrix (rows: truth, columns: prediction); 0 when undefined."""
    cm = cm.double()
    total = cm.sum()
    observed = cm.diag().sum() / total
    expected = (cm.sum(0) * cm.sum(1)).sum() / total**2
    if expected >= 1:
        return torch.zeros((), dtype=torch.float64)
    return (observed - expected) / (1 - expected)


def misalignment_metrics(class_grouping: torch.Tensor) -> Tuple[Dict[str, Metric], Dict[str, Metric]]:
    """``(key_metric, additional_metrics)`` for a MONAI evaluator: mean F1 as key; per-class F1, kappa, accuracy.

    F1 of a class = Dice of its voxel masks (0 when the class is absent from both truth and prediction).
    """
    cm = ConfusionMatrix(num_classes=len(CLASS_NAMES), output_transform=class_output(class_grouping))
    f1 = DiceCoefficient(cm)
    additional: Dict[str, Metric] = {f"val_f1_{name}": f1[k] for k, name in enumerate(CLASS_NAMES)}
    additional["val_kappa"] = MetricsLambda(cohen_kappa, cm)
    additional["val_accuracy"] = MetricsLambda(lambda m: m.diag().sum() / m.sum(), cm.to(torch.double))
    return {KEY_METRIC: f1.mean()}, additional
