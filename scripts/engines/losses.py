"""Training losses: the paper's unconditional hierarchical cross-entropy (eq. 2) and RegNet's DVF loss.

Both take network outputs and targets as produced by the training pipeline: misalignment logits
``[B, steps, n_fine, D, H, W]`` with the 1 mm misalignment magnitude ``[B, 1, D, H, W]`` (mm), and RegNet
displacements ``[B, 3, D, H, W]`` (mm) with the true DVF of the same shape; spatial axes in the patches' order.
"""

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from scripts.utils.constants import CLASS_THRESHOLDS_MM


def step_labels(magnitude: torch.Tensor, edges: Sequence[float]) -> torch.Tensor:
    """Group index of every voxel for one step's thresholds ``edges`` (mm); an edge value belongs to the upper group.

    Same convention as ``scripts.networks.hierarchical_labels.hierarchical_labels`` (which takes a split name, not a
    decoder's edges).

    Args:
        magnitude: misalignment magnitudes, mm (any shape).
        edges: the step's thresholds, mm (sorted here).

    Returns:
        int64 tensor of the shape of ``magnitude`` with group indices ``0 .. len(edges)``.
    """
    boundaries = torch.tensor(sorted(edges), dtype=magnitude.dtype, device=magnitude.device)
    return torch.bucketize(magnitude, boundaries, right=True)


class HierarchicalCrossEntropyLoss(nn.Module):
    """Sum over steps of the NLL of the true group, group probability = sum of its fine-label probabilities.

    This is the "unconditional" loss of paper eq. 2: every step predicts the finest labels, step ``k`` is scored on
    the groups of its thresholds. A CNN decoder (1 step, 3 classes, identity grouping) gives plain cross-entropy.

    Args:
        step_edges: per step, the thresholds (mm) that make its groups (``decoder.step_edges``).
        step_groupings: per step, a 0/1 ``[n_groups, n_fine]`` matrix (``decoder.step_grouping(k)``).
        class_weights: optional weight of a voxel by its class (correct, poor, wrong: |e| against 3 and 6 mm), so
            that large output blocks, mostly correct, still teach the rare classes; every step's loss is then the
            weighted mean over voxels. None: the plain mean (the paper's).
    """

    def __init__(
        self,
        step_edges: Sequence[Sequence[float]],
        step_groupings: Sequence[torch.Tensor],
        class_weights: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        if len(step_edges) != len(step_groupings):
            raise ValueError(f"{len(step_edges)} steps of edges but {len(step_groupings)} grouping matrices")
        if class_weights is not None:
            weights = torch.as_tensor([float(w) for w in class_weights])
            if weights.shape != (len(CLASS_THRESHOLDS_MM) + 1,) or (weights <= 0).any():
                raise ValueError(
                    f"class_weights must be {len(CLASS_THRESHOLDS_MM) + 1} positive numbers, got {class_weights}"
                )
            self.register_buffer("class_weights", weights, persistent=False)
        else:
            self.class_weights = None
        self.step_edges = [tuple(float(e) for e in edges) for edges in step_edges]
        for k, (edges, matrix) in enumerate(zip(self.step_edges, step_groupings)):
            if matrix.ndim != 2 or matrix.shape[0] != len(edges) + 1:
                raise ValueError(f"step {k}: grouping {tuple(matrix.shape)} does not give {len(edges) + 1} groups")
            if not torch.all(matrix.sum(0) == 1):
                raise ValueError(f"step {k}: every fine label must belong to exactly one group")
            # log of the 0/1 membership: adding it to fine log-probabilities and taking logsumexp over the fine
            # axis gives log(group probability) without log(0) of an underflowed sum
            self.register_buffer(f"log_membership{k}", torch.log(matrix.float()), persistent=False)

    @classmethod
    def from_decoder(
        cls, decoder: nn.Module, class_weights: Optional[Sequence[float]] = None
    ) -> "HierarchicalCrossEntropyLoss":
        """The loss matching a ``scripts.networks.decoders.MisalignmentDecoder`` (its steps, edges and groupings).

        Args:
            decoder: the decoder (``step_edges``, ``num_steps``, ``step_grouping``).
            class_weights: optional weights of the classes correct, poor, wrong (three positive numbers).

        Returns:
            The ``HierarchicalCrossEntropyLoss``.
        """
        return cls(decoder.step_edges, [decoder.step_grouping(k) for k in range(decoder.num_steps)], class_weights)

    def step_losses(self, logits: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
        """Per-step mean NLL ``[steps]``; ``logits [B, steps, n_fine, D, H, W]``, ``magnitude [B, 1, D, H, W]`` mm.

        Args:
            logits: ``[B, steps, n_fine, D, H, W]`` logits.
            magnitude: ``[B, 1, D, H, W]`` or ``[B, D, H, W]`` true misalignment magnitude, mm.

        Returns:
            float32 tensor ``[steps]``.

        Raises:
            ValueError: when the shapes of ``logits`` and ``magnitude`` do not fit the loss or each other.
        """
        if logits.ndim != 6 or logits.shape[1] != len(self.step_edges):
            raise ValueError(f"expected logits [B, {len(self.step_edges)}, n_fine, D, H, W], got {tuple(logits.shape)}")
        if magnitude.ndim == logits.ndim - 1:
            magnitude = magnitude[:, 0]
        if magnitude.shape != logits.shape[:1] + logits.shape[3:]:
            raise ValueError(f"magnitude {tuple(magnitude.shape)} does not match logits {tuple(logits.shape)}")
        log_fine = F.log_softmax(logits.float(), dim=2)  # [B, S, F, D, H, W]
        weights = None
        if self.class_weights is not None:
            weights = self.class_weights[step_labels(magnitude, CLASS_THRESHOLDS_MM)]
            weights = weights / weights.sum()
        losses = []
        for k, edges in enumerate(self.step_edges):
            log_membership = self.get_buffer(f"log_membership{k}")  # [G, F]
            expanded = log_fine[:, k, None] + log_membership[None, :, :, None, None, None]  # [B, G, F, D, H, W]
            log_group = torch.logsumexp(expanded, dim=2)  # [B, G, D, H, W]
            if weights is None:
                losses.append(F.nll_loss(log_group, step_labels(magnitude, edges)))
            else:
                nll = F.nll_loss(log_group, step_labels(magnitude, edges), reduction="none")
                losses.append((nll * weights).sum())
        return torch.stack(losses)

    def forward(self, logits: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
        """Summed over steps, averaged over voxels and batch.

        Args:
            logits: ``[B, steps, n_fine, D, H, W]`` logits.
            magnitude: ``[B, 1, D, H, W]`` true misalignment magnitude, mm.

        Returns:
            Scalar tensor.
        """
        return self.step_losses(logits, magnitude).sum()


def bending_energy(dvf: torch.Tensor) -> torch.Tensor:
    """Mean over voxels and components of sum_ij (d2u/dxi dxj)^2, finite differences in voxel units.

    ``dvf [B, 3, D, H, W]``. Same stencils and value as MONAI's ``BendingEnergyLoss`` ([1, -2, 1] and the compact
    mixed 4-point stencil, interior voxels), written with tuple indexing: MONAI 1.6.1 indexes with lists, which
    torch deprecates with a warning on every call.
    """
    inner = (slice(1, -1),) * 3

    def shifted(**offsets: int) -> torch.Tensor:
        index = [slice(1 + offsets.get(f"a{a}", 0), dvf.shape[2 + a] - 1 + offsets.get(f"a{a}", 0)) for a in range(3)]
        return dvf[(slice(None), slice(None), *index)]

    centre = dvf[(slice(None), slice(None), *inner)]
    energy = torch.zeros_like(centre)
    for a in range(3):
        energy = energy + (shifted(**{f"a{a}": 1}) - 2 * centre + shifted(**{f"a{a}": -1})) ** 2
        for b in range(a + 1, 3):
            mixed = (
                shifted(**{f"a{a}": 1, f"a{b}": 1})
                - shifted(**{f"a{a}": 1, f"a{b}": -1})
                - shifted(**{f"a{a}": -1, f"a{b}": 1})
                + shifted(**{f"a{a}": -1, f"a{b}": -1})
            ) / 4.0
            energy = energy + 2 * mixed**2
    return energy.mean()


class RegNetLoss(nn.Module):
    """Huber(delta) on the displacement field plus ``bending_weight`` x bending energy of the prediction.

    docs/method.md section 4: delta 1, weight 0.1; ``bending_energy`` is in voxel units (mean over voxels, components).
    """

    def __init__(self, delta: float = 1.0, bending_weight: float = 0.1) -> None:
        super().__init__()
        self.huber = nn.HuberLoss(delta=delta)
        self.bending_weight = bending_weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``pred`` and ``target`` ``[B, 3, D, H, W]`` in mm.

        Args:
            pred: predicted DVF ``[B, 3, D, H, W]``, mm.
            target: true DVF of the same shape, mm.

        Returns:
            Scalar float32 tensor.

        Raises:
            ValueError: when the two shapes differ.
        """
        if pred.shape != target.shape:
            raise ValueError(f"predicted DVF {tuple(pred.shape)} and target DVF {tuple(target.shape)} differ in shape")
        pred = pred.float()
        return self.huber(pred, target.float()) + self.bending_weight * bending_energy(pred)
