"""A tiny prepared dataset for the training tests: two synthetic chest phantoms through scripts.data.prepare_data.

One phantom gives the "training" pair, the other the "validation" pair (one DVF each); prepared once per test
session and shared, read-only, by the training tests.
"""

from pathlib import Path

import SimpleITK as sitk
import torch

from scripts.data.prepare_data import run as prepare_data
from scripts.networks.misalignment_net import MisalignmentNet
from tests.helpers.chest_phantom import chest_phantom

_PREPARED: dict = {}


def prepared_dataset(tmp_path_factory) -> Path:
    """Directory with ``datalist.json`` (1 training, 1 validation pair), made on first use in this session."""
    if "dir" not in _PREPARED:
        root = tmp_path_factory.mktemp("prepared")
        scans = root / "ct"
        scans.mkdir()
        sitk.WriteImage(chest_phantom(seed=0), str(scans / "phantom_train.nii.gz"))
        sitk.WriteImage(chest_phantom(seed=1), str(scans / "phantom_val.nii.gz"))
        prepare_data(
            data_dir=str(scans), output_dir=str(root / "data"), dvfs_per_scan=1, validation_scans=["phantom_val"]
        )
        _PREPARED["dir"] = root / "data"
    return _PREPARED["dir"]


def untrained_weights(folder: Path, decoder: str = "single_cnn") -> Path:
    """``folder/weights.pt``: the state_dict of a freshly initialised network (seed 0), for scoring pipelines."""
    torch.manual_seed(0)
    path = folder / "weights.pt"
    torch.save(MisalignmentNet(decoder=decoder).state_dict(), path)
    return path
