"""Glue between the patch datasets and MONAI's SupervisedTrainer/SupervisedEvaluator.

``SupervisedTrainer`` calls ``inferer(inputs, network)`` with what ``prepare_batch`` returns. Here ``prepare_batch``
hands over the tuple of patches, ``AutocastInferer`` calls ``network(*patches)`` (optionally under bf16 autocast on
any device; MONAI's ``amp`` flag is CUDA-only), and ``PatchTrainingNetwork`` turns that call into
``MisalignmentNet.forward_patches`` so that DistributedDataParallel, which only hooks ``forward``, sees it.
"""

import logging
from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from ignite.engine import Engine
from ignite.handlers import ProgressBar
from monai.engines.utils import PrepareBatch
from monai.handlers import ValidationHandler
from monai.inferers import Inferer
from monai.utils import convert_to_tensor

from scripts.utils.precision import AUTO, resolve_precision

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def as_bool(value: Union[bool, str, int]) -> bool:
    """A config flag as a bool; accepts the strings "true"/"false" that a command-line override passes."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected a boolean flag (true/false), got {value!r}")
        return text in ("true", "1", "yes")
    return bool(value)


def to_device(
    module: nn.Module, device: Union[str, torch.device], channels_last: Union[bool, str] = False
) -> nn.Module:
    """``module`` moved to ``device``, its 5-D weights in channels-last order if ``channels_last`` (config helper).

    Args:
        module: network to move (in place).
        device: target device.
        channels_last: channels-last-3d memory format; a bool or a string such as "true".

    Returns:
        ``module``.
    """
    memory_format = torch.channels_last_3d if as_bool(channels_last) else torch.contiguous_format
    return module.to(device=device, memory_format=memory_format)


class PatchTrainingNetwork(nn.Module):
    """``forward(image_4mm, image_2mm, image_1mm)`` -> ``net.forward_patches`` logits ``[B, steps, n_fine, 25^3]``.

    With ``freeze_encoders`` the encoders get no gradient and keep their BatchNorm statistics (eval mode even while
    the trainer calls ``train()``): the paper's "frozen" setting. Checkpoints should save ``net``, not this wrapper.
    """

    def __init__(self, net: nn.Module, freeze_encoders: Union[bool, str] = False) -> None:
        super().__init__()
        self.net = net
        self.freeze_encoders = as_bool(freeze_encoders)
        if self.freeze_encoders:
            for parameter in self.net.encoders.parameters():
                parameter.requires_grad_(False)
            logger.info("encoders frozen: only the decoder is trained")

    def train(self, mode: bool = True) -> "PatchTrainingNetwork":
        super().train(mode)
        if self.freeze_encoders:
            self.net.encoders.eval()
        return self

    def forward(
        self,
        image_4mm: torch.Tensor,
        image_2mm: torch.Tensor,
        image_1mm: torch.Tensor,
        residual: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Three ``[B, 2, 101, 101, 101]`` HU patches (fixed, moving) centred on one point, and for a
        residual-informed network the residual field ``[B, 3, 25, 25, 25]`` (mm) on the output voxels.

        Args:
            image_4mm: ``[B, 2, 101, 101, 101]`` patch of the 4 mm level, HU.
            image_2mm: ``[B, 2, 101, 101, 101]`` patch of the 2 mm level, HU.
            image_1mm: ``[B, 2, 101, 101, 101]`` patch of the 1 mm level, HU.
            residual: ``[B, 3, 25, 25, 25]`` residual field (mm), or None.

        Returns:
            Logits ``[B, steps, n_fine, 25, 25, 25]``.
        """
        return self.net.forward_patches(image_4mm, image_2mm, image_1mm, residual)


class PrepareKeysBatch(PrepareBatch):
    """``prepare_batch`` returning ``(inputs, target)``: a tensor for one input key, a tuple for several.

    E.g. ``input_keys=("image_4mm", "image_2mm", "image_1mm"), target_key="magnitude"`` for the misalignment
    network, ``input_keys="image", target_key="dvf"`` for RegNet.
    """

    def __init__(self, input_keys: Union[str, Sequence[str]], target_key: str) -> None:
        self.input_keys = (input_keys,) if isinstance(input_keys, str) else tuple(input_keys)
        self.single = isinstance(input_keys, str)
        self.target_key = target_key

    def __call__(
        self,
        batchdata: dict,
        device: Optional[Union[str, torch.device]] = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> Tuple[Union[torch.Tensor, Tuple[torch.Tensor, ...]], torch.Tensor]:
        missing = [k for k in self.input_keys + (self.target_key,) if k not in batchdata]
        if missing:
            raise KeyError(f"batch has no {missing}; it has {sorted(map(str, batchdata))}")

        def move(key: str) -> torch.Tensor:
            tensor = convert_to_tensor(batchdata[key], track_meta=False)
            return tensor.to(device=device, non_blocking=non_blocking, **kwargs)

        inputs = tuple(move(k) for k in self.input_keys)
        return (inputs[0] if self.single else inputs), move(self.target_key)


class AutocastInferer(Inferer):
    """Calls ``network(*inputs)`` (or ``network(inputs)`` for one tensor), under autocast when ``dtype`` is set.

    ``dtype``: None (full precision), "bfloat16", "float16" or "auto" (bf16 where the inputs' device computes it
    natively, ``scripts.utils.precision``; full precision elsewhere); autocast uses the inputs' device type, so bf16
    works on CPU as well as on GPU. The loss should cast the output to float32 (``scripts.engines.losses`` does).
    ``channels_last``: pass 5-D inputs in channels-last memory order (oneDNN's fast path on CPU; give the network
    the same order with ``network.to(memory_format=torch.channels_last_3d)``).
    """

    def __init__(self, dtype: Optional[str] = None, channels_last: Union[bool, str] = False) -> None:
        super().__init__()
        self.memory_format = torch.channels_last_3d if as_bool(channels_last) else torch.contiguous_format
        self.auto = dtype == AUTO  # resolved per call, by the inputs' device
        if dtype in (None, "", "none", "float32", AUTO):
            self.dtype = None
        elif dtype in AUTOCAST_DTYPES:
            self.dtype = AUTOCAST_DTYPES[dtype]
        else:
            raise ValueError(f"autocast dtype must be one of None, {AUTO!r}, {sorted(AUTOCAST_DTYPES)}; got {dtype!r}")

    def __call__(self, inputs: Any, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        tensors = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
        tensors = tuple(t.contiguous(memory_format=self.memory_format) if t.ndim == 5 else t for t in tensors)
        device_type = tensors[0].device.type
        dtype = self.dtype
        if self.auto and resolve_precision(AUTO, tensors[0].device) == "bfloat16":
            dtype = torch.bfloat16
        with torch.autocast(device_type=device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return network(*tensors, *args, **kwargs)


class IterationValidationHandler(ValidationHandler):
    """``ValidationHandler`` that passes the trainer's iteration (not its epoch) to the evaluator.

    With ``epoch_level=False`` validation runs every ``interval`` iterations; the evaluator's epoch, which its
    StatsHandler, TensorBoardStatsHandler and best-metric bookkeeping use, is then the trainer iteration.
    """

    def __call__(self, engine: Engine) -> None:
        if self.validator is None:
            raise RuntimeError("please set validator in __init__() or call `set_validator()` before training.")
        self.validator.run(engine.state.iteration)


class LossProgressBar:
    """ignite ``ProgressBar`` showing the running iteration loss; a handler object with ``attach(engine)`` as MONAI's
    workflows expect (ignite's own ``attach`` needs the output transform as an argument)."""

    def __init__(self, loss_key: str = "loss", persist: bool = True) -> None:
        self.loss_key = loss_key
        self.bar = ProgressBar(persist=persist)

    def attach(self, engine: Engine) -> None:
        self.bar.attach(engine, output_transform=lambda output: {self.loss_key: float(output[self.loss_key].detach())})
