"""Whole-image misalignment inference: the 4/2/1 mm pyramid once, then 1 mm latent tiles with full context.

Every tile's encoders read their full window from the pyramid (the 4 mm encoder sees 404 mm around every voxel), so
a tiled map equals the network run on the whole image at once; only tiles whose written block touches the mask are
run. Voxels outside the mask get probability 0 for every class and label 0. Arrays are ``[B, C, z, y, x]``.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from monai.inferers import Inferer
from torch.nn.utils.fusion import fuse_conv_bn_eval
from tqdm import tqdm

from scripts.inferers.class_decision import apply_class_weights
from scripts.utils.encoder_windows import TILE_ALIGN  # latent tiles are 1 + 8k voxels
from scripts.utils.precision import AUTO, resolve_precision

logger = logging.getLogger(__name__)

PRECISIONS: Dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GRID_ALIGN = 4  # tile starts on a 4 mm sample, so every level's window is centred on one of its samples


def fold_batch_norm(module: nn.Module) -> nn.Module:
    """Fold every ``Conv3d -> BatchNorm3d`` pair of the ``nn.Sequential`` blocks of an eval-mode ``module`` into the
    convolution, in place (one pass less over memory per layer; same result up to rounding)."""
    for child in module.children():
        if isinstance(child, nn.Sequential):
            for i in range(len(child) - 1):
                conv, norm = child[i], child[i + 1]
                if isinstance(conv, nn.Conv3d) and isinstance(norm, nn.BatchNorm3d) and norm.track_running_stats:
                    child[i] = fuse_conv_bn_eval(conv, norm)
                    child[i + 1] = nn.Identity()
        fold_batch_norm(child)
    return module


class FusedConvReLU3d(nn.Module):
    """``relu(conv3d(x))`` in one oneDNN call (post-op fusion, one pass less over memory) on CPU; plain PyTorch
    elsewhere. Own module because PyTorch's eager API has no fused 3-D convolution + ReLU."""

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if x.device.type == "cpu" and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple):
            return torch.ops.mkldnn._convolution_pointwise(
                x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups, "relu", [], ""
            )
        return torch.relu(conv(x))


def fuse_conv_relu(module: nn.Module) -> nn.Module:
    """Replace every ``Conv3d -> [Identity] -> ReLU`` run inside ``nn.Sequential`` blocks by ``FusedConvReLU3d``."""
    if not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return module
    for child in module.children():
        if isinstance(child, nn.Sequential):
            items = list(child)
            for i, item in enumerate(items):
                if not isinstance(item, nn.Conv3d):
                    continue
                j = i + 1
                while j < len(items) and isinstance(items[j], nn.Identity):
                    j += 1
                if j < len(items) and isinstance(items[j], nn.ReLU):
                    child[i] = FusedConvReLU3d(item)
                    child[j] = nn.Identity()
        fuse_conv_relu(child)
    return module


class FastConvLSTM3dCell(nn.Module):
    """Inference form of ``scripts.networks.convlstm.ConvLSTM3dCell`` with the same weights and result: from the zero
    state
    only the input part of the gate convolution runs and the forget gate is skipped (``c = 0``); otherwise the
    input and hidden state are concatenated in one memory format (a mixed-format ``cat`` is slow on CPU)."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        gates: nn.Conv3d = cell.gates
        hidden = cell.hidden_channels
        self.hidden_channels = hidden
        self.forget_bias = float(cell.forget_bias)
        self.gates = gates
        inputs = gates.in_channels - hidden
        keep = torch.cat([torch.arange(0, 2 * hidden), torch.arange(3 * hidden, 4 * hidden)])  # i, j, o
        self.first = nn.Conv3d(
            inputs, 3 * hidden, gates.kernel_size, padding=gates.padding, bias=gates.bias is not None
        )
        with torch.no_grad():
            self.first.weight.copy_(gates.weight[keep, :inputs])
            if gates.bias is not None:
                self.first.bias.copy_(gates.bias[keep])
        self.first.to(device=gates.weight.device, dtype=gates.weight.dtype)

    def forward(
        self, x: torch.Tensor, state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Advance one step; returns the new ``(h, c)``.

        Args:
            x: input ``[B, C_in, D, H, W]``.
            state: previous ``(h, c)``, each ``[B, hidden_channels, D, H, W]``, or None for the zero state.

        Returns:
            Tuple ``(h, c)`` of tensors ``[B, hidden_channels, D, H, W]``.
        """
        if state is None:
            i, j, o = torch.chunk(self.first(x), 3, dim=1)
            c = torch.sigmoid(i) * torch.tanh(j)
        else:
            h, c = state
            stacked = torch.cat([x, h.contiguous(memory_format=_memory_format(x))], dim=1)
            i, j, f, o = torch.chunk(self.gates(stacked), 4, dim=1)
            c = c * torch.sigmoid(f + self.forget_bias) + torch.sigmoid(i) * torch.tanh(j)
        return torch.tanh(c) * torch.sigmoid(o), c


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def fast_lstm_cells(module: nn.Module) -> nn.Module:
    """Replace every ``ConvLSTM3dCell`` (by its attributes ``gates``, ``hidden_channels``, ``forget_bias``) by
    ``FastConvLSTM3dCell``."""
    for name, child in module.named_children():
        if type(child).__name__ == "ConvLSTM3dCell" and hasattr(child, "gates") and hasattr(child, "forget_bias"):
            setattr(module, name, FastConvLSTM3dCell(child))
        else:
            fast_lstm_cells(child)
    return module


def inference_copy(
    network: nn.Module, precision: str = "float32", channels_last: bool = True, fuse: bool = True
) -> nn.Module:
    """An eval-mode copy of ``network`` prepared for fast inference, same results up to rounding: BatchNorm folded
    into the convolutions, (with ``fuse``) convolution + ReLU fused and the ConvLSTM's zero-state step shortened,
    weights in ``precision`` ("float32" or "bfloat16"), channels-last-3d memory format.

    Args:
        network: network to copy (left unchanged).
        precision: "float32" or "bfloat16".
        channels_last: convert to the channels-last-3d memory format.
        fuse: fuse convolution + ReLU and use ``FastConvLSTM3dCell``.

    Returns:
        The prepared copy.

    Raises:
        ValueError: for an unknown ``precision``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {sorted(PRECISIONS)}")
    prepared = fold_batch_norm(copy.deepcopy(network).eval())
    if fuse:
        prepared = fast_lstm_cells(fuse_conv_relu(prepared))
    prepared = prepared.to(dtype=PRECISIONS[precision])
    if channels_last:
        prepared = prepared.to(memory_format=torch.channels_last_3d)
    return prepared


def axis_blocks(lo: int, hi: int, block_max: int) -> Tuple[List[int], int]:
    """Split ``[lo, hi)`` (``lo`` a multiple of 4) into equal blocks of at most ``block_max`` voxels, each a multiple
    of 4 long; returns the block starts and the block length (the last block may end past ``hi``).

    Args:
        lo: first voxel of the range (a multiple of 4).
        hi: end of the range (exclusive).
        block_max: largest block length, voxels.

    Returns:
        Tuple ``(starts, length)``: block start indices and the common block length.
    """
    count = math.ceil((hi - lo) / block_max)
    length = GRID_ALIGN * math.ceil((hi - lo) / count / GRID_ALIGN)
    return [lo + b * length for b in range(count)], length


def latent_size_for(block: int, halo: int) -> int:
    """Smallest latent tile ``1 + 8k`` holding a block and the decoder's halo on both sides.

    Args:
        block: block length, voxels.
        halo: decoder halo on each side, voxels.

    Returns:
        Tile edge ``1 + 8k``, voxels.
    """
    return 1 + TILE_ALIGN * math.ceil((block + 2 * halo - 1) / TILE_ALIGN)


class MisalignmentInferer(Inferer):
    """Tiled whole-image inference for ``scripts.networks.misalignment_net.MisalignmentNet``.

    Args:
        tile_size: latent tile edge at 1 mm (``1 + 8k``, halo included); memory grows with its cube (about 2.5 GB
            at 97 in bfloat16, see docs/README.md).
        precision: "float32", "bfloat16" (bf16 weights and activations, channels-last-3d) or "auto": bf16 where the
            device computes it natively (CPU AVX-512 BF16 / AMX, a bf16 GPU), float32 elsewhere
            (``scripts.utils.precision``).
        with_steps: also return the coarse class of every earlier LSTM step.
        progress: show a tqdm progress bar over the tiles.
        channels_last: use the channels-last-3d memory format (faster oneDNN convolutions on CPU).
        class_weights: ``[w_correct, w_poor, w_wrong]`` applied to the final probabilities
        (scripts.engines.class_weights),
            so labels = argmax(w * p); None: the paper's argmax. The earlier steps' classes are not weighted.
    """

    def __init__(
        self,
        tile_size: int = 97,
        precision: str = AUTO,
        with_steps: bool = True,
        progress: bool = True,
        channels_last: bool = True,
        class_weights: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        if tile_size < 1 + TILE_ALIGN or (tile_size - 1) % TILE_ALIGN != 0:
            raise ValueError(f"tile_size must be 1 + 8k (e.g. 65, 97, 129), got {tile_size}")
        if precision != AUTO and precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {sorted(PRECISIONS)} or {AUTO!r}")
        self.tile_size = tile_size
        self.precision = precision
        self.with_steps = with_steps
        self.progress = progress
        self.channels_last = channels_last
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        if self.class_weights is not None and (len(self.class_weights) != 3 or min(self.class_weights) <= 0):
            raise ValueError(f"class_weights must be 3 positive numbers, got {class_weights}")

    def plan(self, mask: torch.Tensor, halo: int) -> Tuple[List[Tuple[int, int, int]], Tuple[int, int, int]]:
        """Block starts (z, y, x) of the tiles to run for a ``[z, y, x]`` bool mask, and the block size per axis.

        Args:
            mask: bool ``[z, y, x]`` mask of the voxels to predict.
            halo: the network's decoder halo, voxels.

        Returns:
            Tuple ``(starts, size)``: block starts (z, y, x) of the tiles touching the mask and the block size
            (z, y, x); ``([], (0, 0, 0))`` for an empty mask.

        Raises:
            ValueError: when ``tile_size`` leaves no block inside the halo.
        """
        block_max = GRID_ALIGN * ((self.tile_size - 2 * halo) // GRID_ALIGN)
        if block_max < GRID_ALIGN:
            raise ValueError(f"tile_size {self.tile_size} leaves no room inside the decoder halo of {halo} voxels")
        nonzero = torch.nonzero(mask)
        if nonzero.numel() == 0:
            return [], (0, 0, 0)
        lower = (nonzero.min(dim=0).values // GRID_ALIGN * GRID_ALIGN).tolist()
        upper = (nonzero.max(dim=0).values + 1).tolist()
        axes = [axis_blocks(lo, hi, block_max) for lo, hi in zip(lower, upper)]
        size = tuple(length for _, length in axes)
        starts = [
            start
            for start in itertools.product(*[s for s, _ in axes])
            if mask[tuple(slice(b, b + n) for b, n in zip(start, size))].any()
        ]
        return starts, size  # type: ignore[return-value]

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: nn.Module, mask: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """``inputs [B, C, z, y, x]`` (fixed, moving; HU at 1 mm, LPS; for a residual-informed network then r in mm,
        ``C = network.in_channels``) -> probabilities ``[B, 3, z, y, x]`` (float32, 0 outside ``mask``); with
        ``with_steps`` a dict ``{"probabilities", "step_classes" [B, S-1, z, y, x] uint8}``.

        ``mask``: ``[B, 1, z, y, x]``, ``[B, z, y, x]`` or ``[z, y, x]``, nonzero where to predict (default: all).
        """
        net = getattr(network, "module", network)
        channels = getattr(net, "in_channels", 2)
        if inputs.shape[1] != channels:
            raise ValueError(
                f"the network takes {channels} input channels (fixed, moving"
                + (", the residual field r" if channels > 2 else "")
                + f"), the pair has {inputs.shape[1]}"
            )
        batch, spatial = inputs.shape[0], tuple(inputs.shape[2:])
        masks = self._masks(mask, batch, spatial, inputs.device)
        steps = net.decoder.num_steps - 1 if self.with_steps else 0
        probabilities = torch.zeros((batch, 3) + spatial, dtype=torch.float32, device=inputs.device)
        step_classes = torch.zeros((batch, steps) + spatial, dtype=torch.uint8, device=inputs.device)
        with torch.inference_mode():
            precision = resolve_precision(self.precision, inputs.device)
            prepared = inference_copy(net, precision, self.channels_last)
            dtype = PRECISIONS[precision]
            for b in range(batch):
                levels = net.pyramid(inputs[b : b + 1].float())  # the pair, and r if the encoders read it
                residual = inputs[b : b + 1, 2:].float() if channels > 2 else None
                starts, block = self.plan(masks[b], net.halo)
                latent = [latent_size_for(n, net.halo) for n in block]
                logger.info(
                    "misalignment map: %d tiles of %s latent voxels (blocks %s, z y x) over a %s grid, %s",
                    len(starts),
                    latent,
                    list(block),
                    list(spatial),
                    precision,
                )
                for start in tqdm(starts, desc="misalignment tiles", disable=not self.progress, leave=False):
                    center = [s - net.halo + (n - 1) // 2 for s, n in zip(start, latent)]
                    windows = [self._prepare(w, dtype) for w in net.tile_inputs(levels, center, latent)]
                    tile_residual = None
                    if residual is not None:
                        tile_residual = self._prepare(net.residual_tile(residual, center, latent), dtype)
                    logits = prepared.forward_tile(windows, tile_residual)
                    keep = [min(n, size - s) for s, n, size in zip(start, block, spatial)]
                    # a tile below the encoder's 25^3 minimum comes back larger, centred on the same point
                    lo = [(logits.shape[3 + a] - latent[a]) // 2 + net.halo for a in range(3)]
                    logits = logits[:, :, :, lo[0] : lo[0] + keep[0], lo[1] : lo[1] + keep[1], lo[2] : lo[2] + keep[2]]
                    logits = logits.float()
                    region = (b, slice(None)) + tuple(slice(s, s + k) for s, k in zip(start, keep))
                    probabilities[region] = apply_class_weights(net.probabilities(logits), self.class_weights)[0]
                    for k in range(steps):
                        fine = torch.softmax(logits[:, k], dim=1)
                        groups = torch.einsum("gf,bf...->bg...", net.decoder.step_grouping(k), fine)
                        step_classes[(b, k) + region[2:]] = groups.argmax(dim=1)[0].to(torch.uint8)
                probabilities[b] *= masks[b]
                step_classes[b] *= masks[b]
        if self.with_steps:
            return {"probabilities": probabilities, "step_classes": step_classes}
        return probabilities

    def _prepare(self, window: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        window = window.to(dtype)
        if self.channels_last:
            window = window.contiguous(memory_format=torch.channels_last_3d)
        return window

    @staticmethod
    def _masks(
        mask: Optional[torch.Tensor], batch: int, spatial: Sequence[int], device: torch.device
    ) -> List[torch.Tensor]:
        if mask is None:
            return [torch.ones(tuple(spatial), dtype=torch.bool, device=device)] * batch
        mask = torch.as_tensor(mask, device=device)
        if mask.ndim == 3:
            mask = mask[None]
        if mask.ndim == 5:
            mask = mask[:, 0]
        if tuple(mask.shape[1:]) != tuple(spatial) or mask.shape[0] != batch:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the image {(batch, *spatial)}")
        return [m != 0 for m in mask]
