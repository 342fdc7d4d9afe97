"""A 3-D convolutional LSTM cell (Shi et al. 2015), as in the TensorFlow code the paper used; MONAI has none."""

from typing import Optional, Tuple

import torch
import torch.nn as nn


class ConvLSTM3dCell(nn.Module):
    """One 'same' 3-D convolution over ``concat(x, h)`` gives the gates i, j, f, o.

    ``c' = c * sigmoid(f + forget_bias) + sigmoid(i) * tanh(j)`` and ``h' = tanh(c') * sigmoid(o)``; the state
    starts at zero when none is given.
    """

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3, forget_bias: float = 1.0):
        super().__init__()
        self.hidden_channels = hidden_channels
        self.forget_bias = forget_bias
        self.gates = nn.Conv3d(
            in_channels + hidden_channels, 4 * hidden_channels, kernel_size, padding=kernel_size // 2, bias=True
        )

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
            shape = [x.shape[0], self.hidden_channels, x.shape[2], x.shape[3], x.shape[4]]
            h = torch.zeros(shape, dtype=x.dtype, device=x.device)
            c = torch.zeros(shape, dtype=x.dtype, device=x.device)
        else:
            h, c = state
        i, j, f, o = torch.chunk(self.gates(torch.cat([x, h], dim=1)), 4, dim=1)
        c = c * torch.sigmoid(f + self.forget_bias) + torch.sigmoid(i) * torch.tanh(j)
        h = torch.tanh(c) * torch.sigmoid(o)
        return h, c
