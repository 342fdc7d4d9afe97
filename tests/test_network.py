"""Network tests: parameter counts and shapes of docs/method.md section 3, the ConvLSTM cell, decoders, alignment."""

import pytest
import torch
import torch.nn as nn

from scripts.networks.convlstm import ConvLSTM3dCell
from scripts.networks.decoders import HierarchicalLSTMDecoder, MultiScaleCNNDecoder, SingleScaleCNNDecoder
from scripts.networks.hierarchical_labels import SPLITS, num_fine_labels
from scripts.networks.misalignment_net import DECODERS, MisalignmentNet
from scripts.networks.regnet import RegNet, RegNetEncoder, upsample_2n_plus_1
from scripts.transforms.pyramid import num_level_samples, smooth_downsample
from scripts.utils.encoder_windows import level_window


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_the_paper():
    assert count(RegNetEncoder()) == 737_430
    assert count(RegNet()) == 1_262_973


def test_encoder_101_to_25_on_real_tensors():
    encoder = RegNetEncoder().eval()
    with torch.inference_mode():
        out = encoder(torch.randn(1, 2, 101, 101, 101))
    assert out.shape == (1, 112, 25, 25, 25)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("size,latent,dvf", [(101, 25, 21), (105, 29, 25), (205, 129, 125)])
def test_fully_convolutional_sizes(size, latent, dvf):
    with torch.device("meta"):  # shape arithmetic of the real layers without the arithmetic cost
        regnet = RegNet()
        x = torch.empty(1, 2, size, size, size)
        assert regnet.encoder(x).shape == (1, 112, latent, latent, latent)
        assert regnet(x).shape == (1, 3, dvf, dvf, dvf)


@pytest.mark.parametrize("size", [99, 100, 102, 103])
def test_encoder_rejects_sizes_that_are_not_101_plus_4k(size):
    with torch.device("meta"):
        with pytest.raises(ValueError, match="101 \\+ 4k"):
            RegNetEncoder()(torch.empty(1, 2, size, 101, 101))


def test_batchnorm_uses_tensorflow_settings():
    norms = [m for m in RegNet().modules() if isinstance(m, nn.BatchNorm3d)]
    assert norms and all(m.eps == 1e-3 and m.momentum == 0.01 for m in norms)


def test_upsample_2n_plus_1_is_the_fixed_regnet_kernel():
    x = torch.arange(4.0).view(1, 1, 4, 1, 1).expand(1, 1, 4, 3, 3).contiguous() ** 2  # 0, 1, 4, 9
    out = upsample_2n_plus_1(x)[0, 0, :, 1, 1]
    assert out.tolist() == [0.0, 0.0, 0.5, 1.0, 2.5, 4.0, 6.5, 9.0, 9.0]


def test_convlstm_cell_follows_the_tensorflow_equations():
    cell = ConvLSTM3dCell(in_channels=3, hidden_channels=2)
    x1, x2 = torch.randn(2, 1, 3, 4, 4, 4)
    h1, c1 = cell(x1)
    gates = cell.gates(torch.cat([x1, torch.zeros(1, 2, 4, 4, 4)], dim=1))
    i, j, f, o = gates.split(2, dim=1)
    expected_c = torch.sigmoid(i) * torch.tanh(j)  # zero initial state: the forget path vanishes
    torch.testing.assert_close(c1, expected_c)
    torch.testing.assert_close(h1, torch.tanh(expected_c) * torch.sigmoid(o))

    h2, c2 = cell(x2, (h1, c1))
    i, j, f, o = cell.gates(torch.cat([x2, h1], dim=1)).split(2, dim=1)
    expected_c2 = c1 * torch.sigmoid(f + 1.0) + torch.sigmoid(i) * torch.tanh(j)
    torch.testing.assert_close(c2, expected_c2)
    torch.testing.assert_close(h2, torch.tanh(expected_c2) * torch.sigmoid(o))
    assert not torch.allclose(h2, cell(x2)[0])  # the state carries information between steps


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_lstm_decoder_steps_and_groupings(split):
    decoder = HierarchicalLSTMDecoder(112, 8, split)
    latents = [torch.randn(2, 112, 5, 5, 5) for _ in range(3)]
    logits = decoder(latents)
    assert logits.shape == (2, 3, num_fine_labels(split), 5, 5, 5)
    fine = torch.softmax(logits, dim=2)
    for k in range(3):
        grouped = torch.einsum("gf,bf...->bg...", decoder.step_grouping(k), fine[:, k])
        assert grouped.shape[1] == len(decoder.step_edges[k]) + 1
        torch.testing.assert_close(grouped.sum(1), torch.ones(2, 5, 5, 5))
    assert decoder.class_grouping.shape == (3, num_fine_labels(split))


def test_cnn_decoders_predict_three_classes_in_one_step():
    latents = [torch.randn(1, 112, 5, 5, 5) for _ in range(3)]
    assert MultiScaleCNNDecoder()(latents).shape == (1, 1, 3, 5, 5, 5)
    assert SingleScaleCNNDecoder()(latents[-1:]).shape == (1, 1, 3, 5, 5, 5)


def test_unknown_decoder_or_split_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown decoder"):
        MisalignmentNet(decoder="transformer")
    with pytest.raises(ValueError, match="unknown LSTM split"):
        MisalignmentNet(split="5-2-1")


def test_pyramid_sample_j_is_centred_on_voxel_s_times_j():
    ramp = torch.arange(60.0).view(1, 1, 60, 1, 1).expand(1, 1, 60, 4, 4)
    for factor in (2, 4):
        level = smooth_downsample(ramp, factor)
        assert level.shape[2] == num_level_samples(60, factor)
        inner = level[0, 0, 2:-2, 0, 0]  # away from the replicated border the B-spline is exact on a ramp
        expected = factor * torch.arange(2, level.shape[2] - 2, dtype=torch.float32)
        torch.testing.assert_close(inner, expected)


class CroppingEncoder(nn.Module):
    """Stand-in encoder that maps input voxel i + 38 to output voxel i, as the valid convolutions do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1, 38:-38, 38:-38, 38:-38].expand(-1, 112, -1, -1, -1)


class CapturingDecoder(HierarchicalLSTMDecoder):
    def forward(self, latents):
        self.captured = latents
        return super().forward(latents)


@pytest.mark.parametrize("latent_size", [25, 33])
def test_latent_maps_of_all_levels_are_aligned_on_the_1mm_grid(latent_size):
    net = MisalignmentNet(hidden_channels=4).eval()
    net.encoders = nn.ModuleList([CroppingEncoder() for _ in range(3)])
    net.decoder = CapturingDecoder(112, 4)
    net.normalize = lambda x: x  # keep HU so the ramp stays readable
    shape = (1, 2, 120, 96, 104)
    zz, yy, xx = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape[2:]), indexing="ij")
    ramp = (zz + 0.5 * yy - 0.25 * xx).expand(shape).contiguous()  # linear, so smoothing keeps it exact
    center = [60, 48, 52]
    with torch.no_grad():
        net.forward_tile(net.tile_inputs(net.pyramid(ramp), center, [latent_size] * 3))
    half = latent_size // 2
    expected = ramp[0, 0, 60 - half : 60 + half + 1, 48 - half : 48 + half + 1, 52 - half : 52 + half + 1]
    for latent in net.decoder.captured:
        assert latent.shape[2:] == (latent_size,) * 3
        torch.testing.assert_close(latent[0, 0], expected, atol=1e-3, rtol=0)


def test_level_windows_are_valid_encoder_inputs_centred_on_the_tile():
    for latent_size in (9, 17, 25, 65, 129):
        for factor in (1, 2, 4):
            start, size = level_window(64, latent_size, factor)
            assert size >= 101 and size % 4 == 1
            assert start + size // 2 == 64 // factor


@pytest.mark.parametrize("decoder", DECODERS)
def test_network_def_contract(decoder):
    net = MisalignmentNet(decoder=decoder).eval()
    with torch.no_grad():
        pred = net(torch.rand(1, 2, 8, 9, 10) * 1000 - 1000)
    assert pred.shape == (1, 3, 8, 9, 10) and pred.dtype == torch.float32
    torch.testing.assert_close(pred.sum(1), torch.ones(1, 8, 9, 10))


def test_forward_patches_gives_logits_on_the_central_25_cube():
    net = MisalignmentNet().eval()
    patches = [torch.randn(1, 2, 101, 101, 101) * 300 for _ in range(3)]
    with torch.no_grad():
        logits = net.forward_patches(*patches)
    assert logits.shape == (1, 3, 4, 25, 25, 25)


@pytest.mark.slow
def test_network_is_torchscript_compatible():
    net = MisalignmentNet().eval()
    scripted = torch.jit.script(net)
    image = torch.rand(1, 2, 8, 8, 8) * 1000 - 1000
    with torch.no_grad():
        torch.testing.assert_close(scripted(image), net(image))
