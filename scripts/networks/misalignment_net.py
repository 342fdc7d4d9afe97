"""The misalignment network: three RegNet encoders (4, 2, 1 mm) and a decoder, on one 1 mm grid.

``MisalignmentNet.forward`` is the bundle's ``network_def`` contract: one 1 mm tensor ``image`` (fixed, moving; HU;
with a ``residual_input`` three more channels: the re-registration's residual displacement r in mm, x y z) in,
per-voxel probabilities of correct/poor/wrong out, same spatial size, background beyond the image. ``forward_tile``
is the shared core: the training patches and the whole-image tiled inferer both call it.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from scripts.networks.decoders import (
    HierarchicalLSTMDecoder,
    MisalignmentDecoder,
    MultiScaleCNNDecoder,
    SingleScaleCNNDecoder,
)
from scripts.networks.regnet import RegNetEncoder
from scripts.transforms.pyramid import bspline_kernel_1d, smooth_downsample_with_kernel
from scripts.utils.constants import BACKGROUND_HU, HU_OFFSET, HU_SCALE
from scripts.utils.encoder_windows import TILE_ALIGN, level_window

DECODERS = ("lstm", "multi_cnn", "single_cnn")
RESIDUAL_INPUTS = ("none", "lstm", "lstm_prior", "encoders")
RESIDUAL_FEATURES = 6  # r / 10 mm (x, y, z), |r| / 3 mm and soft steps of |r| at 3 and 6 mm (see residual_features)
RESIDUAL_SCALE_MM = 10.0


def crop_with_padding(image: torch.Tensor, start: List[int], size: List[int], value: float) -> torch.Tensor:
    """``image[..., start:start+size]`` on the 3 spatial axes, filled with ``value`` outside the image.

    Args:
        image: ``[B, C, D, H, W]`` tensor.
        start: first index on each spatial axis (may be negative), z-y-x order.
        size: crop size on each spatial axis, voxels.
        value: fill value outside the image (e.g. background HU, or 0 for r).

    Returns:
        Tensor ``[B, C, *size]``.
    """
    pads: List[int] = []
    slices: List[Tuple[int, int]] = []
    for axis in range(3):
        n = image.shape[2 + axis]
        lo, hi = start[axis], start[axis] + size[axis]
        pads = [max(0, -lo), max(0, hi - n)] + pads  # F.pad lists the last axis first
        slices.append((max(lo, 0), min(hi, n)))
    out = image[:, :, slices[0][0] : slices[0][1], slices[1][0] : slices[1][1], slices[2][0] : slices[2][1]]
    if sum(pads) > 0:
        out = F.pad(out, pads, mode="constant", value=value)
    return out


class MisalignmentNet(nn.Module):
    """RegNet encoders at 4, 2 and 1 mm and a hierarchical ConvLSTM (default) or CNN decoder.

    Args:
        decoder: "lstm" (paper's proposal), "multi_cnn" or "single_cnn" (paper's baselines).
        split: LSTM thresholds, "6-3-1" (default), "12-6-3" or "6-3-3".
        hidden_channels: ConvLSTM hidden size (the paper leaves it open; 16 keeps the 1 mm decoder cheaper than
            the three encoders on CPU: 21 vs 58 GFLOP per 25^3 patch, where 32 costs 47).
        cnn_widths: channel widths of the CNN decoders' 3^3 convolutions.
        residual_input: "none" (the paper: fixed and moving image only) or "lstm": features of the re-registration's
            residual field r (``scripts.registration.reregistration``; ``residual_features``) are concatenated to the
            latent map of every decoder step, so the decoder starts from what a second registration found and the
            encoders add what it missed. "lstm_prior" also starts every step's fine-label logits from the log of soft
            |r| thresholds (the re-registration's own answer) and adds the decoder's logits scaled by a learnt per-step
            gate that starts at zero: the network begins as the estimator and learns corrections from the images.
            "encoders" is "lstm_prior" with r also read by every encoder (3 more input channels, r / 10 mm, down-sampled
            with the images' pyramid), so the trainable encoders can compare r with the images.
            ``scripts.engines.checkpoints.load_network_weights`` extends a "none" (or "lstm_prior") checkpoint with
            zeros for the new inputs.
    """

    def __init__(
        self,
        decoder: str = "lstm",
        split: str = "6-3-1",
        hidden_channels: int = 16,
        cnn_widths: Tuple[int, ...] = (64, 32),
        residual_input: str = "none",
    ) -> None:
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; choose one of {DECODERS}")
        if residual_input not in RESIDUAL_INPUTS:
            raise ValueError(f"unknown residual_input {residual_input!r}; choose one of {RESIDUAL_INPUTS}")
        self.decoder_name = decoder
        self.residual_input = residual_input
        self.in_channels = 2 if residual_input == "none" else 5
        latent_channels = 112 + (RESIDUAL_FEATURES if residual_input != "none" else 0)
        self.factors: List[int] = [1] if decoder == "single_cnn" else [4, 2, 1]
        self.encoder_channels = 5 if residual_input == "encoders" else 2  # channels of the pyramid and windows
        self.encoders = nn.ModuleList([RegNetEncoder(self.encoder_channels) for _ in self.factors])
        self.decoder: MisalignmentDecoder
        if decoder == "lstm":
            self.decoder = HierarchicalLSTMDecoder(latent_channels, hidden_channels, split)
        elif decoder == "multi_cnn":
            self.decoder = MultiScaleCNNDecoder(latent_channels, 3, tuple(cnn_widths))
        else:
            self.decoder = SingleScaleCNNDecoder(latent_channels, tuple(cnn_widths))
        self.residual_prior = residual_input in ("lstm_prior", "encoders")
        if self.residual_prior:  # no such key in the state_dict of the other variants
            self.residual_gate = nn.Parameter(torch.zeros(self.decoder.num_steps))
        else:
            self.register_parameter("residual_gate", None)
        self.register_buffer(
            "prior_edges", torch.tensor(self.decoder.fine_edges, dtype=torch.float32), persistent=False
        )
        reach = self.decoder.num_steps if decoder == "lstm" else len(cnn_widths)  # 'same' 3^3 convs in the decoder
        self.halo = 4 * ((reach + 3) // 4)  # 1 mm context a tile needs, a multiple of 4 to stay on every grid
        self.register_buffer("kernel_2mm", bspline_kernel_1d(2), persistent=False)
        self.register_buffer("kernel_4mm", bspline_kernel_1d(4), persistent=False)
        self.tile_align = TILE_ALIGN
        self.hu_offset, self.hu_scale, self.background_hu = HU_OFFSET, HU_SCALE, BACKGROUND_HU
        self.residual_scale_mm = RESIDUAL_SCALE_MM

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """HU to network input units: (HU + 1000) / 1000; channels after the pair (r, mm) to r / 10 mm."""
        if image.shape[1] == 2:
            return (image + self.hu_offset) / self.hu_scale
        return torch.cat([(image[:, :2] + self.hu_offset) / self.hu_scale, image[:, 2:] / self.residual_scale_mm], 1)

    def residual_features(self, residual: torch.Tensor) -> torch.Tensor:
        """``[B, 6, ...]`` decoder features of the residual field ``[B, 3, ...]`` (mm): r / 10 mm, |r| / 3 mm and
        sigmoid(2 (|r| - 3 mm)), sigmoid(2 (|r| - 6 mm)). The soft steps put the class thresholds within one linear
        layer of the residual, so the zero-initialised decoder weights of these inputs learn quickly (with |r| alone
        the first 120 iterations left the validation labels all "correct")."""
        magnitude = torch.linalg.vector_norm(residual, dim=1, keepdim=True)
        return torch.cat(
            [
                residual / self.residual_scale_mm,
                magnitude / 3.0,
                torch.sigmoid(2.0 * (magnitude - 3.0)),
                torch.sigmoid(2.0 * (magnitude - 6.0)),
            ],
            dim=1,
        )

    def forward_tile(self, level_inputs: List[torch.Tensor], residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B, steps, n_fine, n, n, n]`` for one 1 mm latent tile from its encoder windows (HU).

        ``level_inputs`` are the windows of ``level_window`` for the factors in ``self.factors`` (coarse to fine),
        all centred on one 1 mm point, with ``self.encoder_channels`` channels (the pair in HU, then r in mm); the
        tile size ``n`` is the 1 mm window's size minus 76. ``residual``: the residual field r ``[B, 3, n, n, n]``
        (mm) on the tile, required with any ``residual_input`` but "none".

        Args:
            level_inputs: windows ``[B, encoder_channels, ...]``, one per factor of ``self.factors`` (coarse to fine).
            residual: residual field ``[B, 3, n, n, n]`` (mm, x-y-z) on the tile, or None for ``residual_input="none"``.

        Returns:
            Logits ``[B, steps, n_fine, n, n, n]``.

        Raises:
            ValueError: when ``residual`` is missing for a residual-informed network, given to one with
                ``residual_input="none"``, or does not match the latent tile.
        """
        if residual is None and self.residual_input != "none":
            raise ValueError(
                "a residual-informed network needs the residual field r on the tile (the re-registration's)"
            )
        if residual is not None and self.residual_input == "none":
            raise ValueError("residual_input='none': this network takes no residual field")
        fine = level_inputs[-1]
        size = [fine.shape[2] - 76, fine.shape[3] - 76, fine.shape[4] - 76]
        latents: List[torch.Tensor] = []
        for k, encoder in enumerate(self.encoders):
            factor = self.factors[k]
            latent = encoder(self.normalize(level_inputs[k]))
            if factor > 1:
                keep = [(n - 1) // factor + 1 for n in size]
                b = [(latent.shape[2 + a] - keep[a]) // 2 for a in range(3)]
                latent = latent[:, :, b[0] : b[0] + keep[0], b[1] : b[1] + keep[1], b[2] : b[2] + keep[2]]
                latent = F.interpolate(latent, size=size, mode="trilinear", align_corners=True)
            latents.append(latent)
        if residual is not None:
            grow = [size[a] - residual.shape[2 + a] for a in range(3)]  # a tile below 25^3 comes back larger
            if min(grow) < 0 or grow[0] % 2 + grow[1] % 2 + grow[2] % 2 > 0:
                raise ValueError("the residual tile does not match the latent tile")
            if max(grow) > 0:
                pads = [grow[2] // 2, grow[2] // 2, grow[1] // 2, grow[1] // 2, grow[0] // 2, grow[0] // 2]
                residual = F.pad(residual, pads)
            features = self.residual_features(residual.to(latents[0].dtype))
            latents = [torch.cat([latent, features], dim=1) for latent in latents]
            gate_weights = self.residual_gate
            if gate_weights is not None:
                logits = self.decoder(latents)
                gate = gate_weights.to(logits.dtype).view(1, -1, 1, 1, 1, 1)
                return gate * logits + self.residual_log_prior(residual.float()).unsqueeze(1).to(logits.dtype)
        return self.decoder(latents)

    def residual_log_prior(self, residual: torch.Tensor) -> torch.Tensor:
        """``[B, n_fine, ...]`` log-probabilities of the fine labels from |r| alone: P(|e| >= t) = sigmoid(2 (|r| - t))
        at every fine edge t (mm), the thresholding a plain re-registration does, softened by 0.5 mm."""
        magnitude = torch.linalg.vector_norm(residual, dim=1, keepdim=True)
        at_least = torch.sigmoid(2.0 * (magnitude - self.prior_edges.view(1, -1, 1, 1, 1)))
        ones = torch.ones_like(magnitude)
        upper = torch.cat([ones, at_least], dim=1)
        lower = torch.cat([at_least, torch.zeros_like(magnitude)], dim=1)
        return torch.log((upper - lower).clamp_min(1e-4))

    def forward_patches(
        self,
        image_4mm: torch.Tensor,
        image_2mm: torch.Tensor,
        image_1mm: torch.Tensor,
        residual: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Training path: three ``[B, 2, 101, 101, 101]`` patches centred on one point (and the residual field
        ``[B, 3, 25, 25, 25]`` on its 25^3, for ``residual_input="lstm"``) -> logits on its 25^3.

        Args:
            image_4mm: ``[B, 2, 101, 101, 101]`` patch of the 4 mm level, HU.
            image_2mm: ``[B, 2, 101, 101, 101]`` patch of the 2 mm level, HU.
            image_1mm: ``[B, 2, 101, 101, 101]`` patch of the 1 mm level, HU.
            residual: ``[B, 3, 25, 25, 25]`` residual field (mm), or None for ``residual_input="none"``.

        Returns:
            Logits ``[B, steps, n_fine, 25, 25, 25]``.
        """
        levels = {4: image_4mm, 2: image_2mm, 1: image_1mm}
        return self.forward_tile([levels[f] for f in self.factors], residual)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Correct/poor/wrong probabilities ``[B, 3, ...]`` from the last step's fine labels."""
        fine = torch.softmax(logits[:, -1].float(), dim=1)
        return torch.einsum("gf,bf...->bg...", self.decoder.class_grouping, fine)

    def tile_inputs(self, levels: List[torch.Tensor], center: List[int], latent_size: List[int]) -> List[torch.Tensor]:
        """Encoder windows of one tile cut from the pyramid ``levels`` (the pair padded with background HU, r with
        zeros).

        Args:
            levels: the pyramid from ``pyramid``, ``[B, C, ...]`` per factor, coarse to fine.
            center: 1 mm voxel index of the tile centre, z-y-x order.
            latent_size: tile size on the 1 mm grid, z-y-x order, voxels.

        Returns:
            One window per factor in ``self.factors``, ``[B, C, ...]`` each (sizes from ``level_window``).
        """
        inputs: List[torch.Tensor] = []
        for k, factor in enumerate(self.factors):
            start: List[int] = []
            size: List[int] = []
            for a in range(3):
                s, n = level_window(center[a], latent_size[a], factor)
                start.append(s)
                size.append(n)
            window = crop_with_padding(levels[k][:, :2], start, size, self.background_hu)
            if levels[k].shape[1] > 2:
                window = torch.cat([window, crop_with_padding(levels[k][:, 2:], start, size, 0.0)], dim=1)
            inputs.append(window)
        return inputs

    def pyramid(self, image: torch.Tensor) -> List[torch.Tensor]:
        """The levels this network reads, coarse to fine, each down-sampled once from the 1 mm ``image`` (its first
        ``self.encoder_channels`` channels: the pair in HU, and r in mm for ``residual_input="encoders"``)."""
        image = image[:, : self.encoder_channels]
        out: List[torch.Tensor] = []
        for factor in self.factors:
            if factor == 4:
                out.append(smooth_downsample_with_kernel(image, self.kernel_4mm, 4))
            elif factor == 2:
                out.append(smooth_downsample_with_kernel(image, self.kernel_2mm, 2))
            else:
                out.append(image)
        return out

    def residual_tile(self, residual: torch.Tensor, center: List[int], latent_size: List[int]) -> torch.Tensor:
        """The residual field ``[B, 3, n, n, n]`` (mm) on one 1 mm latent tile, zero beyond the image.

        Args:
            residual: ``[B, 3, D, H, W]`` residual field on the 1 mm grid, mm.
            center: 1 mm voxel index of the tile centre, z-y-x order.
            latent_size: tile size, z-y-x order, voxels.

        Returns:
            Tensor ``[B, 3, *latent_size]``.
        """
        start = [c - (n - 1) // 2 for c, n in zip(center, latent_size)]
        return crop_with_padding(residual, start, latent_size, 0.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image [B, C, D, H, W]`` (fixed, moving; HU at 1 mm; then r in mm, x y z, if ``residual_input`` is not
        "none": ``C = self.in_channels``) -> probabilities ``[B, 3, D, H, W]`` (float32).

        The whole image is one tile; use ``scripts.inferers.misalignment_inferer.MisalignmentInferer`` for large
        volumes.
        """
        if image.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {image.shape[1]}")
        residual = image[:, 2:] if self.residual_input != "none" else None
        levels = self.pyramid(image)
        center: List[int] = []
        latent_size: List[int] = []
        for a in range(3):
            n = image.shape[2 + a] + 2 * self.halo
            n = n + (1 - n) % self.tile_align
            latent_size.append(n)
            center.append(-self.halo + (n - 1) // 2)
        tile_residual = None if residual is None else self.residual_tile(residual, center, latent_size)
        logits = self.forward_tile(self.tile_inputs(levels, center, latent_size), tile_residual)
        # a tile below the encoder's 25^3 minimum comes back larger, centred on the same point
        lo = [(logits.shape[3 + a] - latent_size[a]) // 2 + self.halo for a in range(3)]
        logits = logits[
            :, :, :, lo[0] : lo[0] + image.shape[2], lo[1] : lo[1] + image.shape[3], lo[2] : lo[2] + image.shape[4]
        ]
        return self.probabilities(logits)
