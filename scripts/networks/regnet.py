"""RegNet "U-Net advanced" (Uadv) encoder and the full RegNet with its displacement head (docs/method.md section 3).

All convolutions are 3x3x3 'valid' with bias, followed by TF-style BatchNorm (eps 1e-3, momentum 0.99 in TF terms)
and ReLU. An input of ``101 + 4k`` voxels gives a latent map of ``25 + 4k`` (112 channels) and a displacement
field of ``21 + 4k``, so large regions are processed in one call.
"""

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from scripts.utils.constants import HU_OFFSET, HU_SCALE

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # PyTorch convention; TF's 0.99


class ConvBNAct(nn.Sequential):
    """``Conv3d(3^3, valid, bias) -> BatchNorm3d -> activation``, the RegNet building block."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1, act: str = "relu") -> None:
        activation = nn.ReLU(inplace=True) if act == "relu" else nn.ELU(inplace=True)
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size=3, dilation=dilation, bias=True),
            nn.BatchNorm3d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM),
            activation,
        )


def _stack(in_channels: int, widths: Sequence[int], dilation: int = 1) -> nn.Sequential:
    layers = []
    for width in widths:
        layers.append(ConvBNAct(in_channels, width, dilation=dilation))
        in_channels = width
    return nn.Sequential(*layers)


def center_crop(x: torch.Tensor, border: int) -> torch.Tensor:
    """Remove ``border`` voxels from each side of the three spatial axes.

    Args:
        x: ``[B, C, D, H, W]`` tensor.
        border: voxels removed on each side (0 returns ``x`` itself).

    Returns:
        Tensor ``[B, C, D - 2 border, H - 2 border, W - 2 border]`` (a view).
    """
    if border == 0:
        return x
    return x[:, :, border:-border, border:-border, border:-border]


def upsample_2n_plus_1(x: torch.Tensor) -> torch.Tensor:
    """RegNet's fixed trilinear up-sampling: ``n -> 2n + 1`` with out[2i+1] = x[i], ends replicated."""
    size = [2 * x.shape[2] - 1, 2 * x.shape[3] - 1, 2 * x.shape[4] - 1]
    x = F.interpolate(x, size=size, mode="trilinear", align_corners=True)
    return F.pad(x, [1, 1, 1, 1, 1, 1], mode="replicate")


class RegNetEncoder(nn.Module):
    """Uadv encoder: a 2-channel pair ``[B, 2, 101+4k, ...]`` -> latent ``[B, 112, 25+4k, ...]``; 737,430 parameters."""

    in_channels: int = 2
    out_channels: int = 112
    context: int = 38  # voxels lost on each side

    def __init__(self, in_channels: int = 2) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.conv1 = ConvBNAct(in_channels, 16)
        self.full_res = _stack(16, (20, 24, 28, 32, 32, 32))
        self.half_conv = ConvBNAct(16, 30)
        self.half_conv2 = ConvBNAct(30, 30)
        self.half_dilated_a = _stack(30, (32, 34, 36), dilation=2)
        self.half_dilated_b = ConvBNAct(36, 38, dilation=2)
        self.half_out = ConvBNAct(38 + 16, 40)
        self.quarter_convs = _stack(30, (40, 40))
        self.quarter_dilated = _stack(40, (42, 44, 46), dilation=2)
        self.quarter_mid = ConvBNAct(46 + 36, 46)
        self.quarter_out = ConvBNAct(46 + 16, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for size in x.shape[2:]:
            if size < 101 or size % 4 != 1:
                raise ValueError(f"RegNetEncoder needs spatial sizes 101 + 4k, got {list(x.shape[2:])}")
        c1 = self.conv1(x)
        c1_skip = center_crop(c1, 36)
        full = self.full_res(center_crop(c1, 31))

        r2 = self.half_conv(F.max_pool3d(c1, 2))
        r2c5 = self.half_dilated_a(self.half_conv2(center_crop(r2, 8)))
        half = upsample_2n_plus_1(self.half_dilated_b(r2c5))
        half = self.half_out(torch.cat([half, c1_skip], dim=1))

        quarter = self.quarter_dilated(self.quarter_convs(F.max_pool3d(r2, 2)))
        quarter = self.quarter_mid(torch.cat([upsample_2n_plus_1(quarter), center_crop(r2c5, 1)], dim=1))
        quarter = self.quarter_out(torch.cat([upsample_2n_plus_1(quarter), c1_skip], dim=1))
        return torch.cat([full, half, quarter], dim=1)


class RegNet(nn.Module):
    """Full RegNet: Uadv encoder + displacement head, ``[B, 2, 101+4k, ...] -> [B, 3, 21+4k, ...]`` mm.

    1,262,973 parameters. Used for pre-training each level (RegNet^4, ^2, ^1) and for the RegNet-t baseline.
    Input in HU, normalised inside as MisalignmentNet does, so the encoder weights transfer unchanged. The 3 output
    channels are the displacement in mm along the image axes in (x, y, z) order.
    """

    def __init__(self, in_channels: int = 2) -> None:
        super().__init__()
        self.encoder = RegNetEncoder(in_channels)
        self.head = nn.Sequential(
            ConvBNAct(112, 120, act="elu"),
            ConvBNAct(120, 50, act="elu"),
            nn.Conv3d(50, 3, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder((x + HU_OFFSET) / HU_SCALE))
