"""Corrupt input: every image reader refuses a truncated or corrupt file (gzip stream, NIfTI, MetaImage, NRRD), an
image with a zero-size axis and one with a singular direction matrix, with an error naming the file; a bundle run
on such a file stops before writing anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from scripts.data.image_io import InputError, load_pair, read_image
from scripts.inferers.io_transforms import BadInputExit
from scripts.registration import elastix
from scripts.transforms.ct_masks import check_3d_image
from tests.helpers.synthetic_pair import image_from_array, phantom_hu, write_pair
from tests.test_inference_workflow import make_workflow

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_MOVING = REPO_ROOT / "sample_data" / "moving.nii.gz"
SAMPLE_FIXED = REPO_ROOT / "sample_data" / "fixed.nii.gz"
TRUNCATED_BYTES = 20_000  # the issue's case: the first 20 KB of sample_data/moving.nii.gz


def _cut(source: Path, target: Path, keep: float) -> Path:
    """``target``: the first ``keep`` fraction of ``source``'s bytes."""
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def _nifti_header_only(path: Path, shape: tuple, **fields) -> Path:
    """A NIfTI file written from a header (so nibabel keeps fields it would otherwise recompute from an affine)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    for key, value in fields.items():
        header[key] = value
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), None, header), str(path))
    return path


def _corrupt_files(folder: Path) -> Dict[str, tuple]:
    """Each bad file: (path, what the message must say)."""
    folder.mkdir(parents=True, exist_ok=True)
    hu = phantom_hu((16, 16, 16)).astype(np.int16)
    image = image_from_array(hu)
    plain = {}
    for name, compress in (("plain.nii", False), ("packed.mha", True), ("raw.mha", False), ("packed.nrrd", True)):
        plain[name] = folder / f"whole_{name}"
        sitk.WriteImage(image, str(plain[name]), compress)
    flipped = bytearray(SAMPLE_MOVING.read_bytes())
    middle = len(flipped) // 2
    flipped[middle : middle + 64] = bytes(255 - b for b in flipped[middle : middle + 64])
    (folder / "flipped.nii.gz").write_bytes(bytes(flipped))
    (folder / "truncated.nii.gz").write_bytes(SAMPLE_MOVING.read_bytes()[:TRUNCATED_BYTES])
    zero_mha = folder / "zero.mha"
    zero_mha.write_bytes(plain["raw.mha"].read_bytes().replace(b"DimSize = 16 16 16", b"DimSize = 16 16 0"))
    singular_mha = folder / "singular.mha"
    rows_repeated = b"TransformMatrix = 1 0 0 1 0 0 0 0 1"  # the first row twice: determinant 0
    singular_mha.write_bytes(
        plain["raw.mha"].read_bytes().replace(b"TransformMatrix = 1 0 0 0 1 0 0 0 1", rows_repeated)
    )
    return {
        "truncated .nii.gz": (folder / "truncated.nii.gz", "truncated or corrupt gzip stream"),
        "corrupt .nii.gz": (folder / "flipped.nii.gz", "truncated or corrupt gzip stream"),
        "truncated .nii": (_cut(plain["plain.nii"], folder / "cut.nii", 0.6), "truncated NIfTI file"),
        "truncated compressed .mha": (_cut(plain["packed.mha"], folder / "cut_packed.mha", 0.6), "compressed data"),
        "truncated raw .mha": (_cut(plain["raw.mha"], folder / "cut_raw.mha", 0.8), "truncated MetaImage data"),
        "truncated compressed .nrrd": (_cut(plain["packed.nrrd"], folder / "cut.nrrd", 0.6), "cannot be read"),
        "zero-size axis .nii.gz": (_nifti_header_only(folder / "zero.nii.gz", (16, 16, 0)), "zero-size axis"),
        "zero-size axis .mha": (zero_mha, "zero-size axis"),
        "singular direction .nii.gz": (
            _nifti_header_only(
                folder / "singular.nii.gz",
                (16, 16, 16),
                sform_code=1,
                qform_code=0,
                srow_x=[1, 0, 0, 0],
                srow_y=[1, 0, 0, 0],
                srow_z=[0, 0, 1, 0],
            ),
            "direction matrix in the header is singular",
        ),
        "singular direction .mha": (singular_mha, "direction matrix in the header is singular"),
    }


CASES = [
    "truncated .nii.gz",
    "corrupt .nii.gz",
    "truncated .nii",
    "truncated compressed .mha",
    "truncated raw .mha",
    "truncated compressed .nrrd",
    "zero-size axis .nii.gz",
    "zero-size axis .mha",
    "singular direction .nii.gz",
    "singular direction .mha",
]
READERS: Dict[str, Callable[[Path], object]] = {
    "data.read_image": lambda path: read_image(path, "moving image"),
    "elastix.read_image": lambda path: elastix.read_image(path, "moving image"),
    "load_pair": lambda path: load_pair(SAMPLE_FIXED, path),
}


@pytest.fixture(scope="module")
def corrupt_files(tmp_path_factory) -> Dict[str, tuple]:
    return _corrupt_files(tmp_path_factory.mktemp("corrupt"))


def test_simpleitk_alone_reads_the_truncated_sample_silently(corrupt_files):
    """The reason for the checks: SimpleITK returns the issue's truncated file as an image that is mostly zeros."""
    path, _ = corrupt_files["truncated .nii.gz"]
    values = sitk.GetArrayViewFromImage(sitk.ReadImage(str(path)))
    assert (values == 0).mean() > 0.9


def test_the_intact_files_are_read(corrupt_files):
    """The checks do not refuse good files of each format (the uncut originals the bad files are made from)."""
    folder = corrupt_files["truncated .nii"][0].parent
    for path in [SAMPLE_MOVING, *sorted(folder.glob("whole_*"))]:
        image = read_image(path, "moving image")
        assert min(image.GetSize()) >= 16


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("case", CASES)
def test_every_reader_refuses_the_bad_file_naming_it(corrupt_files, reader, case):
    path, problem = corrupt_files[case]
    with pytest.raises(InputError, match=problem) as info:
        READERS[reader](path)
    assert str(path) in str(info.value)


def test_check_3d_image_refuses_zero_size_and_singular_direction():
    with pytest.raises(ValueError, match="scan.nii.gz: the image has a zero-size axis"):
        check_3d_image(sitk.Image([10, 10, 0], sitk.sitkFloat32), "scan.nii.gz")
    flat = sitk.Image([10, 10, 10], sitk.sitkFloat32)
    flat.SetDirection([1, 0, 0, 1e-9, 1e-9, 0, 0, 0, 1])  # ITK accepts this nearly flat orientation
    with pytest.raises(ValueError, match="scan.nii.gz: the direction matrix .* is singular"):
        check_3d_image(flat, "scan.nii.gz")
    check_3d_image(sitk.Image([10, 10, 10], sitk.sitkFloat32), "scan.nii.gz")  # a proper volume passes


@pytest.mark.parametrize("method", ["network", "reregistration"])
def test_bundle_run_stops_on_a_truncated_moving_image_and_writes_nothing(tmp_path, corrupt_files, method):
    paths = write_pair(tmp_path / "data")
    truncated, _ = corrupt_files["truncated .nii.gz"]
    workflow = make_workflow(
        tmp_path,
        fixed_image=str(paths["fixed"]),
        moving_image=str(truncated),
        landmarks="",
        method=method,
        calibration_file="",
    )
    workflow.initialize()
    with pytest.raises(BadInputExit, match="truncated or corrupt gzip stream") as info:
        workflow.run()
    assert str(truncated) in str(info.value)
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_bundle_command_exits_non_zero_on_the_issue_file(tmp_path):
    """The issue's reproduction: the first 20 KB of the sample's moving image, through the README command."""
    truncated = tmp_path / "moving.nii.gz"
    truncated.write_bytes(SAMPLE_MOVING.read_bytes()[:TRUNCATED_BYTES])
    fixed = tmp_path / "fixed.nii.gz"  # the user's copy: the shipped sample beside a user's image is refused
    fixed.write_bytes(SAMPLE_FIXED.read_bytes())
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.json",
        "--fixed_image",
        str(fixed),
        "--moving_image",
        str(truncated),
        "--output_dir",
        str(out),
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"{truncated}: truncated or corrupt gzip stream" in result.stdout + result.stderr
    assert not out.exists() or not any(out.iterdir())
