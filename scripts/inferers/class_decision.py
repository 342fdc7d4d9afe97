"""The class-weighted final decision: labels = argmax(w_c * p_c), with the weights read from
``models/class_weights.json`` (fitted by ``python -m scripts.engines.class_weights``; see there for why)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from scripts.utils.constants import CLASS_NAMES
from scripts.utils.file_digest import file_sha256

logger = logging.getLogger(__name__)


def apply_class_weights(probabilities: torch.Tensor, weights: Sequence[float] | None, dim: int = 1) -> torch.Tensor:
    """``probabilities`` (correct, poor, wrong along ``dim``) times ``weights``, renormalised; None: unchanged.
    Voxels whose probabilities are all 0 (outside the mask) stay 0.

    Args:
        probabilities: class probabilities, classes along ``dim``.
        weights: three class weights, or None.
        dim: the class axis.

    Returns:
        Tensor of the same shape and dtype.
    """
    if weights is None:
        return probabilities
    shape = [1] * probabilities.ndim
    shape[dim] = len(CLASS_NAMES)
    weighted = probabilities * torch.as_tensor(weights, dtype=probabilities.dtype, device=probabilities.device).view(
        shape
    )
    total = weighted.sum(dim=dim, keepdim=True)
    return torch.where(total > 0, weighted / total.clamp_min(torch.finfo(weighted.dtype).tiny), weighted)


def read_class_weights(path: str | Path, checkpoint: str | Path = "") -> list[float] | None:
    """The weights of a ``class_weights.json``; ``""`` gives None (the paper's argmax). A clear error names a missing
    or bad file; a file fitted for other weights than ``checkpoint`` is ignored with a warning (argmax).

    Args:
        path: class-weights JSON; "" for none.
        checkpoint: network weights the file must have been fitted for; "" skips the check.

    Returns:
        The three weights, or None (no file, or fitted for other weights).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when it is not a class-weights file or its weights are not three positive finite numbers.
    """
    if not str(path):
        return None
    path = Path(path)
    try:
        record = json.loads(path.read_text())
        weights = [float(w) for w in record["weights"]]
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: class-weights file not found (--class_weights_file '' for argmax)") from err
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a class-weights file ({type(err).__name__}: {err})") from err
    if len(weights) != len(CLASS_NAMES) or not all(np.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"{path}: expected {len(CLASS_NAMES)} positive finite weights, got {weights}")
    fitted_for = record.get("weights_sha256")
    if checkpoint and Path(checkpoint).is_file() and fitted_for != file_sha256(checkpoint):
        logger.warning(
            "%s was fitted for other weights than %s: ignored, labels are the plain argmax", path, checkpoint
        )
        return None
    return weights
