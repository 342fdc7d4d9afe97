"""BatchNorm recalibration: running statistics become the average over the given batches; momenta are restored."""

import pytest
import torch
import torch.nn as nn

from scripts.engines.batchnorm_recalibration import recalibrate_batchnorm


def test_running_statistics_become_the_batch_average():
    net = nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2, momentum=0.01))
    batches = [torch.randn(2, 1, 4, 4, 4) * 3 + 5 for _ in range(4)]
    with torch.no_grad():
        features = [net[0](b) for b in batches]
    seen = recalibrate_batchnorm(net, batches, lambda network, batch: network(batch))
    assert seen == 4 and not net.training and net[1].momentum == 0.01
    expected_mean = torch.stack([f.mean(dim=(0, 2, 3, 4)) for f in features]).mean(0)
    torch.testing.assert_close(net[1].running_mean, expected_mean)
    expected_var = torch.stack([f.var(dim=(0, 2, 3, 4), unbiased=True) for f in features]).mean(0)
    torch.testing.assert_close(net[1].running_var, expected_var)


def test_empty_batches_are_a_clear_error():
    net = nn.Sequential(nn.BatchNorm3d(1))
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_batchnorm(net, [], lambda network, batch: network(batch))
