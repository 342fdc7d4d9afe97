"""configs/inference.json end to end on a small synthetic pair (ConfigWorkflow: initialize, check_properties, run,
finalize), the tiled inferer against the whole-image network, and every bad input of the inference contract."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.bundle import ConfigWorkflow
from scipy import ndimage

from scripts.inferers.io_transforms import BadInputExit
from scripts.inferers.misalignment_inferer import MisalignmentInferer, axis_blocks, inference_copy, latent_size_for
from scripts.networks.misalignment_net import MisalignmentNet
from scripts.utils.constants import UNASSESSED_LABEL
from tests.helpers.synthetic_pair import image_from_array, phantom_hu, write_pair

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUT_SUFFIXES = ("misalignment.nii.gz", "probabilities.nii.gz", "overlay.png", "landmarks.csv", "run.json")


def make_workflow(tmp_path: Path, **override) -> ConfigWorkflow:
    """The bundle's network inference workflow with test overrides: tiny ConvLSTM, one 49^3 tile, float32, untrained."""
    settings = dict(
        bundle_root=str(REPO_ROOT),
        method="network",
        output_dir=str(tmp_path / "out"),
        checkpoint=str(tmp_path / "no_model.pt"),
        hidden_channels=4,
        tile_size=49,
        precision="float32",
        progress=False,
        require_lung=False,  # the phantom's lungs hold a few millilitres, below a real crop's minimum
    )
    settings.update(override)
    return ConfigWorkflow(
        config_file=str(REPO_ROOT / "configs" / "inference.json"),
        meta_file=str(REPO_ROOT / "configs" / "metadata.json"),
        logging_file=str(REPO_ROOT / "configs" / "logging.conf"),
        workflow_type="infer",
        **settings,
    )


def test_inference_workflow_writes_maps_on_the_fixed_grid(tmp_path):
    paths = write_pair(tmp_path / "data")
    workflow = make_workflow(
        tmp_path,
        fixed_image=str(paths["fixed"]),
        moving_image=str(paths["moving"]),
        landmarks=str(paths["landmarks"]),
    )
    workflow.initialize()
    assert not workflow.check_properties()
    workflow.run()
    workflow.finalize()

    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(f"moving_{s}" for s in OUTPUT_SUFFIXES)
    fixed = sitk.ReadImage(str(paths["fixed"]))
    labels = sitk.ReadImage(str(out / "moving_misalignment.nii.gz"))
    probs = sitk.ReadImage(str(out / "moving_probabilities.nii.gz"))
    for image in (labels, probs):
        assert image.GetSize() == fixed.GetSize()
        assert np.allclose(image.GetSpacing(), fixed.GetSpacing())
        assert np.allclose(image.GetOrigin(), fixed.GetOrigin())
        assert np.allclose(image.GetDirection(), fixed.GetDirection())
    assert labels.GetPixelID() == sitk.sitkUInt8
    label_values = sitk.GetArrayFromImage(labels)
    assert set(np.unique(label_values)) <= {0, 1, 2, UNASSESSED_LABEL}
    assert probs.GetNumberOfComponentsPerPixel() == 3 and probs.GetPixelID() == sitk.sitkVectorFloat32
    total = sitk.GetArrayFromImage(probs).sum(axis=-1)  # (z, y, x)
    body = np.stack([ndimage.binary_fill_holes(axial) for axial in phantom_hu() > -500])  # lungs included
    inside = total > 0
    assert inside[body].mean() > 0.9  # predicted inside the body (its edge may round either way) ...
    assert not inside[~ndimage.binary_dilation(body, iterations=2)].any()  # ... and nothing in the air around it
    np.testing.assert_allclose(total[inside], 1.0, atol=1e-5)
    assert (label_values[~inside] == UNASSESSED_LABEL).all()  # outside the region: never 0 ("correct")

    with open(out / "moving_landmarks.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = ["id", "x", "y", "z", "tre", "inside", "pred", "p_correct", "p_poor", "p_wrong", "step1", "step2"]
    assert list(rows[0]) == columns
    assert len(rows) == 5
    for row in rows:
        p = [float(row[c]) for c in ("p_correct", "p_poor", "p_wrong")]
        assert abs(sum(p) - 1.0) < 1e-3 and int(row["pred"]) == int(np.argmax(p))
        assert int(row["step1"]) in (0, 1) and int(row["step2"]) in (0, 1, 2)
    assert (out / "moving_overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_tiled_inferer_equals_whole_image_network():
    """Tiles stitched from the pyramid computed once equal the network run on the whole image as one tile."""
    net = MisalignmentNet(hidden_channels=4).eval()
    image = torch.from_numpy(phantom_hu((20, 18, 12), seed=1)).float()[None, None].repeat(1, 2, 1, 1, 1)
    image[:, 1] = torch.roll(image[:, 1], 2, dims=-1)
    with torch.no_grad():
        whole = net(image)
    mask = torch.ones(20, 18, 12, dtype=torch.bool)
    mask[12:, 12:] = False  # the block at z >= 12, y >= 12 holds no mask voxel: it must be skipped
    inferer = MisalignmentInferer(tile_size=25, precision="float32", with_steps=True, progress=False)
    starts, block = inferer.plan(mask, net.halo)
    assert block == (12, 12, 12) and len(starts) == 3  # 2 x 2 x 1 blocks, one without mask voxels
    out = inferer(image, net, mask=mask)
    tiled, steps = out["probabilities"], out["step_classes"]
    assert tiled.shape == whole.shape and steps.shape == (1, 2, 20, 18, 12)
    assert (tiled[0][:, mask] - whole[0][:, mask]).abs().max() < 1e-4
    assert tiled[0][:, ~mask].abs().max() == 0
    assert set(steps.unique().tolist()) <= {0, 1, 2}


@pytest.mark.slow
def test_inference_copy_is_the_same_function():
    """BatchNorm folding, conv + ReLU fusion and the short zero-state LSTM step leave the logits unchanged."""
    net = MisalignmentNet(hidden_channels=4)
    for module in net.modules():  # non-trivial BatchNorm statistics, so folding is really exercised
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    net.eval()
    image = torch.from_numpy(phantom_hu((12, 12, 12), seed=2)).float()[None, None].repeat(1, 2, 1, 1, 1)
    with torch.no_grad():
        levels = net.pyramid(image)
        inputs = net.tile_inputs(levels, [4, 4, 4], [25, 25, 25])
        reference = net.forward_tile(inputs)
        fast = inference_copy(net, "float32").forward_tile(
            [x.contiguous(memory_format=torch.channels_last_3d) for x in inputs]
        )
    assert (fast - reference).abs().max() < 1e-4


def test_tile_layout_covers_the_range_with_aligned_blocks():
    starts, length = axis_blocks(8, 250, 88)
    assert starts[0] == 8 and all(s % 4 == 0 for s in starts) and length % 4 == 0
    assert starts[-1] + length >= 250 and length <= 88 and len(starts) == 3
    assert latent_size_for(length, 4) % 8 == 1 and latent_size_for(length, 4) >= length + 8
    with pytest.raises(ValueError, match="1 \\+ 8k"):
        MisalignmentInferer(tile_size=96)


# --- bad inputs: each stops the run with one message naming the file, and leaves no output ---


def _write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def _bad_inputs(folder: Path, paths: dict) -> dict:
    hu = phantom_hu()
    nan = hu.astype(np.float32)
    nan[5, 5, 5] = np.nan
    far = image_from_array(hu.astype(np.int16), origin=(1000.0, 1000.0, 1000.0))
    four_d = sitk.JoinSeries([image_from_array(hu.astype(np.int16))] * 3)
    no_xyz = folder / "no_xyz.csv"
    no_xyz.write_text("id,px,py,pz\n0,1,2,3\n")
    outside = folder / "outside.csv"
    outside.write_text("id,x,y,z,tre\n5,500.0,0.0,0.0,1.0\n6,600.0,0.0,0.0,1.0\n")  # no point in the image
    garbage = folder / "garbage.nii.gz"
    garbage.write_bytes(b"not an image at all")
    return {
        "missing": ({"moving_image": str(folder / "absent.nii.gz")}, "absent.nii.gz", "not found"),
        "unreadable": ({"fixed_image": str(garbage)}, "garbage.nii.gz", "cannot be read"),
        "2-D": (
            {"moving_image": str(_write(image_from_array(hu[0].astype(np.int16)), folder / "slice.nii.gz"))},
            "slice.nii.gz",
            "2-D",
        ),
        "4-D": ({"fixed_image": str(_write(four_d, folder / "series.nii.gz"))}, "series.nii.gz", "4-D"),
        "no overlap": ({"moving_image": str(_write(far, folder / "far.nii.gz"))}, "far.nii.gz", "does not overlap"),
        "NaN": ({"moving_image": str(_write(image_from_array(nan), folder / "nan.nii.gz"))}, "nan.nii.gz", "NaN"),
        "CSV without x,y,z": ({"landmarks": str(no_xyz)}, "no_xyz.csv", "missing column"),
        "points outside": ({"landmarks": str(outside)}, "outside.csv", "row 2 \\(id 5\\).*outside the fixed image"),
    }


@pytest.mark.parametrize(
    "case", ["missing", "unreadable", "2-D", "4-D", "no overlap", "NaN", "CSV without x,y,z", "points outside"]
)
def test_bad_input_names_the_file_and_leaves_no_output(tmp_path, case):
    paths = write_pair(tmp_path / "data")
    override, file_name, problem = _bad_inputs(tmp_path / "data", paths)[case]
    settings = {
        "fixed_image": str(paths["fixed"]),
        "moving_image": str(paths["moving"]),
        "landmarks": str(paths["landmarks"]),
    }
    settings.update(override)
    workflow = make_workflow(tmp_path, **settings)
    workflow.initialize()
    with pytest.raises(BadInputExit, match=problem) as info:
        workflow.run()
    assert file_name in str(info.value)
    expected = FileNotFoundError if case == "missing" else ValueError  # the original error is kept as the cause
    assert isinstance(info.value.__cause__, expected) and file_name in str(info.value.__cause__)
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())
