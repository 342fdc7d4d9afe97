"""The training configs end to end on CPU: 1-2 iterations of batch 1 on tiny datasets (the network needs 101^3 patches).

The default LSTM network takes ~20 s per iteration on 2 cores; determinism and resume use the single-scale CNN
decoder (one encoder, ~5 s per iteration), which exercises the same engine.
"""

import json

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow

from scripts.networks.misalignment_net import MisalignmentNet
from scripts.networks.regnet import RegNet
from tests.conftest import REPO_ROOT
from tests.helpers.training_data import prepared_dataset

CONFIGS = REPO_ROOT / "configs"


@pytest.fixture
def dataset_dir(tmp_path_factory):
    return prepared_dataset(tmp_path_factory)


def make_workflow(config: str, root, dataset_dir, **overrides) -> ConfigWorkflow:
    """The config on the prepared phantom dataset: 2 patches of one training pair, 1 validation patch, batch 1."""
    settings = {
        "bundle_root": str(root),
        "dataset_dir": str(dataset_dir),
        "patches_per_pair": 2,
        "val_patches_per_pair": 1,
        "val_num_patches": 1,
        "batch_size": 1,
        "max_epochs": 1,
        "val_interval": 2,
        "ckpt_interval": 1,
    }
    settings.update(overrides)
    return ConfigWorkflow(
        config_file=str(CONFIGS / config),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="train",
        **settings,
    )


def error_chain(error: BaseException) -> str:
    """Messages of an exception and its causes (MONAI wraps errors raised while instantiating a component)."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__
    return " <- ".join(messages)


def run_and_record_losses(workflow: ConfigWorkflow) -> list:
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    workflow.run()
    workflow.finalize()
    return losses


@pytest.mark.slow
def test_train_config_default_network_two_iterations(tmp_path, dataset_dir):
    workflow = make_workflow("train.json", tmp_path, dataset_dir)
    workflow.initialize()
    assert workflow.check_properties() == []
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.max_epochs == 1
    assert isinstance(workflow.parser.get_parsed_content("network_def"), MisalignmentNet)
    workflow.run()
    workflow.finalize()
    assert trainer.state.iteration == 2
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    metrics = evaluator.state.metrics
    assert {"val_mean_f1", "val_kappa", "val_f1_correct", "val_f1_poor", "val_f1_wrong"} <= set(metrics)
    assert 0.0 <= metrics["val_mean_f1"] <= 1.0
    # the exported weights load into the network as configured, from a weights-only file of CPU tensors
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    inference = ConfigParser()
    inference.read_config(str(CONFIGS / "inference.json"))
    inference["bundle_root"] = str(tmp_path)
    inference.get_parsed_content("network_def").load_state_dict(state)  # the network inference.json builds
    assert inference.get_parsed_content("checkpoint") == str(tmp_path / "models" / "model.pt")  # where it looks
    assert all(v.device.type == "cpu" for v in state.values())
    assert (tmp_path / "runs" / "train" / "checkpoints" / "checkpoint_final_iteration=2.pt").is_file()
    assert list((tmp_path / "runs" / "train").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_same_seed_gives_same_losses(tmp_path, dataset_dir):
    settings = dict(decoder="single_cnn", val_interval=100)
    first = run_and_record_losses(make_workflow("train.json", tmp_path / "a", dataset_dir, **settings))
    second = run_and_record_losses(make_workflow("train.json", tmp_path / "b", dataset_dir, **settings))
    other = make_workflow("train.json", tmp_path / "c", dataset_dir, seed=1, patches_per_pair=1, **settings)
    third = run_and_record_losses(other)
    assert len(first) == 2 and len(third) == 1
    assert first == second
    assert first[0] != third[0]  # the seed matters (input noise, patch centres and initial weights)


@pytest.mark.slow
def test_training_resumes_from_the_latest_checkpoint(tmp_path, dataset_dir):
    settings = dict(decoder="single_cnn", val_interval=100)
    run_and_record_losses(make_workflow("train.json", tmp_path, dataset_dir, **settings))
    saved = torch.load(
        tmp_path / "runs" / "train" / "checkpoints" / "checkpoint_final_iteration=2.pt", weights_only=True
    )
    assert saved["trainer"]["iteration"] == 2 and saved["optimizer"]["state"]
    workflow = make_workflow("train.json", tmp_path, dataset_dir, max_epochs=2, **settings)
    losses = run_and_record_losses(workflow)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert len(losses) == 2 and trainer.state.iteration == 4  # continued at iteration 3, not from scratch
    assert (tmp_path / "runs" / "train" / "checkpoints" / "checkpoint_final_iteration=4.pt").is_file()
    other = make_workflow("train.json", tmp_path, dataset_dir, max_epochs=3, decoder="multi_cnn")
    other.initialize()
    with pytest.raises(RuntimeError) as error:  # a checkpoint of another decoder: refused before training
        other.run()
    assert "checkpoint_final_iteration=4.pt does not fit the configured MisalignmentNet" in error_chain(error.value)


@pytest.mark.slow
def test_regnet_config_one_level_with_bf16(tmp_path, dataset_dir):
    workflow = make_workflow("train_regnet.json", tmp_path, dataset_dir, level=2, autocast="bfloat16")
    workflow.initialize()
    assert workflow.check_properties() == []
    assert workflow.parser.get_parsed_content("max_deformation") == 15.0
    losses = run_and_record_losses(workflow)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    state = torch.load(tmp_path / "models" / "regnet_2mm.pt", weights_only=True)
    RegNet().load_state_dict(state)
    # the level checkpoint initialises the matching encoder of the misalignment network
    workflow = make_workflow("train.json", tmp_path, dataset_dir, decoder="multi_cnn")
    net = workflow.parser.get_parsed_content("initialized_network")
    assert torch.equal(net.encoders[1].conv1[0].weight, state["encoder.conv1.0.weight"])


def test_regnet_normalisation_matches_the_misalignment_network():
    regnet, net = RegNet().eval(), MisalignmentNet(decoder="single_cnn")
    hu = torch.rand(1, 2, 101, 101, 101) * 1500 - 1000
    with torch.no_grad():  # RegNet takes HU and hands its encoder what MisalignmentNet hands the same encoder
        torch.testing.assert_close(regnet(hu), regnet.head(regnet.encoder(net.normalize(hu))))


def _fails_before_training(workflow: ConfigWorkflow, root, message: str) -> None:
    workflow.initialize()
    with pytest.raises(Exception) as error:
        workflow.run()
    assert message in error_chain(error.value)
    assert not (root / "runs" / "train" / "checkpoints").exists()  # nothing was trained or saved


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_missing_or_empty_dataset_dir(tmp_path, case):
    data = tmp_path / "data"
    if case == "empty":
        data.mkdir()
    _fails_before_training(make_workflow("train.json", tmp_path, data), tmp_path, "datalist.json does not exist")


def test_datalist_naming_missing_files(tmp_path, dataset_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "datalist.json").write_text((dataset_dir / "datalist.json").read_text())  # relative paths: not here
    _fails_before_training(make_workflow("train.json", tmp_path, data), tmp_path, "names 5 missing files")
    datalist = json.loads((dataset_dir / "datalist.json").read_text())
    datalist["training"] = []
    (data / "datalist.json").write_text(json.dumps(datalist))
    _fails_before_training(make_workflow("train.json", tmp_path, data), tmp_path, "has no entries under 'training'")


def test_regnet_checkpoint_of_another_architecture(tmp_path, dataset_dir):
    (tmp_path / "models").mkdir()
    torch.save(MisalignmentNet(decoder="single_cnn").state_dict(), tmp_path / "models" / "regnet_4mm.pt")
    workflow = make_workflow("train.json", tmp_path, dataset_dir)
    _fails_before_training(workflow, tmp_path, "regnet_4mm.pt does not fit the 4 mm RegNet encoder")


def test_freeze_encoders_override_trains_only_the_decoder(tmp_path):
    workflow = make_workflow("train.json", tmp_path, tmp_path / "data", freeze_encoders="true")
    optimizer = workflow.parser.get_parsed_content("optimizer")
    net = workflow.parser.get_parsed_content("network_def")
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in net.decoder.parameters()}


def test_init_weights_start_from_an_exported_network(tmp_path):
    """``--init_weights models/model.pt`` continues shipped weights in a fresh output folder (another machine)."""
    torch.manual_seed(1)
    exported = MisalignmentNet(decoder="single_cnn").state_dict()
    torch.save(exported, tmp_path / "model.pt")
    workflow = make_workflow(
        "train.json", tmp_path, tmp_path / "data", decoder="single_cnn", init_weights=str(tmp_path / "model.pt")
    )
    loaded = workflow.parser.get_parsed_content("initialized_network").state_dict()
    assert loaded.keys() == exported.keys()
    assert all(torch.equal(loaded[k], exported[k]) for k in exported)
    workflow = make_workflow("train.json", tmp_path, tmp_path / "data", init_weights=str(tmp_path / "model.pt"))
    with pytest.raises(Exception) as caught:  # an LSTM network cannot start from single-CNN weights
        workflow.parser.get_parsed_content("initialized_network")
    assert "model.pt" in error_chain(caught.value)
