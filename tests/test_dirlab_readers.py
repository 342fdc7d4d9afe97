"""DIR-Lab raw readers on synthetic raw files of the published sizes (the real data cannot be downloaded here)."""

import numpy as np
import pytest
import SimpleITK as sitk

from scripts.data.dirlab import (
    DIRLAB_4DCT,
    DIRLAB_COPD,
    convert_pair,
    read_dirlab_image,
    read_dirlab_landmarks,
)
from scripts.data.landmark_csv import read_landmarks
from scripts.utils.constants import BACKGROUND_HU


def _write_raw(path, case: str) -> np.ndarray:
    """A raw volume whose stored value encodes the raw slice index (z, y, x order), plus an outside-scan corner."""
    nx, ny, nz = DIRLAB_4DCT.get(case, DIRLAB_COPD.get(case)).size
    raw = np.broadcast_to((np.arange(nz) * 10).astype("<i2")[:, None, None], (nz, ny, nx)).copy()
    raw[:, 0, 0] = -2000  # becomes -3024 HU: outside the scan
    raw.tofile(path)
    return raw


def test_published_tables_are_complete():
    assert len(DIRLAB_4DCT) == 10 and len(DIRLAB_COPD) == 10
    assert DIRLAB_4DCT["case1"].size == (256, 256, 94) and DIRLAB_4DCT["case1"].spacing == (0.97, 0.97, 2.5)
    assert DIRLAB_4DCT["case7"].size == (512, 512, 136)
    assert DIRLAB_COPD["copd10"].size == (512, 512, 135) and DIRLAB_COPD["copd10"].spacing[0] == 0.742
    for case in DIRLAB_4DCT.values():  # docs/method.md section 10 ranges
        assert case.spacing[2] == 2.5 and 0.97 <= case.spacing[0] <= 1.16
    for case in DIRLAB_COPD.values():
        assert case.size[:2] == (512, 512) and 0.58 <= case.spacing[0] <= 0.75


def test_image_flip_hu_and_outside(tmp_path):
    raw = _write_raw(tmp_path / "case1_T00_s.img", "case1")
    image = read_dirlab_image(tmp_path / "case1_T00_s.img", "case1")
    assert image.GetSize() == (256, 256, 94)
    assert image.GetSpacing() == pytest.approx((0.97, 0.97, 2.5))
    assert image.GetPixelID() == sitk.sitkInt16
    array = sitk.GetArrayFromImage(image)
    nz = raw.shape[0]
    assert array[0, 5, 5] == raw[nz - 1, 5, 5] - 1024  # z flipped
    assert array[nz - 1, 5, 5] == raw[0, 5, 5] - 1024
    assert (array[:, 0, 0] == BACKGROUND_HU).all()


def test_landmarks_to_physical_points(tmp_path):
    path = tmp_path / "lm.txt"
    path.write_text("1\t1\t1\n10  20  94\n")
    points = read_dirlab_landmarks(path, "case1")
    # 0-based indices after the flip: (x-1, y-1, nz - z) with nz = 94
    assert np.allclose(points[0], [0.0, 0.0, 93 * 2.5])
    assert np.allclose(points[1], [9 * 0.97, 19 * 0.97, 0.0])


def test_landmark_on_flipped_image_hits_the_marked_voxel(tmp_path):
    nx, ny, nz = DIRLAB_4DCT["case2"].size
    raw = np.zeros((nz, ny, nx), dtype="<i2")
    raw[30, 100, 40] = 3000  # 0-based raw (z, y, x); 1-based landmark x=41, y=101, z=31
    raw.tofile(tmp_path / "img.img")
    (tmp_path / "lm.txt").write_text("41 101 31\n")
    image = read_dirlab_image(tmp_path / "img.img", "case2")
    point = read_dirlab_landmarks(tmp_path / "lm.txt", "case2")[0]
    index = image.TransformPhysicalPointToIndex(point.tolist())
    assert image[index] == 3000 - 1024


def test_convert_pair_writes_contract_csv(tmp_path):
    for name in ("f.img", "m.img"):
        _write_raw(tmp_path / name, "copd2")
    (tmp_path / "f.txt").write_text("1 2 3\n4 5 6\n")
    (tmp_path / "m.txt").write_text("2 3 4\n5 6 7\n")
    out = convert_pair(
        "copd2", tmp_path / "f.img", tmp_path / "m.img", tmp_path / "out", tmp_path / "f.txt", tmp_path / "m.txt"
    )
    table = read_landmarks(out["fixed_landmarks"], required=("id", "x", "y", "z", "voxel_x", "voxel_y", "voxel_z"))
    assert table.columns[:4] == ["id", "x", "y", "z"]
    assert np.allclose(table.points()[0], [0.0, 0.645, (102 - 3) * 2.5])
    assert sitk.ReadImage(out["moving_image"]).GetSize() == (512, 512, 102)
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left behind


def test_bad_inputs_name_the_file(tmp_path):
    np.zeros(1000, dtype="<i2").tofile(tmp_path / "short.img")
    with pytest.raises(ValueError, match="short.img.*2000 bytes.*case1"):
        read_dirlab_image(tmp_path / "short.img", "case1")
    _write_raw(tmp_path / "c1.img", "case1")
    with pytest.raises(ValueError, match=r"c1.img.*fits \['case1'\]"):
        read_dirlab_image(tmp_path / "c1.img", "case3")
    (tmp_path / "two.txt").write_text("1 2\n")
    with pytest.raises(ValueError, match="two.txt: line 1 has 2 columns"):
        read_dirlab_landmarks(tmp_path / "two.txt", "case1")
    (tmp_path / "f.txt").write_text("1 2 3\n4 5 6\n")
    (tmp_path / "m.txt").write_text("1 2 3\n")
    with pytest.raises(ValueError, match="m.txt: 1 landmarks, but .*f.txt has 2"):
        convert_pair(
            "case1", tmp_path / "c1.img", tmp_path / "c1.img", tmp_path / "o", tmp_path / "f.txt", tmp_path / "m.txt"
        )
    (tmp_path / "out.txt").write_text("300 2 3\n")
    with pytest.raises(ValueError, match="out.txt: landmark 1"):
        read_dirlab_landmarks(tmp_path / "out.txt", "case1")
    with pytest.raises(ValueError, match="unknown DIR-Lab case"):
        read_dirlab_image(tmp_path / "c1.img", "case11")
