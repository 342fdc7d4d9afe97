"""prepare_data on tiny synthetic scans: datalist, files, resume, seeding, bad scans, and the patch dataset."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import scripts.data.prepare_data as prepare_data
from scripts.data.patch_sampling import MisalignmentPatchDataset
from tests.helpers.chest_phantom import chest_phantom, to_image

KEYS = ("fixed", "deformed", "dvf", "body_mask", "lung_mask")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ct")
    sitk.WriteImage(sitk.Cast(chest_phantom(), sitk.sitkInt16), str(root / "chest_a.nii.gz"))
    sitk.WriteImage(sitk.Cast(chest_phantom(seed=1), sitk.sitkInt16), str(root / "chest_b.nii.gz"))
    return root


@pytest.fixture(scope="module")
def prepared(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    mp = pytest.MonkeyPatch()
    mp.setattr(prepare_data, "DVF_RECIPE", prepare_data.DVF_RECIPE[5:6])  # one single-frequency DVF, then its
    mp.setattr(prepare_data, "RECIPE_ORDER", (0,))  # "next image" version: both code paths in two pairs
    path = prepare_data.run(str(data_dir), str(out), dvfs_per_scan=2, validation_scans="chest_b", seed=0)
    mp.undo()
    return Path(path)


def test_datalist_is_valid(prepared):
    datalist = json.loads(prepared.read_text())
    assert [e["scan"] for e in datalist["training"]] == ["chest_a", "chest_a"]
    assert [e["scan"] for e in datalist["validation"]] == ["chest_b", "chest_b"]
    first, second = datalist["training"]
    assert first["next_image"] is False and second["next_image"] is True
    assert first["dvf_type"] == "single_frequency" and first["max_deformation_mm"] == 10.0
    for entry in datalist["training"] + datalist["validation"]:
        for key in KEYS:
            assert not Path(entry[key]).is_absolute() and (prepared.parent / entry[key]).is_file()
    fixed = sitk.ReadImage(str(prepared.parent / first["fixed"]))
    deformed = sitk.ReadImage(str(prepared.parent / first["deformed"]))
    dvf = sitk.ReadImage(str(prepared.parent / first["dvf"]))
    assert fixed.GetSpacing() == (1.0, 1.0, 1.0) and fixed.GetPixelID() == sitk.sitkInt16
    assert deformed.GetSize() == fixed.GetSize() and dvf.GetSpacing() == (2.0, 2.0, 2.0)
    u = sitk.GetArrayFromImage(dvf)
    assert 1.0 < np.abs(u).max() <= 10.0 + 1e-4
    assert (sitk.GetArrayViewFromImage(fixed) == -2048).any()  # background outside the body
    assert second["fixed"] != first["fixed"]  # the next image is a new fixed image with its own masks


def test_resume_skips_finished_pairs_and_seeds_reproduce(prepared, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, "DVF_RECIPE", prepare_data.DVF_RECIPE[5:6])
    monkeypatch.setattr(prepare_data, "RECIPE_ORDER", (0,))
    stamps = {p: p.stat().st_mtime_ns for p in prepared.parent.rglob("*.nii.gz")}
    prepare_data.run(str(data_dir), str(prepared.parent), dvfs_per_scan=1, validation_scans="chest_b", seed=0)
    assert {p: p.stat().st_mtime_ns for p in prepared.parent.rglob("*.nii.gz")} == stamps
    assert len(json.loads(prepared.read_text())["training"]) == 1  # the datalist lists what was asked for
    again = prepare_data.run(str(data_dir), str(tmp_path), dvfs_per_scan=1, scans=["chest_a"], seed=0)
    first = json.loads(Path(again).read_text())["training"][0]
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / first["deformed"])))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(prepared.parent / first["deformed"])))
    np.testing.assert_array_equal(a, b)  # same seed, same pair
    prepare_data.run(str(data_dir), str(prepared.parent), dvfs_per_scan=2, validation_scans="chest_b", seed=0)
    assert not list(tmp_path.rglob(".*.tmp*")), "temporary files left behind"


def test_bad_scans_error_or_skip(tmp_path):
    bad = tmp_path / "ct"
    bad.mkdir()
    sitk.WriteImage(sitk.Image([64, 64], sitk.sitkInt16), str(bad / "flat.nii.gz"))
    with pytest.raises(ValueError, match="flat.nii.gz"):
        prepare_data.run(str(bad), str(tmp_path / "out"), dvfs_per_scan=1)
    with pytest.raises(ValueError, match="no pair was written"):
        prepare_data.run(str(bad), str(tmp_path / "out"), dvfs_per_scan=1, skip_bad_scans=True)
    sitk.WriteImage(
        sitk.Cast(to_image(np.full((40, 40, 40), -1024, np.float32)), sitk.sitkInt16), str(bad / "air.nii.gz")
    )
    with pytest.raises(ValueError, match="air.nii.gz.*all-air"):
        prepare_data.run(str(bad), str(tmp_path / "out"), dvfs_per_scan=1, scans=["air"])
    with pytest.raises(FileNotFoundError, match="missing_scan"):
        prepare_data.run(str(bad), str(tmp_path / "out"), scans=["missing_scan"])


def test_patch_datasets_read_the_datalist(prepared):
    dataset = MisalignmentPatchDataset(prepared, "training", patches_per_pair=3, seed=0)
    samples = list(dataset)
    assert len(samples) == len(dataset) == 6
    for sample in samples:
        assert {"image_4mm", "image_2mm", "image_1mm", "magnitude"} <= set(sample)
        assert sample["image_2mm"].shape == (2, 101, 101, 101) and sample["magnitude"].shape == (1, 25, 25, 25)
        assert bool((sample["centre"] % 4 == 0).all())
    dataset.set_epoch(0)
    torch.testing.assert_close(next(iter(dataset))["image_1mm"], samples[0]["image_1mm"])
    regnet = MisalignmentPatchDataset(prepared, "validation", patches_per_pair=2, level=2, region="lung_mask")
    sample = next(iter(regnet))
    assert sample["image"].shape == (2, 101, 101, 101) and sample["dvf"].shape == (3, 21, 21, 21)
