"""Patch-centre sampling, pyramid patches and targets (scripts.data.patch_sampling) on synthetic pairs."""

import numpy as np
import pytest
import torch

from scripts.data.patch_sampling import (
    BalancedCentreSampler,
    MisalignmentPatchd,
    RandBalancedCentred,
    RegNetPatchd,
    candidate_centres,
    crop_with_background,
    magnitude_at,
    magnitude_classes,
    misalignment_sample,
    pair_pyramid,
)
from scripts.networks.hierarchical_labels import SPLITS, hierarchical_labels, step_edges
from scripts.transforms.artificial_dvf import upsample_dvf
from scripts.utils.constants import BACKGROUND_HU
from scripts.utils.encoder_windows import check_output_size, window_sizes

SHAPE = (72, 80, 88)  # 1 mm voxels (z, y, x)


@pytest.fixture(scope="module")
def pair():
    """A loaded pair as the dataset holds it: random images, a smooth coarse DVF ramping 0-12 mm along x."""
    rng = np.random.default_rng(0)
    fixed = rng.normal(0, 100, SHAPE).astype(np.float32)
    deformed = fixed + rng.normal(0, 5, SHAPE).astype(np.float32)
    coarse = np.zeros((3, 37, 41, 45), dtype=np.float32)  # covers the 1 mm grid with factor 2
    ramp = np.linspace(0, 12, coarse.shape[3], dtype=np.float32)
    coarse[0] = ramp[None, None, :]
    coarse[1] = 0.5 * np.sin(np.arange(coarse.shape[2]) / 4.0)[None, :, None]
    body = np.zeros(SHAPE, dtype=bool)
    body[4:-4, 4:-4, 4:-4] = True
    return {
        "pyramid": pair_pyramid(fixed, deformed),
        "dvf": coarse,
        "factor": 2,
        "body_mask": body,
        "lung_mask": body,
        "fixed": fixed,
    }


def test_candidate_centres_are_level_samples_inside_the_mask(pair):
    centres = candidate_centres(pair["body_mask"], margin=12)
    assert len(centres) > 0 and np.all(centres % 4 == 0)
    assert np.all(centres >= 12) and np.all(centres < np.array(SHAPE) - 12)
    assert pair["body_mask"][tuple(centres.T)].all()


def test_sampler_proportions_match_the_request(pair):
    centres = candidate_centres(pair["body_mask"], margin=12)
    magnitude = magnitude_at(pair["dvf"], 2, centres)
    sampler = BalancedCentreSampler(centres, magnitude, (0.6, 0.2, 0.2))
    _, classes = sampler.sample(np.random.RandomState(0), 4000)
    drawn = np.bincount(classes, minlength=3) / 4000
    np.testing.assert_allclose(drawn, [0.6, 0.2, 0.2], atol=0.03)  # tolerance: about 4 binomial standard deviations
    picked, classes = sampler.sample(np.random.RandomState(1), 500)
    np.testing.assert_array_equal(magnitude_classes(magnitude_at(pair["dvf"], 2, picked)), classes)


def test_sampler_drops_empty_classes_and_rejects_no_candidates():
    centres = np.zeros((5, 3), dtype=np.int64)
    sampler = BalancedCentreSampler(centres, np.array([1, 2, 7, 8, 9.0]), (0.6, 0.2, 0.2))
    np.testing.assert_allclose(sampler.effective_probabilities, [0.75, 0, 0.25])
    with pytest.raises(ValueError, match="no candidate"):
        BalancedCentreSampler(np.zeros((0, 3), dtype=np.int64), np.zeros(0), (0.6, 0.2, 0.2))


def test_crop_pads_with_background():
    volume = torch.arange(27, dtype=torch.float32).reshape(1, 3, 3, 3)
    crop = crop_with_background(volume, (0, 1, 2), size=5)
    assert crop.shape == (1, 5, 5, 5) and crop[0, 2, 2, 2] == volume[0, 0, 1, 2]
    assert crop[0, 0].eq(BACKGROUND_HU).all() and crop[0, 2, 2, 4] == BACKGROUND_HU


def test_misalignment_sample_shapes_centring_and_labels(pair):
    centres = RandBalancedCentred()
    centres.set_random_state(seed=0)
    dense = upsample_dvf(pair["dvf"], 2, SHAPE).numpy()
    dense_magnitude = np.sqrt((dense**2).sum(0))
    for _ in range(5):
        with_centre = centres(pair)
        z, y, x = with_centre["centre"]
        sample = MisalignmentPatchd()(with_centre)
        for s in (4, 2, 1):
            patch = sample[f"image_{s}mm"]
            assert patch.shape == (2, 101, 101, 101) and patch.dtype == torch.float32
            np.testing.assert_allclose(patch[:, 50, 50, 50], pair["pyramid"][s][:, z // s, y // s, x // s])
        assert sample["image_1mm"][0, 50, 50, 50] == pair["fixed"][z, y, x]  # channel 0 is the fixed image
        magnitude = sample["magnitude"]
        assert magnitude.shape == (1, 25, 25, 25) and magnitude.dtype == torch.float32
        expected = dense_magnitude[z - 12 : z + 13, y - 12 : y + 13, x - 12 : x + 13]
        np.testing.assert_allclose(magnitude[0].numpy(), expected, atol=1e-4)
        for split in SPLITS:  # labels from the loss' function match |u| bin by bin
            labels = hierarchical_labels(magnitude[0], split).numpy()
            for step, edges in enumerate(step_edges(split)):
                np.testing.assert_array_equal(labels[step], np.digitize(expected, edges))


def test_regnet_sample_targets(pair):
    dense = upsample_dvf(pair["dvf"], 2, SHAPE).numpy()
    with_centre = dict(pair, centre=np.array([36, 40, 44]))
    for level in (4, 2, 1):
        sample = RegNetPatchd(level)(with_centre)
        assert sample["image"].shape == (2, 101, 101, 101) and sample["dvf"].shape == (3, 21, 21, 21)
        idx = [np.clip(c + level * np.arange(-10, 11), 0, n - 1) for c, n in zip((36, 40, 44), SHAPE)]
        expected = dense[:, idx[0]][:, :, idx[1]][:, :, :, idx[2]]
        inside = [
            (c + level * np.arange(-10, 11) >= 0) & (c + level * np.arange(-10, 11) < n)
            for c, n in zip((36, 40, 44), SHAPE)
        ]
        sel = np.ix_(range(3), *[np.flatnonzero(m) for m in inside])
        np.testing.assert_allclose(sample["dvf"].numpy()[sel], expected[sel], atol=1e-4)
    with pytest.raises(ValueError):
        RegNetPatchd(3)


def test_uniform_centres_follow_the_regions_own_class_mix():
    centres = np.zeros((5, 3), dtype=np.int64)
    sampler = BalancedCentreSampler(centres, np.array([1, 2, 7, 8, 9.0]), "uniform")
    np.testing.assert_allclose(sampler.effective_probabilities, [0.4, 0, 0.6])
    with pytest.raises(ValueError, match="uniform"):
        BalancedCentreSampler(centres, np.array([1, 2, 7, 8, 9.0]), "balanced")


def test_larger_output_blocks_cut_the_encoder_windows_of_the_tiled_inferer(pair):
    """A 41^3 block reads the windows ``level_window`` gives the inferer's tiles; its centre 25^3 is the 25^3 sample."""
    assert window_sizes(25) == {4: 101, 2: 101, 1: 101}
    assert window_sizes(41) == {4: 101, 2: 101, 1: 117} and window_sizes(57) == {4: 101, 2: 105, 1: 133}
    for bad in (24, 33.5, 30, 17):
        with pytest.raises(ValueError, match="1 \\+ 8k"):
            check_output_size(bad)
    centre = [48, 48, 48]
    small = misalignment_sample(pair["pyramid"], pair["dvf"], 2, centre)
    large = misalignment_sample(pair["pyramid"], pair["dvf"], 2, centre, output_size=41)
    assert large["image_1mm"].shape == (2, 117, 117, 117) and large["magnitude"].shape == (1, 41, 41, 41)
    torch.testing.assert_close(large["image_1mm"][:, 8:-8, 8:-8, 8:-8], small["image_1mm"])
    torch.testing.assert_close(large["image_4mm"], small["image_4mm"])
    torch.testing.assert_close(large["magnitude"][:, 8:-8, 8:-8, 8:-8], small["magnitude"])
