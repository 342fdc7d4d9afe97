"""Class-weighted decisions (scripts.engines.class_weights): the weighting, the fit, the file and its use at
inference."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from sklearn.metrics import f1_score

from scripts.engines.class_weights import fit
from scripts.inferers.class_decision import apply_class_weights, read_class_weights
from scripts.inferers.misalignment_inferer import MisalignmentInferer
from scripts.networks.misalignment_net import MisalignmentNet
from scripts.utils.class_decision import fit_class_weights, mean_f1_of_decisions
from scripts.utils.file_digest import file_sha256
from tests.conftest import REPO_ROOT
from tests.helpers.synthetic_pair import phantom_hu, write_pair
from tests.helpers.training_data import prepared_dataset, untrained_weights
from tests.test_inference_workflow import make_workflow


def test_weighting_renormalises_and_keeps_masked_voxels_zero():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.0, 0.0]]).T[None]  # [1, 3, 2]: one voxel, one masked voxel
    assert apply_class_weights(p, None) is p
    torch.testing.assert_close(apply_class_weights(p, [2.0, 2.0, 2.0]), p)
    weighted = apply_class_weights(p, [1.0, 1.0, 8.0])
    torch.testing.assert_close(weighted[0, :, 0], torch.tensor([0.7, 0.2, 0.8]) / 1.7)
    assert weighted[0, :, 1].abs().max() == 0 and weighted[0, :, 0].argmax() == 2


def test_mean_f1_matches_scikit_learn():
    rng = np.random.default_rng(0)
    labels, predicted = rng.integers(0, 3, 500), rng.integers(0, 3, 500)
    expected = f1_score(labels, predicted, labels=[0, 1, 2], average="macro", zero_division=0)
    assert mean_f1_of_decisions(labels, predicted) == pytest.approx(expected)


def test_fit_turns_a_ranking_into_labels():
    """Argmax says "correct" for every voxel, but the probabilities rank the classes: the fitted weights separate
    them perfectly, and the plain argmax's mean F1 is reported beside."""
    labels = np.repeat([0, 1, 2], [50, 20, 30])
    rows = {0: [0.7, 0.1, 0.2], 1: [0.55, 0.25, 0.2], 2: [0.6, 0.1, 0.3]}
    probabilities = np.array([rows[k] for k in labels])
    weights, score, plain = fit_class_weights(labels, probabilities)
    assert plain == pytest.approx(f1_score(labels, np.zeros_like(labels), average="macro", zero_division=0))
    assert score == 1.0 and weights[0] == 1.0
    assert (np.argmax(probabilities * np.array(weights), axis=1) == labels).all()
    # one probability row everywhere: the best constant answer is "correct" (mean F1 2/9); of the grid weights that
    # give it, the fit keeps those nearest to 1 (log 0.2/0.3 = -0.41 -> -0.5, log 0.2/0.5 = -0.92 -> -1.0)
    constant = np.tile([0.2, 0.3, 0.5], (100, 1))
    weights, score, plain = fit_class_weights(labels, constant)
    assert weights == pytest.approx([1.0, np.exp(-0.5), np.exp(-1.0)]) and score == pytest.approx(2 / 9)


def test_class_weights_file_errors_and_checkpoint_check(tmp_path, caplog):
    assert read_class_weights("") is None
    with pytest.raises(FileNotFoundError, match="none.json"):
        read_class_weights(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        read_class_weights(bad)
    bad.write_text(json.dumps({"weights": [1.0, -2.0, 1.0]}))
    with pytest.raises(ValueError, match="bad.json.*positive"):
        read_class_weights(bad)
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"weights": [1.0, 2.0, 3.0], "weights_sha256": file_sha256(checkpoint)}))
    assert read_class_weights(good, checkpoint) == [1.0, 2.0, 3.0]
    checkpoint.write_bytes(b"other weights")
    with caplog.at_level(logging.WARNING):
        assert read_class_weights(good, checkpoint) is None  # fitted for other weights: plain argmax
    assert "fitted for other weights" in caplog.text


def test_tiled_inferer_applies_the_weights_to_the_final_probabilities():
    net = MisalignmentNet(hidden_channels=4).eval()
    image = torch.from_numpy(phantom_hu((13, 13, 13), seed=2)).float()[None, None].repeat(1, 2, 1, 1, 1)
    image[:, 1] = torch.roll(image[:, 1], 2, dims=-1)
    plain = MisalignmentInferer(tile_size=25, precision="float32", progress=False)(image, net)
    weights = [1.0, 5.0, 0.5]
    weighted = MisalignmentInferer(tile_size=25, precision="float32", progress=False, class_weights=weights)(image, net)
    torch.testing.assert_close(weighted["probabilities"], apply_class_weights(plain["probabilities"], weights))
    assert torch.equal(weighted["step_classes"], plain["step_classes"])  # the earlier steps are not weighted
    with pytest.raises(ValueError, match="class_weights"):
        MisalignmentInferer(class_weights=[1.0, 0.0, 1.0])


@pytest.mark.slow
def test_inference_config_uses_the_class_weights_fitted_for_its_checkpoint(tmp_path):
    paths = write_pair(tmp_path / "data")
    checkpoint = tmp_path / "model.pt"
    torch.save(MisalignmentNet(hidden_channels=4).state_dict(), checkpoint)
    weights_file = tmp_path / "class_weights.json"
    weights_file.write_text(json.dumps({"weights": [1.0, 1e6, 1.0], "weights_sha256": file_sha256(checkpoint)}))
    labels = {}
    for name, chosen in (("weighted", str(weights_file)), ("argmax", "")):
        workflow = make_workflow(
            tmp_path / name,
            fixed_image=str(paths["fixed"]),
            moving_image=str(paths["moving"]),
            checkpoint=str(checkpoint),
            class_weights_file=chosen,
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()
        out = tmp_path / name / "out"
        probabilities = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "moving_probabilities.nii.gz")))
        labels[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "moving_misalignment.nii.gz")))
        inside = probabilities.sum(-1) > 0
        assert (labels[name][inside] == probabilities[inside].argmax(-1)).all()  # labels follow the written map
        labels[name] = labels[name][inside]
    assert (labels["weighted"] == 1).all()  # a huge poor weight: every voxel "poor"
    assert not (labels["argmax"] == 1).all()


@pytest.mark.slow
def test_fit_writes_weights_for_the_file_it_was_fitted_on(tmp_path_factory, tmp_path):
    dataset_dir = prepared_dataset(tmp_path_factory)
    weights = untrained_weights(tmp_path)
    record = fit(
        weights=str(weights),
        output=str(tmp_path / "class_weights.json"),
        config_file=str(REPO_ROOT / "configs" / "train.json"),
        num_patches=2,
        patches_per_pair=2,
        dataset_dir=str(dataset_dir),
        decoder="single_cnn",
        batch_size=1,
    )
    saved = json.loads((tmp_path / "class_weights.json").read_text())
    assert saved == record and saved["fitted_on"]["split"] == "training" and saved["fitted_on"]["patches"] == 2
    assert saved["mean_f1_fitted"] >= saved["mean_f1_argmax"]
    assert read_class_weights(tmp_path / "class_weights.json", weights) == saved["weights"]


def test_shipped_class_weights_were_fitted_for_the_shipped_weights():
    """Else inference would fall back to the plain argmax with a warning on every run."""
    shipped = REPO_ROOT / "models" / "class_weights.json"
    model = REPO_ROOT / "models" / "model.pt"
    if not model.is_file():
        pytest.skip("no shipped weights")
    record = json.loads(shipped.read_text())
    assert record["weights_sha256"] == file_sha256(model) and record["fitted_on"]["split"] == "training"
    assert read_class_weights(shipped, model) == record["weights"]
