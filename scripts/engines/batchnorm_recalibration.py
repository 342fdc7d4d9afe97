"""Re-estimate BatchNorm running statistics on training patches before a short training run's weights are shipped.

With the TensorFlow code's momentum (0.99; PyTorch 0.01) the running averages need thousands of iterations to
forget their initial values (mean 0, variance 1). After a short CPU training they are far from the data and the
eval-mode output is wrong, so the statistics are recomputed as a plain average over ``num_batches`` training
batches in train mode, without gradients, and the weights are written again (atomically)::

    python -m scripts.engines.batchnorm_recalibration --config_file configs/train.json --checkpoint C --output \
        models/model.pt
"""

from __future__ import annotations

import logging
from typing import Iterable

import fire
import torch
import torch.nn as nn
from monai.bundle import ConfigParser
from torch.nn.modules.batchnorm import _BatchNorm

from scripts.engines.checkpoints import atomic_torch_save, cpu_state_dict, load_network_weights

logger = logging.getLogger(__name__)


def recalibrate_batchnorm(network: nn.Module, batches: Iterable, forward) -> int:
    """Replace every BatchNorm's running mean/variance by the average over ``forward(network, batch)`` calls.

    Returns the number of batches seen; the network is left in eval mode with its momenta restored.

    Args:
        network: the network (modified in place).
        batches: iterable of inputs passed to ``forward``.
        forward: callable ``forward(network, batch)`` that runs the network on one batch.

    Returns:
        Number of batches seen.

    Raises:
        ValueError: when ``batches`` yields nothing.
    """
    norms = [m for m in network.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
    network.train()
    seen = 0
    with torch.no_grad():
        for batch in batches:
            forward(network, batch)
            seen += 1
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    network.eval()
    if seen == 0:
        raise ValueError("no batch to recalibrate BatchNorm on: the training dataset is empty")
    return seen


def run(
    config_file: str = "configs/train.json",
    checkpoint: str = "models/model.pt",
    output: str = "models/model.pt",
    num_batches: int = 10,
    **overrides,
) -> str:
    """Load ``checkpoint`` into the config's ``network_def``, recalibrate on ``train#dataloader``, write ``output``.

    ``checkpoint`` may be an exported state_dict or a trainer checkpoint (its ``network`` entry). Other keyword
    arguments override config ids as on the ``monai.bundle run`` command line (e.g. ``--dataset_dir D``).

    Args:
        config_file: training config.
        checkpoint: weights to load (state_dict or trainer checkpoint).
        output: state_dict file to write.
        num_batches: maximum number of training batches used.
        **overrides: config ids and values, e.g. ``dataset_dir``.

    Returns:
        ``output``.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(message)s")
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.update({k: v for k, v in overrides.items()})
    net: nn.Module = parser.get_parsed_content("network_def")
    load_network_weights(net, checkpoint)
    prepare_batch = parser.get_parsed_content("prepare_batch")
    loader = parser.get_parsed_content("train#dataloader")

    def batches():
        for k, data in enumerate(loader):
            if k >= num_batches:
                return
            yield prepare_batch(data, torch.device("cpu"))[0]

    def forward(network: nn.Module, inputs) -> None:
        if isinstance(inputs, (tuple, list)):
            network.forward_patches(*inputs)
        else:
            network(inputs)

    seen = recalibrate_batchnorm(net, batches(), forward)
    atomic_torch_save(cpu_state_dict(net), output)
    logger.info(f"BatchNorm statistics re-estimated on {seen} batches; wrote {output}")
    return output


if __name__ == "__main__":
    fire.Fire(run)
