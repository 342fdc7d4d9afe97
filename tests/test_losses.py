"""Hierarchical cross-entropy (paper eq. 2) and the RegNet loss on hand-checkable inputs."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from scripts.engines.losses import HierarchicalCrossEntropyLoss, RegNetLoss, bending_energy, step_labels
from scripts.networks.decoders import HierarchicalLSTMDecoder, MultiScaleCNNDecoder, SingleScaleCNNDecoder
from scripts.networks.hierarchical_labels import SPLITS, hierarchical_labels


def _lstm_loss(split: str = "6-3-1") -> HierarchicalCrossEntropyLoss:
    return HierarchicalCrossEntropyLoss.from_decoder(HierarchicalLSTMDecoder(8, 4, split))


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_step_labels_match_hierarchical_labels(split):
    decoder = HierarchicalLSTMDecoder(8, 4, split)
    magnitude = torch.tensor([0.0, 0.99, 1.0, 2.5, 3.0, 5.9, 6.0, 11.0, 12.0, 20.0])
    expected = hierarchical_labels(magnitude, split)
    got = torch.stack([step_labels(magnitude, edges) for edges in decoder.step_edges])
    assert torch.equal(got, expected)


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_group_probabilities_sum_to_one(split):
    decoder = HierarchicalLSTMDecoder(8, 4, split)
    fine = torch.softmax(torch.randn(decoder.num_fine, 5), dim=0)
    for k in range(decoder.num_steps):
        grouping = decoder.step_grouping(k)
        assert torch.equal(grouping.sum(0), torch.ones(decoder.num_fine))  # each fine label in exactly one group
        assert torch.allclose((grouping @ fine).sum(0), torch.ones(5), atol=1e-6)


def test_uniform_logits_give_hand_computed_loss():
    loss = _lstm_loss("6-3-1")  # fine labels [0,1) [1,3) [3,6) [6,inf): uniform 1/4 each
    logits = torch.zeros(1, 3, 4, 2, 2, 2)
    small = torch.zeros(1, 1, 2, 2, 2)  # 0 mm: step 1 group {<6} = 3/4, step 2 {<3} = 1/2, step 3 {<1} = 1/4
    expected_small = -math.log(3 / 4) - math.log(1 / 2) - math.log(1 / 4)
    assert loss(logits, small).item() == pytest.approx(expected_small, rel=1e-6)
    large = torch.full((1, 1, 2, 2, 2), 7.0)  # >= 6 mm: 1/4 at every step
    assert loss(logits, large).item() == pytest.approx(3 * math.log(4), rel=1e-6)
    per_step = loss.step_losses(logits, small)
    assert per_step.tolist() == pytest.approx([-math.log(3 / 4), -math.log(1 / 2), -math.log(1 / 4)], rel=1e-6)


def test_mixed_voxels_are_averaged():
    loss = _lstm_loss("6-3-1")
    logits = torch.zeros(1, 3, 4, 1, 1, 2)
    magnitude = torch.tensor([0.0, 7.0]).reshape(1, 1, 1, 1, 2)
    expected = 0.5 * (-math.log(3 / 4) - math.log(1 / 2) - math.log(1 / 4)) + 0.5 * 3 * math.log(4)
    assert loss(logits, magnitude).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_perfect_prediction_gives_near_zero_loss(split):
    loss = _lstm_loss(split)
    decoder = HierarchicalLSTMDecoder(8, 4, split)
    magnitude = torch.tensor([0.5, 2.0, 4.0, 8.0, 13.0]).reshape(1, 1, 1, 1, 5)
    fine = step_labels(magnitude[:, 0], decoder.fine_edges)  # [1, 1, 1, 5]
    logits = 40.0 * F.one_hot(fine, decoder.num_fine).permute(0, 4, 1, 2, 3).float()  # [1, F, 1, 1, 5]
    logits = logits[:, None].expand(1, decoder.num_steps, -1, -1, -1, -1)
    assert loss(logits, magnitude).item() < 1e-6
    wrong = torch.roll(logits, shifts=1, dims=2)
    assert loss(wrong, magnitude).item() > 10.0


def test_cnn_decoders_reduce_to_cross_entropy():
    for decoder in (MultiScaleCNNDecoder(8, 3, (4,)), SingleScaleCNNDecoder(8, (4,))):
        loss = HierarchicalCrossEntropyLoss.from_decoder(decoder)
        logits = torch.randn(2, 1, 3, 3, 3, 3)
        magnitude = torch.rand(2, 1, 3, 3, 3) * 10
        classes = step_labels(magnitude[:, 0], (3.0, 6.0))
        assert loss(logits, magnitude).item() == pytest.approx(F.cross_entropy(logits[:, 0], classes).item(), rel=1e-5)


def test_loss_is_stable_for_extreme_logits_and_has_gradients():
    loss = _lstm_loss()
    logits = torch.tensor([-1e4, -1e4, -1e4, 1e4]).reshape(1, 1, 4, 1, 1, 1).repeat(1, 3, 1, 1, 1, 1)
    logits.requires_grad_(True)
    value = loss(logits, torch.zeros(1, 1, 1, 1, 1))
    value.backward()
    assert torch.isfinite(value) and value.item() > 1e3
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_shape_errors_are_clear():
    loss = _lstm_loss()
    with pytest.raises(ValueError, match="expected logits"):
        loss(torch.zeros(1, 2, 4, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2))
    with pytest.raises(ValueError, match="does not match"):
        loss(torch.zeros(1, 3, 4, 2, 2, 2), torch.zeros(1, 1, 3, 3, 3))


def test_regnet_loss_hand_values():
    loss = RegNetLoss()
    target = torch.zeros(1, 3, 5, 5, 5)
    assert loss(target.clone(), target).item() == 0.0
    # a linear (affine) field has no bending energy: only Huber counts, 0.5 * 0.5^2 in the quadratic zone
    assert loss(torch.full((1, 3, 5, 5, 5), 0.5), target).item() == pytest.approx(0.125)
    # |error| 2 > delta: linear zone, 1 * (2 - 0.5)
    assert loss(torch.full((1, 3, 5, 5, 5), 2.0), target).item() == pytest.approx(1.5)
    # u_x = a * i^2 along the first spatial axis: second difference 2a in one of 3 components, energy (2a)^2 / 3
    a = 0.1
    i = torch.arange(5.0).reshape(5, 1, 1).expand(5, 5, 5)
    pred = torch.zeros(1, 3, 5, 5, 5)
    pred[0, 0] = a * i**2
    huber = F.huber_loss(pred, target, delta=1.0).item()
    assert loss(pred, pred.clone()).item() == pytest.approx(0.1 * (2 * a) ** 2 / 3, rel=1e-5)
    assert loss(pred, target).item() == pytest.approx(huber + 0.1 * (2 * a) ** 2 / 3, rel=1e-5)
    with pytest.raises(ValueError, match="differ in shape"):
        loss(pred, torch.zeros(1, 3, 4, 4, 4))


def test_bending_energy_equals_monai():
    from monai.losses import BendingEnergyLoss

    dvf = torch.randn(2, 3, 6, 7, 5)
    with warnings.catch_warnings():  # MONAI 1.6.1 indexes with lists (deprecated by torch): why we have our own
        warnings.simplefilter("ignore")
        expected = BendingEnergyLoss()(dvf)
    assert bending_energy(dvf).item() == pytest.approx(expected.item(), rel=1e-5)


def test_class_weights_give_the_weighted_mean_over_voxels():
    """One correct (0 mm) and one wrong (7 mm) voxel, uniform logits: weights 1 and 3 give (l0 + 3 l7) / 4; equal
    weights give the plain mean; bad weights are refused."""
    logits = torch.zeros(1, 3, 4, 1, 1, 2)
    magnitude = torch.tensor([0.0, 7.0]).reshape(1, 1, 1, 1, 2)
    small, large = -math.log(3 / 4) - math.log(1 / 2) - math.log(1 / 4), 3 * math.log(4)
    decoder = HierarchicalLSTMDecoder(8, 4, "6-3-1")
    weighted = HierarchicalCrossEntropyLoss.from_decoder(decoder, class_weights=[1.0, 2.0, 3.0])
    assert weighted(logits, magnitude).item() == pytest.approx((small + 3 * large) / 4, rel=1e-6)
    equal = HierarchicalCrossEntropyLoss.from_decoder(decoder, class_weights=[2.0, 2.0, 2.0])
    assert equal(logits, magnitude).item() == pytest.approx(_lstm_loss()(logits, magnitude).item(), rel=1e-6)
    for bad in ([1.0, 2.0], [1.0, 0.0, 1.0]):
        with pytest.raises(ValueError, match="class_weights"):
            HierarchicalCrossEntropyLoss.from_decoder(decoder, class_weights=bad)
