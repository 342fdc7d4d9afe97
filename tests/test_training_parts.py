"""Training building blocks without a full network run: noise transform, batch/inferer glue, metrics, checkpoints."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from ignite.engine import Engine
from sklearn.metrics import cohen_kappa_score, f1_score

from scripts.data.patch_streams import PAIR_FILE_KEYS, TransformedPatches, check_pair_files
from scripts.engines.checkpoints import (
    ExportStateDict,
    latest_checkpoint,
    load_regnet_encoders,
    resumable_checkpoint,
)
from scripts.engines.metrics import KEY_METRIC, cohen_kappa, misalignment_metrics
from scripts.engines.trainer import AutocastInferer, PatchTrainingNetwork, PrepareKeysBatch, as_bool, to_device
from scripts.networks.decoders import HierarchicalLSTMDecoder
from scripts.networks.misalignment_net import MisalignmentNet
from scripts.networks.regnet import RegNet
from scripts.transforms.hu_noise import RandIntegerHUNoised


def test_integer_noise_is_integer_seeded_and_shares_one_mean():
    sample = {"a": torch.zeros(2, 20, 20, 20), "b": torch.zeros(2, 20, 20, 20), "c": torch.ones(3)}
    noise = RandIntegerHUNoised(keys=["a", "b"]).set_random_state(seed=3)
    out = noise(sample)
    assert torch.equal(out["c"], sample["c"])  # other keys untouched
    for key in ("a", "b"):
        assert torch.equal(out[key], out[key].round())  # integer HU offsets
        assert out[key].dtype == torch.float32
        assert 1.5 < out[key].std().item() < 2.6  # sigma 2 (+ rounding)
    assert abs(out["a"].mean().item() - out["b"].mean().item()) < 0.1  # one mean per sample for all keys
    means = []
    for seed in range(40):  # mu = round(N(0, 2)) varies from sample to sample
        means.append(RandIntegerHUNoised(keys="a").set_random_state(seed=seed)({"a": torch.zeros(1000)})["a"].mean())
    assert 1.0 < float(np.std(means)) < 3.5
    again = RandIntegerHUNoised(keys=["a", "b"]).set_random_state(seed=3)(sample)
    assert torch.equal(again["a"], out["a"])
    assert torch.equal(RandIntegerHUNoised(keys="a", prob=0.0)(sample)["a"], sample["a"])


def test_prepare_batch_and_autocast_inferer():
    batch = {"x1": torch.ones(1, 2, 3), "x2": torch.zeros(1, 2, 3), "y": torch.ones(1)}
    inputs, target = PrepareKeysBatch(["x1", "x2"], "y")(batch, "cpu")
    assert isinstance(inputs, tuple) and len(inputs) == 2 and torch.equal(target, batch["y"])
    single, _ = PrepareKeysBatch("x1", "y")(batch, "cpu")
    assert torch.equal(single, batch["x1"])
    with pytest.raises(KeyError, match="magnitude"):
        PrepareKeysBatch(["x1"], "magnitude")(batch, "cpu")
    linear = nn.Linear(3, 2)
    assert AutocastInferer()(inputs[0], linear).dtype == torch.float32
    assert AutocastInferer("bfloat16")(inputs[0], linear).dtype == torch.bfloat16
    assert AutocastInferer()(inputs, lambda a, b: a - b).sum().item() == 6.0  # tuple -> several arguments
    with pytest.raises(ValueError, match="autocast dtype"):
        AutocastInferer("int8")
    volume = torch.zeros(1, 2, 3, 3, 3)
    seen = AutocastInferer(channels_last="true")(volume, lambda x: x)
    assert seen.is_contiguous(memory_format=torch.channels_last_3d) and torch.equal(seen, volume)
    conv = to_device(nn.Conv3d(2, 4, 3), "cpu", channels_last=True)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)


def test_bool_flags_from_the_command_line():
    assert as_bool("true") and as_bool("True") and as_bool(True) and not as_bool("false") and not as_bool(0)
    with pytest.raises(ValueError, match="boolean"):
        as_bool("maybe")


def test_frozen_encoders_get_no_gradient_and_keep_bn_statistics():
    wrapper = PatchTrainingNetwork(MisalignmentNet(decoder="single_cnn", cnn_widths=(8,)), freeze_encoders="true")
    wrapper.train()
    assert not any(p.requires_grad for p in wrapper.net.encoders.parameters())
    assert all(p.requires_grad for p in wrapper.net.decoder.parameters())
    assert not wrapper.net.encoders.training and wrapper.net.decoder.training
    trainable = PatchTrainingNetwork(MisalignmentNet(decoder="single_cnn", cnn_widths=(8,)))
    trainable.train()
    assert all(p.requires_grad for p in trainable.parameters()) and trainable.net.encoders.training


def _evaluate(metrics, outputs):
    key, additional = metrics
    engine = Engine(lambda e, batch: batch)
    for name, metric in {**key, **additional}.items():
        metric.attach(engine, name)
    return engine.run(outputs).metrics


def test_metrics_match_sklearn():
    grouping = HierarchicalLSTMDecoder(8, 4, "6-3-1").class_grouping
    g = torch.Generator().manual_seed(0)
    outputs = []
    for _ in range(3):
        logits = torch.randn(2, 3, 4, 3, 3, 3, generator=g)
        outputs.append({"pred": logits, "label": torch.rand(2, 1, 3, 3, 3, generator=g) * 9})
    metrics = _evaluate(misalignment_metrics(grouping), outputs)
    truth, pred = [], []
    for out in outputs:
        fine = torch.softmax(out["pred"][:, -1], 1)
        probs = torch.einsum("gf,bf...->bg...", grouping, fine)
        pred.append(probs.argmax(1).flatten())
        truth.append(torch.bucketize(out["label"][:, 0], torch.tensor([3.0, 6.0]), right=True).flatten())
    truth, pred = torch.cat(truth).numpy(), torch.cat(pred).numpy()
    f1 = f1_score(truth, pred, average=None, labels=[0, 1, 2])
    assert metrics[KEY_METRIC] == pytest.approx(f1.mean(), abs=1e-9)
    assert metrics["val_f1_poor"] == pytest.approx(f1[1], abs=1e-9)
    assert metrics["val_kappa"] == pytest.approx(cohen_kappa_score(truth, pred), abs=1e-9)
    assert metrics["val_accuracy"] == pytest.approx((truth == pred).mean(), abs=1e-9)


def test_kappa_of_perfect_and_chance_agreement():
    assert cohen_kappa(torch.tensor([[5, 0, 0], [0, 3, 0], [0, 0, 2]])).item() == pytest.approx(1.0)
    assert cohen_kappa(torch.tensor([[1, 1], [1, 1]])).item() == pytest.approx(0.0)
    assert cohen_kappa(torch.tensor([[4, 0], [0, 0]])).item() == 0.0  # one class only: undefined -> 0


def test_encoders_initialised_from_regnet_checkpoints(tmp_path):
    regnet = RegNet()
    with torch.no_grad():
        regnet.encoder.conv1[0].weight.fill_(0.25)
    torch.save(regnet.state_dict(), tmp_path / "regnet_2mm.pt")
    net = load_regnet_encoders(MisalignmentNet(), str(tmp_path / "regnet_{factor}mm.pt"))
    assert torch.all(net.encoders[1].conv1[0].weight == 0.25)  # factors [4, 2, 1]: index 1 is 2 mm
    assert not torch.all(net.encoders[0].conv1[0].weight == 0.25)  # no 4 mm file: left random
    for k, v in regnet.encoder.state_dict().items():
        assert torch.equal(net.encoders[1].state_dict()[k], v)


def test_checkpoints_of_another_architecture_are_refused(tmp_path):
    torch.save(MisalignmentNet(decoder="single_cnn", cnn_widths=(8,)).state_dict(), tmp_path / "regnet_1mm.pt")
    with pytest.raises(ValueError, match="regnet_1mm.pt does not fit the 1 mm RegNet encoder"):
        load_regnet_encoders(MisalignmentNet(decoder="single_cnn"), str(tmp_path / "regnet_{factor}mm.pt"))
    (tmp_path / "regnet_4mm.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="regnet_4mm.pt could not be read"):
        load_regnet_encoders(MisalignmentNet(), str(tmp_path / "regnet_{factor}mm.pt"))
    run = tmp_path / "checkpoints"
    run.mkdir()
    small = MisalignmentNet(decoder="single_cnn", cnn_widths=(8,))
    torch.save({"network": small.state_dict(), "optimizer": {}}, run / "checkpoint_iteration=3.pt")
    torch.save({"network": small.state_dict()}, run / "checkpoint_final_iteration=12.pt")
    assert latest_checkpoint(run).name == "checkpoint_final_iteration=12.pt"
    assert resumable_checkpoint(run, small) == str(run / "checkpoint_final_iteration=12.pt")
    with pytest.raises(ValueError, match="does not fit the configured MisalignmentNet"):
        resumable_checkpoint(run, MisalignmentNet(decoder="single_cnn", cnn_widths=(16,)))
    assert resumable_checkpoint(tmp_path / "missing", small) is None


def test_export_writes_a_cpu_weights_only_state_dict(tmp_path):
    net = nn.Sequential(nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3))
    engine = Engine(lambda e, b: None)
    ExportStateDict(net, tmp_path / "models" / "model.pt").attach(engine)
    engine.run([0], max_epochs=1)
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert set(state) == set(net.state_dict()) and all(v.device.type == "cpu" for v in state.values())
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["model.pt"]  # no temporary file left


class _CountingPatches:
    """Stand-in for MisalignmentPatchDataset: yields {"x": epoch * 100 + i}; epoch advances after a full pass."""

    def __init__(self, length: int = 5, entries=None) -> None:
        self.length, self.epoch = length, 0
        if entries is not None:
            self.entries = entries

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        for i in range(self.length):
            yield {"x": self.epoch * 100 + i}
        self.epoch += 1


def test_transformed_patches_fixed_validation_set_and_transform():
    add_one = TransformedPatches(_CountingPatches(), transform=lambda d: {"x": d["x"] + 1})
    assert [d["x"] for d in add_one] == [1, 2, 3, 4, 5] and len(add_one) == 5
    assert [d["x"] for d in add_one][0] == 101  # training: the next pass is the next epoch
    fixed = TransformedPatches(_CountingPatches(), max_samples=3, fixed_epoch=0, shard_by_rank=True)
    assert len(fixed) == 3
    assert [d["x"] for d in fixed] == [0, 1, 2] == [d["x"] for d in fixed]  # the same samples every validation
    with pytest.raises(ValueError, match="max_samples"):
        TransformedPatches(_CountingPatches(), max_samples=0)


def test_transformed_patches_check_the_datalist_files(tmp_path):
    present = tmp_path / "a.nii.gz"
    present.write_text("x")
    entry = {k: str(present) for k in PAIR_FILE_KEYS}
    TransformedPatches(_CountingPatches(entries=[entry]))  # all files present: fine
    broken = dict(entry, dvf=str(tmp_path / "pairs" / "gone_dvf.nii.gz"))
    with pytest.raises(FileNotFoundError, match="names 1 missing files.*gone_dvf.nii.gz"):
        TransformedPatches(_CountingPatches(entries=[entry, broken]))
    with pytest.raises(ValueError, match="entries without \\['dvf'\\]"):
        check_pair_files([{k: v for k, v in entry.items() if k != "dvf"}])


def test_transformed_patches_warn_about_another_maximum_deformation(tmp_path, caplog):
    present = tmp_path / "a.nii.gz"
    present.write_text("x")
    entry = {**{k: str(present) for k in PAIR_FILE_KEYS}, "max_deformation_mm": 10.0}
    TransformedPatches(_CountingPatches(entries=[entry]), max_deformation_mm=10.0)
    assert "maximum deformation" not in caplog.text
    TransformedPatches(_CountingPatches(entries=[entry]), max_deformation_mm=20.0)
    assert "prepared with maximum deformation [10.0] mm; this config expects 20.0 mm" in caplog.text
