"""The residual-informed network: its input contract, widening image-only weights, the registered-pair
patches, and one training iteration of configs/train_residual.json on a tiny registered-pair folder."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from scripts.data.registered_patches import RegisteredPatchDataset, read_registered_datalist
from scripts.engines.checkpoints import load_network_weights
from scripts.networks.misalignment_net import MisalignmentNet
from tests.conftest import REPO_ROOT
from tests.helpers.chest_phantom import chest_phantom_arrays

SHIFT_MM = np.array([4.0, 0.0, 0.0])  # the exact residual e of the tiny pair: 4 mm along x ("poor")


def write_vector(field: np.ndarray, path: Path) -> str:
    image = sitk.GetImageFromArray(np.moveaxis(field, 0, -1).astype(np.float32), isVector=True)
    sitk.WriteImage(image, str(path))
    return str(path)


def registered_pairs_folder(root: Path, with_estimate: bool = True) -> Path:
    """A registered-pairs folder as ``registered_pairs make`` + ``estimate`` write it: one training and one validation
    pair of a 1 mm phantom, D = F shifted by 4 mm, e = 4 mm everywhere, r = e + noise."""
    root.mkdir(parents=True, exist_ok=True)
    hu, body, lung = chest_phantom_arrays((72, 72, 72), seed=0)
    datalist = {"training": [], "validation": []}
    for split, index in (("training", 0), ("validation", 1)):
        stem = root / f"pair_{index}"
        files = {}
        for key, array in (
            ("fixed", hu),
            ("registered", np.roll(hu, 4, axis=2)),
            ("body_mask", body),
            ("lung_mask", lung),
        ):
            sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.int16)), f"{stem}_{key}.nii.gz")
            files[key] = f"{stem.name}_{key}.nii.gz"
        truth = np.broadcast_to(SHIFT_MM[:, None, None, None], (3,) + hu.shape)
        files["residual_true"] = Path(write_vector(truth, Path(f"{stem}_residual_true.nii.gz"))).name
        record = {**files, "scan": f"phantom_{split}", "index": 0}
        if with_estimate:
            noisy = truth + np.random.default_rng(index).normal(0, 0.5, truth.shape)
            record["residual_estimate"] = {
                "path": Path(write_vector(noisy, Path(f"{stem}_residual_estimate.nii.gz"))).name
            }
        datalist[split].append(record)
    (root / "datalist.json").write_text(json.dumps(datalist))
    return root


def train_residual_workflow(tmp_path: Path, **overrides) -> ConfigWorkflow:
    """configs/train.json + configs/train_residual.json on a tiny registered-pair folder, from image-only single-CNN
    weights, one epoch of one patch per pair unless ``overrides`` say otherwise."""
    folder = registered_pairs_folder(tmp_path / "registered")
    torch.manual_seed(0)
    torch.save(MisalignmentNet(decoder="single_cnn").state_dict(), tmp_path / "image_only.pt")
    settings = dict(
        patches_per_pair=1,
        val_patches_per_pair=1,
        val_num_patches=1,
        batch_size=1,
        max_epochs=1,
        val_interval=1,
        ckpt_interval=1,
    )
    return ConfigWorkflow(
        config_file=[str(REPO_ROOT / "configs" / "train.json"), str(REPO_ROOT / "configs" / "train_residual.json")],
        meta_file=str(REPO_ROOT / "configs" / "metadata.json"),
        logging_file=str(REPO_ROOT / "configs" / "logging.conf"),
        workflow_type="train",
        bundle_root=str(tmp_path),
        dataset_dir=str(folder),
        init_weights=str(tmp_path / "image_only.pt"),
        decoder="single_cnn",
        **{**settings, **overrides},
    )


def test_forward_takes_the_residual_channels_and_checks_them():
    net = MisalignmentNet(decoder="single_cnn", residual_input="lstm").eval()
    assert net.in_channels == 5 and MisalignmentNet().in_channels == 2
    with torch.no_grad():
        assert net(torch.full((1, 5, 9, 9, 9), -500.0)).shape == (1, 3, 9, 9, 9)
        with pytest.raises(ValueError, match="5 input channels"):
            net(torch.zeros(1, 2, 9, 9, 9))
    with pytest.raises(ValueError, match="unknown residual_input"):
        MisalignmentNet(residual_input="encoder")


@pytest.mark.slow
def test_image_only_weights_widen_to_the_same_prediction(tmp_path):
    """Zero weights for the residual features: the widened network predicts what the image-only one did, whatever r
    is; a checkpoint of another architecture still fails with its file name."""
    torch.manual_seed(0)
    image_only = MisalignmentNet(hidden_channels=4).eval()
    torch.save(image_only.state_dict(), tmp_path / "image_only.pt")
    widened = load_network_weights(
        MisalignmentNet(hidden_channels=4, residual_input="lstm"), tmp_path / "image_only.pt"
    )
    image = torch.randn(1, 2, 9, 9, 9) * 300
    with torch.no_grad():
        expected = image_only(image)
        for r in (torch.zeros(1, 3, 9, 9, 9), torch.randn(1, 3, 9, 9, 9) * 8):
            torch.testing.assert_close(widened.eval()(torch.cat([image, r], 1)), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="image_only.pt"):
        load_network_weights(MisalignmentNet(hidden_channels=8, residual_input="lstm"), tmp_path / "image_only.pt")


def test_registered_patches_target_the_exact_residual_and_carry_the_estimate(tmp_path):
    folder = registered_pairs_folder(tmp_path / "registered")
    patches = RegisteredPatchDataset(folder / "datalist.json", patches_per_pair=3, seed=0)
    samples = list(patches)
    assert len(samples) == len(patches) == 3
    for sample in samples:
        assert sample["image_1mm"].shape == (2, 101, 101, 101) and sample["residual"].shape == (3, 25, 25, 25)
        torch.testing.assert_close(sample["magnitude"], torch.full((1, 25, 25, 25), 4.0))
        assert abs(float(sample["residual"][0].mean()) - 4.0) < 0.1 and float(sample["residual"][1:].abs().mean()) < 1
    weighted = RegisteredPatchDataset(
        folder / "datalist.json", patches_per_pair=4, scan_weights={"phantom_training": 0.5}
    )
    assert len(weighted) == 2


def test_registered_datalist_errors_name_the_pair(tmp_path):
    folder = registered_pairs_folder(tmp_path / "no_estimate", with_estimate=False)
    with pytest.raises(ValueError, match="registered_pairs estimate"):
        read_registered_datalist(folder / "datalist.json")
    folder = registered_pairs_folder(tmp_path / "missing")
    (folder / "pair_0_registered.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="pair_0_registered"):
        read_registered_datalist(folder / "datalist.json")
    with pytest.raises(FileNotFoundError, match="registered_pairs make"):
        read_registered_datalist(tmp_path / "nowhere" / "datalist.json")


@pytest.mark.parametrize(
    "overrides",
    [{}, {"output_size": 41, "class_probabilities": "uniform", "loss_class_weights": [1.0, 2.0, 4.0]}],
    ids=["paper_blocks", "large_blocks_uniform_weighted"],
)
def test_train_residual_config_one_iteration_from_image_only_weights(tmp_path, overrides):
    """configs/train.json + configs/train_residual.json: widened image-only weights, frozen encoders, one iteration;
    only the decoder changes and the residual weights leave zero. Also with 41^3 output blocks, centres uniform in
    the lungs and class-weighted voxels (the training options of the residual-informed network)."""
    workflow = train_residual_workflow(tmp_path, **overrides)
    workflow.initialize()
    net = workflow.parser.get_parsed_content("network_def")
    size = overrides.get("output_size", 25)
    first_sample = next(iter(workflow.parser.get_parsed_content("train#dataset")))
    assert first_sample["magnitude"].shape == (1, size, size, size)
    weights = workflow.parser.get_parsed_content("loss").class_weights
    assert (weights is None) == ("loss_class_weights" not in overrides)
    encoders = {k: v.clone() for k, v in net.encoders.state_dict().items()}
    first = net.decoder.head[0].weight.detach().clone()
    losses = []
    trainer = workflow.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    workflow.run()
    workflow.finalize()
    assert len(losses) == 1 and np.isfinite(losses[0])
    assert all(torch.equal(v, net.encoders.state_dict()[k]) for k, v in encoders.items())
    assert not torch.equal(net.decoder.head[0].weight[:, 112:118], first[:, 112:118])  # r is being learnt from
    assert (tmp_path / "models" / "model.pt").is_file()


@pytest.mark.slow
def test_tiled_inferer_with_the_residual_equals_the_whole_image_network():
    """The residual tiles are cut where the image tiles are: stitched tiles equal the network on the whole image."""
    from scripts.inferers.misalignment_inferer import MisalignmentInferer
    from tests.helpers.synthetic_pair import phantom_hu

    torch.manual_seed(0)
    net = MisalignmentNet(hidden_channels=4, residual_input="lstm").eval()
    image = torch.from_numpy(phantom_hu((20, 18, 12), seed=1)).float()[None, None].repeat(1, 2, 1, 1, 1)
    residual = torch.randn(1, 3, 20, 18, 12) * 4
    inputs = torch.cat([image, residual], dim=1)
    with torch.no_grad():
        whole = net(inputs)
        without = net(torch.cat([image, torch.zeros_like(residual)], dim=1))
    assert (whole - without).abs().max() > 1e-3  # r changes the prediction
    inferer = MisalignmentInferer(tile_size=25, precision="float32", with_steps=False, progress=False)
    tiled = inferer(inputs, net)
    assert (tiled - whole).abs().max() < 1e-4
    with pytest.raises(ValueError, match="5 input channels"):
        inferer(image, net)


@pytest.mark.slow
@pytest.mark.parametrize("residual_input", ["lstm", "encoders"])
def test_inference_config_runs_the_residual_network(tmp_path, residual_input):
    """``--method network --residual_input lstm`` (or "encoders"): the pair is re-registered, the network reads r,
    and the outputs gain the re-registration's expected error."""
    from tests.helpers.synthetic_pair import write_pair

    paths = write_pair(tmp_path / "data")
    torch.manual_seed(0)
    net = MisalignmentNet(hidden_channels=4, residual_input=residual_input)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    workflow = ConfigWorkflow(
        config_file=str(REPO_ROOT / "configs" / "inference.json"),
        meta_file=str(REPO_ROOT / "configs" / "metadata.json"),
        logging_file=str(REPO_ROOT / "configs" / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(REPO_ROOT),
        method="network",
        residual_input=residual_input,
        output_dir=str(tmp_path / "out"),
        checkpoint=str(tmp_path / "model.pt"),
        class_weights_file="",
        hidden_channels=4,
        tile_size=49,
        precision="float32",
        progress=False,
        require_lung=False,  # the phantom's lungs hold a few millilitres
        fixed_image=str(paths["fixed"]),
        moving_image=str(paths["moving"]),
        landmarks=str(paths["landmarks"]),
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    out = tmp_path / "out"
    assert (out / "moving_error_mm.nii.gz").is_file() and (out / "moving_misalignment.nii.gz").is_file()
    header = (out / "moving_landmarks.csv").read_text().splitlines()[0].split(",")
    assert {"pred", "p_correct", "p_poor", "p_wrong", "error_mm", "residual_mm", "step1", "step2"} <= set(header)


def test_registered_pair_scores_put_network_and_reregistration_on_the_same_voxels(tmp_path):
    from scripts.evaluation.registered_pair_scores import fit_weights, score

    folder = registered_pairs_folder(tmp_path / "registered")
    torch.manual_seed(0)
    torch.save(MisalignmentNet(decoder="single_cnn", residual_input="lstm").state_dict(), tmp_path / "w.pt")
    results = score(
        weights=str(tmp_path / "w.pt"),
        residual_input="lstm",
        decoder="single_cnn",
        datalist=str(folder / "datalist.json"),
        patches_per_pair=2,
        calibration_file="",
        output=str(tmp_path / "scores.json"),
    )
    network, thresholds = results["network (argmax)"], results["re-registration (|r| thresholds)"]
    assert network["voxels"] == thresholds["voxels"] > 1000 and network["true_counts"] == [0, network["voxels"], 0]
    assert thresholds["accuracy"] > 0.95  # r = e + noise, |e| = 4 mm: "poor" nearly everywhere
    assert json.loads((tmp_path / "scores.json").read_text())["pairs"] == 1
    record = fit_weights(
        weights=str(tmp_path / "w.pt"),
        output=str(tmp_path / "cw.json"),
        residual_input="lstm",
        decoder="single_cnn",
        datalist=str(folder / "datalist.json"),
        patches_per_pair=2,
    )
    assert record["fitted_on"]["true_counts"][1] == record["fitted_on"]["voxels"] > 1000
    assert record["mean_f1_fitted"] >= record["mean_f1_argmax"] and len(record["weights"]) == 3


def test_prior_variant_starts_as_the_thresholded_reregistration(tmp_path):
    """``residual_input="lstm_prior"`` widened from image-only weights answers like |r| thresholded at 3 and 6 mm,
    whatever the images say, and its decoder gate is a trained parameter."""
    torch.manual_seed(0)
    torch.save(MisalignmentNet(hidden_channels=4).state_dict(), tmp_path / "image_only.pt")
    net = load_network_weights(
        MisalignmentNet(hidden_channels=4, residual_input="lstm_prior"), tmp_path / "image_only.pt"
    )
    magnitude = torch.tensor([0.5, 2.0, 4.0, 5.5, 7.0, 12.0]).repeat_interleave(3)  # 18 voxels along x
    residual = torch.zeros(1, 3, 18, 18, 18)
    residual[:, 0] = magnitude.view(1, 1, 1, -1)
    image = torch.randn(1, 2, 18, 18, 18) * 300
    with torch.no_grad():
        labels = net.eval()(torch.cat([image, residual], dim=1)).argmax(dim=1)[0]
    expected = torch.bucketize(magnitude, torch.tensor([3.0, 6.0]), right=True)
    assert torch.equal(labels[9, 9], expected)
    assert net.residual_gate.requires_grad and torch.equal(net.residual_gate, torch.zeros(3))


def test_committed_residual_weights_are_the_prior_variant():
    """models/model_residual.pt (to continue training with --init_weights) loads into its architecture only."""
    path = REPO_ROOT / "models" / "model_residual.pt"
    if not path.is_file():
        pytest.skip("no residual-informed weights committed")
    net = load_network_weights(MisalignmentNet(residual_input="lstm_prior"), path)
    assert net.residual_gate.shape == (3,)
    with pytest.raises(ValueError, match="model_residual.pt"):
        load_network_weights(MisalignmentNet(), path)


def test_registered_patches_in_larger_blocks_with_uniform_centres(tmp_path):
    """output_size 41: the encoder windows of a 41^3 tile and the target and r on its 41^3 voxels."""
    folder = registered_pairs_folder(tmp_path / "registered")
    patches = RegisteredPatchDataset(
        folder / "datalist.json", patches_per_pair=2, probabilities="uniform", output_size=41
    )
    for sample in patches:
        assert [sample[f"image_{s}mm"].shape[1] for s in (4, 2, 1)] == [101, 101, 117]
        assert sample["magnitude"].shape == (1, 41, 41, 41) and sample["residual"].shape == (3, 41, 41, 41)
        torch.testing.assert_close(sample["magnitude"], torch.full((1, 41, 41, 41), 4.0))
    with pytest.raises(ValueError, match="1 \\+ 8k"):
        RegisteredPatchDataset(folder / "datalist.json", output_size=40)


@pytest.mark.slow
def test_compare_scores_several_checkpoints_on_the_voxels_score_uses(tmp_path):
    """``compare``: each checkpoint on the same voxels, the first one's argmax equal to ``score``'s with the same seed,
    and an in-sample class-weight fit per checkpoint."""
    from scripts.evaluation.registered_pair_scores import collect, compare, score

    folder = registered_pairs_folder(tmp_path / "registered")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(str(tmp_path / f"w{seed}.pt"))
        torch.save(MisalignmentNet(decoder="single_cnn", residual_input="lstm").state_dict(), paths[-1])
    common = dict(
        residual_input="lstm",
        decoder="single_cnn",
        datalist=str(folder / "datalist.json"),
        patches_per_pair=2,
        calibration_file="",
        seed=3,
    )
    compared = compare(weights=paths, split="validation", output=str(tmp_path / "compare.json"), **common)
    single = score(weights=paths[0], split="validation", **common)
    assert compared[paths[0]]["argmax"] == single["network (argmax)"]
    assert compared[paths[1]]["argmax"]["voxels"] == compared["voxels"] == single["network (argmax)"]["voxels"]
    found = collect(paths, "lstm", "single_cnn", 16, str(folder / "datalist.json"), "validation", 2, 4, 3)
    assert found["networks"].shape == (2, compared["voxels"], 3)
    assert not np.allclose(found["networks"][0], found["networks"][1])  # two networks, not one twice
    np.testing.assert_array_equal(found["network"], found["networks"][0])
    assert len(compared[paths[0]]["class_weights_fitted_here"]) == 3
    assert json.loads((tmp_path / "compare.json").read_text())["pairs"] == 1


@pytest.mark.slow
def test_encoders_variant_starts_as_its_prior_checkpoint_and_reads_r_in_every_encoder(tmp_path):
    """``residual_input="encoders"`` from an "lstm_prior" checkpoint: zero first-layer weights for r, so the same
    prediction whatever r adds; TorchScript compiles it; tiled inference equals the whole image (r windows zero-padded
    like the images' background)."""
    from scripts.inferers.misalignment_inferer import MisalignmentInferer

    torch.manual_seed(0)
    prior = MisalignmentNet(hidden_channels=4, residual_input="lstm_prior").eval()
    with torch.no_grad():
        prior.residual_gate.fill_(0.5)
    torch.save(prior.state_dict(), tmp_path / "prior.pt")
    net = load_network_weights(MisalignmentNet(hidden_channels=4, residual_input="encoders"), tmp_path / "prior.pt")
    net = net.eval()
    assert net.in_channels == 5 and [e.conv1[0].weight.shape[1] for e in net.encoders] == [5, 5, 5]
    assert all(float(e.conv1[0].weight[:, 2:].abs().max()) == 0 for e in net.encoders)
    inputs = torch.cat([torch.randn(1, 2, 20, 18, 12) * 300 - 600, torch.randn(1, 3, 20, 18, 12) * 4], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(net(inputs), prior(inputs), atol=1e-5, rtol=0)
        for encoder in net.encoders:
            encoder.conv1[0].weight[:, 2:].normal_(0, 0.1)
        whole = net(inputs)
        assert (whole - prior(inputs)).abs().max() > 1e-3  # the encoders now read r
        torch.testing.assert_close(torch.jit.script(net)(inputs), whole, atol=1e-5, rtol=0)
    tiled = MisalignmentInferer(tile_size=25, precision="float32", with_steps=False, progress=False)(inputs, net)
    assert (tiled - whole).abs().max() < 1e-4


def test_registered_patches_with_residual_windows(tmp_path):
    """``residual_windows``: every encoder window gains r (mm) as channels 2-4, zero beyond the pair; at the centre
    of the 1 mm window it is the residual patch's centre."""
    from scripts.data.registered_patches import RegisteredPatchd, load_registered_pair

    folder = registered_pairs_folder(tmp_path / "registered")
    patches = RegisteredPatchDataset(folder / "datalist.json", patches_per_pair=2, residual_windows=True, seed=1)
    for sample in patches:
        assert [tuple(sample[f"image_{s}mm"].shape) for s in (4, 2, 1)] == [(5, 101, 101, 101)] * 3
        torch.testing.assert_close(sample["image_1mm"][2:, 50, 50, 50], sample["residual"][:, 12, 12, 12])
        assert float(sample["image_4mm"][2, 0, 0, 0]) == 0.0  # 200 mm from the centre: beyond the 72 mm pair
    entry = read_registered_datalist(folder / "datalist.json")[0]
    with pytest.raises(ValueError, match="residual_pyramid=True"):
        RegisteredPatchd(residual_windows=True)({**load_registered_pair(entry), "centre": [36, 36, 36]})


@pytest.mark.slow
def test_train_residual_config_encoders_variant_trains_the_encoders(tmp_path):
    """``--residual_input encoders --freeze_encoders false``: 5-channel windows, and training moves the encoders,
    their r weights included (they start at zero; the first iteration only opens the decoder gate, from zero too)."""
    workflow = train_residual_workflow(tmp_path, residual_input="encoders", freeze_encoders=False, patches_per_pair=2)
    workflow.initialize()
    net = workflow.parser.get_parsed_content("initialized_network")
    assert net.residual_input == "encoders"
    assert next(iter(workflow.parser.get_parsed_content("train#dataset")))["image_1mm"].shape[0] == 5
    first = net.encoders[0].conv1[0].weight.detach().clone()
    assert float(first[:, 2:].abs().max()) == 0
    workflow.run()
    workflow.finalize()
    assert float(net.encoders[0].conv1[0].weight[:, 2:].abs().max()) > 0
    assert (tmp_path / "models" / "model.pt").is_file()
