"""Decoders from the three aligned latent maps to per-voxel misalignment logits (paper Fig. 3).

Every decoder returns logits ``[B, steps, n_fine, D, H, W]`` and carries ``step_edges`` (the thresholds in mm that
define each step's groups) and ``fine_edges``, so one loss and one post-processing serve them all.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from scripts.networks.convlstm import ConvLSTM3dCell
from scripts.networks.hierarchical_labels import (
    class_grouping_matrix,
    fine_edges,
    split_thresholds,
    step_edges,
    step_grouping_matrices,
)
from scripts.networks.regnet import BN_EPS, BN_MOMENTUM
from scripts.utils.constants import CLASS_THRESHOLDS_MM


class MisalignmentDecoder(nn.Module):
    """Base class: holds the fine-to-group matrices of each step and of the final 3 classes as buffers."""

    def __init__(
        self,
        steps: List[Tuple[float, ...]],
        fine: Tuple[float, ...],
        step_groupings: List[torch.Tensor],
        class_grouping: torch.Tensor,
    ) -> None:
        super().__init__()
        self.step_edges = [tuple(e) for e in steps]
        self.fine_edges = tuple(fine)
        self.num_steps = len(steps)
        self.num_fine = len(fine) + 1
        for k, matrix in enumerate(step_groupings):
            self.register_buffer(f"step{k}_grouping", matrix, persistent=False)
        self.register_buffer("class_grouping", class_grouping, persistent=False)

    def step_grouping(self, step: int) -> torch.Tensor:
        """``[n_groups, n_fine]`` 0/1 matrix of ``step``: group probability = matrix @ fine probabilities.

        The final correct/poor/wrong merge is the buffer ``class_grouping`` (``[3, n_fine]``)."""
        return self.get_buffer(f"step{step}_grouping")


def _cnn_head(in_channels: int, widths: Tuple[int, ...], out_channels: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    for width in widths:
        layers += [
            nn.Conv3d(in_channels, width, 3, padding=1),
            nn.BatchNorm3d(width, eps=BN_EPS, momentum=BN_MOMENTUM),
            nn.ReLU(inplace=True),
        ]
        in_channels = width
    layers.append(nn.Conv3d(in_channels, out_channels, 1))
    return nn.Sequential(*layers)


class HierarchicalLSTMDecoder(MisalignmentDecoder):
    """ConvLSTM read coarse to fine (L4, L2, L1), one softmax head per step over the finest labels."""

    def __init__(self, latent_channels: int = 112, hidden_channels: int = 16, split: str = "6-3-1") -> None:
        split_thresholds(split)  # fails early on an unknown split
        super().__init__(
            list(step_edges(split)), fine_edges(split), step_grouping_matrices(split), class_grouping_matrix(split)
        )
        self.split = split
        self.cell = ConvLSTM3dCell(latent_channels, hidden_channels)
        self.heads = nn.ModuleList([nn.Conv3d(hidden_channels, self.num_fine, 1) for _ in range(self.num_steps)])

    def forward(self, latents: List[torch.Tensor]) -> torch.Tensor:
        """``latents``: aligned ``[L4, L2, L1]``, each ``[B, C, D, H, W]`` -> logits ``[B, 3, n_fine, D, H, W]``."""
        state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        logits: List[torch.Tensor] = []
        for k, head in enumerate(self.heads):
            state = self.cell(latents[k], state)
            logits.append(head(state[0]))
        return torch.stack(logits, dim=1)


class MultiScaleCNNDecoder(MisalignmentDecoder):
    """Concatenate the aligned latent maps, convolve, predict the 3 classes (paper's multi-scale CNN)."""

    def __init__(self, latent_channels: int = 112, num_levels: int = 3, widths: Tuple[int, ...] = (64, 32)) -> None:
        eye = torch.eye(len(CLASS_THRESHOLDS_MM) + 1)
        super().__init__([CLASS_THRESHOLDS_MM], CLASS_THRESHOLDS_MM, [eye], eye)
        self.num_levels = num_levels
        self.head = _cnn_head(latent_channels * num_levels, tuple(widths), self.num_fine)

    def forward(self, latents: List[torch.Tensor]) -> torch.Tensor:
        """``latents``: the aligned maps it reads (``[L4, L2, L1]``, or ``[L1]`` alone) -> ``[B, 1, 3, D, H, W]``."""
        return self.head(torch.cat(latents, dim=1)).unsqueeze(1)


class SingleScaleCNNDecoder(MultiScaleCNNDecoder):
    """The multi-scale CNN reading only the 1 mm latent map L1 (paper's single-scale CNN)."""

    def __init__(self, latent_channels: int = 112, widths: Tuple[int, ...] = (64, 32)) -> None:
        super().__init__(latent_channels, num_levels=1, widths=widths)
