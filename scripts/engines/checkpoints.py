"""Checkpoints for training: RegNet encoders as initialisation, resuming from the latest checkpoint, weight export.

Every checkpoint is checked against the network it is meant for before training starts, so a file from another
architecture fails with a message naming the file instead of a state_dict traceback half-way into a run.
"""

import logging
import re
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import ignite.distributed as idist
import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver

from scripts.engines.trainer import as_bool
from scripts.networks.misalignment_net import RESIDUAL_FEATURES
from scripts.utils.atomic_write import atomic_output

logger = logging.getLogger(__name__)

ENCODER_PREFIX = "encoder."  # RegNet.encoder's keys inside a RegNet state_dict
FIRST_LAYER = "conv1.0.weight"  # the RegNet encoder's first convolution, which an encoder reading r widens
_ITERATION = re.compile(r"iteration=(\d+)")


def cpu_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """``module.state_dict()`` as detached, contiguous CPU tensors (``torch.load(weights_only=True)`` anywhere)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def atomic_torch_save(obj: object, path: Union[str, Path]) -> Path:
    """``torch.save`` through ``scripts.utils.atomic_write.atomic_output`` (no half-written checkpoint on failure).

    Args:
        obj: object to save (e.g. a state_dict).
        path: destination file.

    Returns:
        ``path`` as a ``Path``.
    """
    with atomic_output(path) as temporary:
        torch.save(obj, temporary)
    return Path(path)


def load_state_dict_file(path: Union[str, Path]) -> Dict[str, object]:
    """Load a checkpoint file (weights only) into a dict, with an error naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and weights_only errors all mean "not a usable checkpoint"
        raise ValueError(f"checkpoint {path} could not be read as a PyTorch weights file: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"checkpoint {path} holds a {type(content).__name__}, not a state_dict")
    return content


def check_state_dict(state: Mapping[str, object], module: nn.Module, path: Union[str, Path], what: str) -> None:
    """Raise ValueError naming ``path`` unless ``state`` has exactly ``module``'s keys and tensor shapes.

    Args:
        state: state_dict to check.
        module: network it must fit.
        path: checkpoint file, named in the message.
        what: what ``module`` is, named in the message (e.g. "the 4 mm RegNet encoder").

    Raises:
        ValueError: listing missing keys, unexpected keys and shape mismatches.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if wrong_shape:
            details.append(f"{len(wrong_shape)} shape mismatches (e.g. {wrong_shape[:3]})")
        raise ValueError(f"checkpoint {path} does not fit {what} (another architecture?): {'; '.join(details)}")


def load_regnet_encoders(net: nn.Module, checkpoint_pattern: str) -> nn.Module:
    """Initialise ``net.encoders[k]`` from the RegNet checkpoint ``checkpoint_pattern.format(factor=net.factors[k])``.

    A missing file leaves that encoder at its random initialisation (with a warning); a file of another
    architecture raises ValueError. Returns ``net``.

    Args:
        net: misalignment network with ``factors`` and ``encoders``.
        checkpoint_pattern: path pattern with a ``{factor}`` field, e.g. ``models/regnet_{factor}mm.pt``.

    Returns:
        ``net``, initialised in place.

    Raises:
        ValueError: when a checkpoint cannot be read or does not fit its encoder.
    """
    for factor, encoder in zip(net.factors, net.encoders):
        path = Path(checkpoint_pattern.format(factor=factor))
        if not path.is_file():
            logger.warning(f"no RegNet checkpoint {path}: the {factor} mm encoder starts from random weights")
            continue
        state = load_state_dict_file(path)
        encoder_state = {k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
        first = encoder_state.get(FIRST_LAYER)
        if first is not None and first.shape[1] < encoder.in_channels:  # pair-only RegNet, encoder that reads r too
            encoder_state[FIRST_LAYER] = zero_extend_channels(first, encoder.in_channels)
        check_state_dict(encoder_state, encoder, path, f"the {factor} mm RegNet encoder")
        encoder.load_state_dict(encoder_state)
        logger.info(f"{factor} mm encoder initialised from {path}")
    return net


def zero_extend_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A convolution ``weight [out, c, ...]`` with zero weights appended for ``in_channels - c`` more inputs.

    Args:
        weight: convolution weight ``[out, c, ...]``.
        in_channels: number of input channels of the result (at least ``c``).

    Returns:
        Tensor ``[out, in_channels, ...]`` of ``weight``'s dtype and device.
    """
    zeros = weight.new_zeros((weight.shape[0], in_channels - weight.shape[1]) + tuple(weight.shape[2:]))
    return torch.cat([weight, zeros], dim=1)


def widen_for_residual(state: Mapping[str, torch.Tensor], net: nn.Module) -> Dict[str, torch.Tensor]:
    """A 2-channel (``residual_input="none"``) MisalignmentNet state_dict fitted to ``net``'s residual-informed decoder:
    zero weights for the residual features after each 112-channel latent map, and for r in the encoders' first layer
    (``residual_input="encoders"``), so ``net`` starts with the old network's output. Tensors that already fit are
    kept. Returns the new dict.

    Args:
        state: state_dict of the image-only network.
        net: residual-informed MisalignmentNet the state must fit.

    Returns:
        New state_dict (unchanged tensors are the same objects; ``residual_gate`` added as zeros if missing).
    """
    features = RESIDUAL_FEATURES
    blocks = 3 if getattr(net, "decoder_name", "lstm") == "multi_cnn" else 1
    expected = net.state_dict()
    out = dict(state)
    for key, value in state.items():
        target = expected.get(key)
        if not isinstance(value, torch.Tensor) or target is None or value.ndim != 5:
            continue
        if key.endswith(FIRST_LAYER) and target.shape[1] > value.shape[1]:  # r into an encoder
            out[key] = zero_extend_channels(value, target.shape[1])
            continue
        if target.shape[1] != value.shape[1] + features * blocks or target.shape[0] != value.shape[0]:
            continue
        zeros = value.new_zeros((value.shape[0], features) + tuple(value.shape[2:]))
        pieces = []
        for b in range(blocks):
            pieces += [value[:, b * 112 : (b + 1) * 112], zeros]
        out[key] = torch.cat(pieces + [value[:, blocks * 112 :]], dim=1)
    if "residual_gate" in expected and "residual_gate" not in out:  # older checkpoints: the gate starts at zero
        out["residual_gate"] = torch.zeros_like(expected["residual_gate"])
    return out


def load_network_weights(net: nn.Module, path: Union[str, Path] = "") -> nn.Module:
    """Initialise all of ``net`` from ``path`` (an exported state_dict or a trainer checkpoint; "" for none), e.g. to
    continue training the shipped ``models/model.pt`` in a fresh output folder on another machine. A residual-informed
    ``net`` also takes the weights of the image-only network (its residual inputs start at zero). Returns ``net``.

    Args:
        net: network to initialise.
        path: exported state_dict or trainer checkpoint (its ``network`` entry is used); "" leaves ``net`` as it is.

    Returns:
        ``net``, initialised in place.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file is not a readable state_dict or does not fit ``net``.
    """
    if not path:
        return net
    state = load_state_dict_file(path)
    state = state.get("network", state)
    if getattr(net, "residual_input", "none") != "none":
        widened = widen_for_residual(state, net)
        if any(widened[k] is not state[k] for k in state):
            logger.info(f"{path}: weights without some residual inputs; those start at zero")
        state = widened
    check_state_dict(state, net, path, type(net).__name__)
    net.load_state_dict(state)
    logger.info(f"network initialised from {path}")
    return net


def latest_checkpoint(directory: Union[str, Path]) -> Optional[Path]:
    """The ``*.pt`` file in ``directory`` with the highest ``iteration=N`` in its name (CheckpointSaver's naming)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = []
    for path in directory.glob("*.pt"):
        match = _ITERATION.search(path.name)
        if match:
            found.append((int(match.group(1)), path.stat().st_mtime, path))
    return max(found)[2] if found else None


def resumable_checkpoint(directory: Union[str, Path], network: nn.Module, key: str = "network") -> Optional[str]:
    """Path of the latest checkpoint in ``directory`` after checking ``checkpoint[key]`` fits ``network``; else None.

    Meant for ``CheckpointLoader(load_path=...)``, disabled when this returns None (a fresh run).

    Args:
        directory: checkpoint folder of the run.
        network: network the checkpoint must fit.
        key: entry of the checkpoint that holds the network's state_dict.

    Returns:
        Path of the latest checkpoint as a string, or None when there is none.

    Raises:
        ValueError: when the checkpoint has no ``key`` state_dict or it does not fit ``network``.
    """
    path = latest_checkpoint(directory)
    if path is None:
        logger.info(f"no checkpoint in {directory}: training starts from scratch")
        return None
    content = load_state_dict_file(path)
    if key not in content or not isinstance(content[key], Mapping):
        raise ValueError(f"checkpoint {path} has no '{key}' state_dict (keys: {sorted(content)})")
    try:
        check_state_dict(content[key], network, path, f"the configured {type(network).__name__}")
    except ValueError as error:
        hint = "resume with the settings it was trained with, or start afresh: --resume false or another --output_dir"
        raise ValueError(f"{error}; {hint}") from None
    logger.info(f"resuming from {path}")
    return str(path)


class ExportStateDict:
    """Handler: when the engine completes, write ``network``'s CPU state_dict to ``path`` (atomically, rank 0 only).

    The result is what ``configs/inference.json`` loads: ``torch.load(path, weights_only=True)`` gives a plain
    state_dict for the network definition (not a wrapper, not DDP).
    """

    def __init__(self, network: nn.Module, path: Union[str, Path]) -> None:
        self.network = network
        self.path = Path(path)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        network = self.network.module if isinstance(self.network, nn.parallel.DistributedDataParallel) else self.network
        atomic_torch_save(cpu_state_dict(network), self.path)
        logger.info(f"exported {type(network).__name__} weights to {self.path}")


class ResumableCheckpoints:
    """Handler: saves network, optimizer and trainer state every ``save_interval`` iterations (and on completion or
    an exception) with MONAI's CheckpointSaver, and resumes from the latest such checkpoint with CheckpointLoader.

    It adds the engine it is attached to as ``"trainer"`` to what is saved, which a config cannot reference
    without a cycle (the trainer's handlers would refer to the trainer). The latest checkpoint is checked against
    ``network`` when the handler is attached, i.e. when the trainer is built, before any training starts.
    """

    def __init__(
        self,
        directory: Union[str, Path],
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        save_interval: int = 10,
        resume: Union[bool, str] = True,
        map_location: Optional[Union[str, torch.device]] = None,
    ) -> None:
        if save_interval < 1:
            raise ValueError(f"save_interval must be >= 1 iteration, got {save_interval}")
        self.directory = Path(directory)
        self.network = network
        self.optimizer = optimizer
        self.save_interval = save_interval
        self.resume = as_bool(resume)
        self.map_location = map_location
        self.loaded_from: Optional[str] = None

    def attach(self, engine: Engine) -> None:
        objects = {"network": self.network, "optimizer": self.optimizer, "trainer": engine}
        if self.resume:
            self.loaded_from = resumable_checkpoint(self.directory, self.network)
            if self.loaded_from is not None:
                CheckpointLoader(self.loaded_from, objects, map_location=self.map_location).attach(engine)
        if idist.get_rank() == 0:
            saver = CheckpointSaver(
                str(self.directory),
                objects,
                save_final=True,
                save_interval=self.save_interval,
                epoch_level=False,
                n_saved=1,
            )
            saver.attach(engine)
