"""RegNet-t baseline: thresholds, composition of level fields, tile plan, the channel-0 warp, a random-weight run."""

import numpy as np
import pytest
import torch

from scripts.data.patch_sampling import pair_pyramid
from scripts.evaluation.regnet_t import (
    CONTEXT,
    displacement_classes,
    load_regnets,
    plan_tiles,
    regnet_t_displacement,
    total_displacement,
)
from scripts.networks.regnet import RegNet


class ConstantRegNet(torch.nn.Module):
    """Stands in for a RegNet: returns ``value`` (mm, x y z) everywhere and records its inputs."""

    def __init__(self, value) -> None:
        super().__init__()
        self.value = torch.tensor(value, dtype=torch.float32)
        self.inputs = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        size = [n - 2 * CONTEXT for n in x.shape[2:]]
        return self.value.reshape(1, 3, 1, 1, 1).expand(x.shape[0], 3, *size).clone()


def test_thresholds_at_3_and_6_mm():
    u = np.array([[0, 0, 2.9], [3, 0, 0], [0, 5.99, 0], [0, 0, -6], [3, 4, 5.0]])
    assert displacement_classes(u).tolist() == [0, 1, 1, 2, 2]


def test_exact_composition_and_sum_of_hand_made_fields():
    # level 4: x-displacement 0.1 * z (mm), level 2: zero, level 1: 2 mm along z (components are x, y, z)
    z4 = torch.arange(10, dtype=torch.float32) * 4
    r4 = torch.zeros(3, 10, 10, 10)
    r4[0] = 0.1 * z4[:, None, None]
    r2 = torch.zeros(3, 19, 19, 19)
    r1 = torch.zeros(3, 37, 37, 37)
    r1[2] = 2.0
    fields = [(r4, 4), (r2, 2), (r1, 1)]
    points = torch.tensor([[10.0, 12.0, 13.0], [20.5, 3.0, 30.0]])  # (z, y, x) mm
    exact = total_displacement(fields, points, "exact")
    assert torch.allclose(exact[:, 0], 0.1 * (points[:, 0] + 2.0), atol=1e-4)  # r4 read at x + r1(x)
    assert torch.allclose(exact[:, 2], torch.full((2,), 2.0))
    summed = total_displacement(fields, points, "sum")
    assert torch.allclose(summed[:, 0], 0.1 * points[:, 0], atol=1e-4)
    with pytest.raises(ValueError, match="compose"):
        total_displacement(fields, points, "average")


def test_tile_plan_only_reads_what_the_points_need():
    shapes = {4: (50, 50, 50), 2: (100, 100, 100), 1: (200, 200, 200)}
    plan = plan_tiles(np.array([[100.0, 100.0, 100.0]]), shapes, 61)
    assert plan[1] == [(61, 61, 61)]  # the one 1 mm tile holding the point
    assert 1 < len(plan[2]) < 27 and len(plan[4]) >= 1
    assert all(max(lo) < 100 for lo in plan[2])


def test_channel_zero_is_warped_by_the_coarser_levels():
    rng = np.random.default_rng(0)
    fixed = rng.normal(-500, 200, (48, 48, 48)).astype(np.float32)
    nets = {4: ConstantRegNet([0.0, 0.0, 4.0]), 2: ConstantRegNet([1.0, 0.0, 0.0]), 1: ConstantRegNet([0.0, 0.5, 0])}
    u = regnet_t_displacement(fixed, fixed.copy(), np.array([[20.0, 24.0, 24.0]]), nets, tile=25)
    assert u.shape == (1, 3) and np.allclose(u, [[1.0, 0.5, 4.0]], atol=1e-5)  # constants compose to their sum
    assert displacement_classes(u).tolist() == [1]
    level2 = pair_pyramid(fixed, fixed, (2,))[2][0]
    seen = nets[2].inputs[0][0, 0]  # channel 0 of the first 2 mm tile: input sample i is level sample i - CONTEXT
    # U = 4 mm along z = 2 samples at 2 mm: channel 0 at sample j shows the fixed level image at j + 2 (along z)
    inner = slice(CONTEXT, CONTEXT + 20)
    assert torch.allclose(seen[inner, inner, inner], level2[2:22, 0:20, 0:20], atol=1e-3)
    assert torch.equal(nets[2].inputs[0][0, 1, CONTEXT, CONTEXT, CONTEXT], level2[0, 0, 0])  # moving is not warped


@pytest.mark.slow
def test_random_weight_regnets_on_a_tiny_pair(tmp_path):
    nets = {s: RegNet().eval() for s in (4, 2, 1)}
    for net in nets.values():  # random weights give a near-constant field; shift the bias to a known size
        torch.nn.init.zeros_(net.head[-1].weight)
        torch.nn.init.constant_(net.head[-1].bias, 1.0)
    rng = np.random.default_rng(1)
    fixed = rng.normal(-600, 150, (44, 44, 44)).astype(np.float32)
    points = np.array([[22.0, 22.0, 22.0], [30.5, 10.0, 15.0]])
    u = regnet_t_displacement(fixed, np.roll(fixed, 2, axis=0), points, nets, tile=25)
    assert u.shape == (2, 3) and np.allclose(u, 3.0, atol=1e-4)  # three levels of 1 mm per component
    assert displacement_classes(u).tolist() == [1, 1]  # |u| = 5.2 mm: poor
    for factor, net in nets.items():
        torch.save(net.state_dict(), tmp_path / f"r{factor}.pt")
    loaded = load_regnets({s: tmp_path / f"r{s}.pt" for s in (4, 2, 1)})
    assert not loaded[1].training and torch.equal(loaded[1].head[-1].bias, torch.ones(3))
    fast = load_regnets({s: tmp_path / f"r{s}.pt" for s in (4, 2, 1)}, precision="bfloat16")
    assert next(fast[2].parameters()).dtype == torch.bfloat16  # BatchNorm folded, as the inference contract does
    with pytest.raises(FileNotFoundError, match="missing_1mm.pt"):
        load_regnets({4: tmp_path / "r4.pt", 2: tmp_path / "r2.pt", 1: tmp_path / "missing_1mm.pt"})
