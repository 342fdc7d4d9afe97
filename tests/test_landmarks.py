"""Landmark tables of the inference contract (scripts.data.landmarks) and the overlay PNG (scripts.inferers.overlay)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk

from scripts.data.image_io import Grid, InputError
from scripts.data.landmark_csv import read_landmarks
from scripts.data.landmarks import (
    assessed_rows,
    read_landmarks_in_image,
    sample_nearest,
    true_classes,
    with_predictions,
    write_landmark_predictions,
)
from scripts.inferers.overlay import choose_slices, overlay_title, save_overlay
from tests.helpers.synthetic_pair import write_pair


@pytest.fixture
def pair(tmp_path):
    paths = write_pair(tmp_path)
    return paths, Grid.of(sitk.ReadImage(str(paths["fixed"])))


def test_csv_without_xyz_names_the_file(pair, tmp_path):
    _, grid = pair
    path = tmp_path / "columns.csv"
    path.write_text("id,i,j,k\n0,1,2,3\n")
    with pytest.raises(ValueError, match="columns.csv: missing column\\(s\\) \\['x', 'y', 'z'\\]"):
        read_landmarks_in_image(path, grid, "fixed.nii.gz")
    path.write_text("id,x,y,z\n0,1,two,3\n")
    with pytest.raises(ValueError, match="columns.csv: row 2, column 'y': 'two' is not a number"):
        read_landmarks_in_image(path, grid, "fixed.nii.gz")


def test_a_table_wholly_outside_the_fixed_image_names_file_row_and_id(pair, tmp_path):
    paths, grid = pair
    path = tmp_path / "outside.csv"
    path.write_text("id,x,y,z,tre\n7,-20.0,10.0,400.0,2.0\n8,-20.0,10.0,500.0,2.0\n")
    with pytest.raises(InputError, match="outside.csv: row 2 \\(id 7\\): point .* outside the fixed image fixed.nii"):
        read_landmarks_in_image(path, grid, "fixed.nii.gz")
    partly = tmp_path / "partly.csv"  # some points outside a cropped image: kept, they are marked unassessed later
    partly.write_text(paths["landmarks"].read_text() + "7,-20.0,10.0,400.0,2.0\n")
    assert len(read_landmarks_in_image(partly, grid, "fixed.nii.gz")) == 6
    table = read_landmarks_in_image(paths["landmarks"], grid, "fixed.nii.gz")
    assert len(table) == 5 and true_classes(table).tolist() == [0, 1, 2, 0, 1]


def test_predictions_are_added_and_written_atomically(pair, tmp_path):
    paths, grid = pair
    table = read_landmarks(paths["landmarks"])
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.0, 0.0, 0.0], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    steps = np.array([[0, 0], [0, 1], [0, 0], [1, 2], [0, 0]])
    out = write_landmark_predictions(tmp_path / "out" / "m_landmarks.csv", table, probabilities, steps)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["m_landmarks.csv"]
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = ["id", "x", "y", "z", "tre", "inside", "pred", "p_correct", "p_poor", "p_wrong", "step1", "step2"]
    assert list(rows[0]) == columns
    assert [r["pred"] for r in rows] == ["0", "1", "", "2", "0"]  # all-zero row (outside the mask): not assessed
    assert [r["inside"] for r in rows] == ["1", "1", "0", "1", "1"]
    assert all(rows[2][c] == "" for c in columns[6:])  # never read as "correct"
    assert rows[3]["step2"] == "2" and rows[1]["p_poor"] == "0.6000" and rows[0]["tre"] == "1.0"
    cnn = with_predictions(table, probabilities, None)  # CNN decoders have no earlier steps
    assert "step1" not in cnn.columns and cnn.columns[-1] == "p_wrong"
    weighted = with_predictions(table, probabilities, None, class_weights=[1.0, 2.0, 1.0])  # the mean-F1 decision
    assert weighted.values["pred"] == ["0", "1", "", "2", "1"]  # 0.4 * 2 > 0.5: the last row turns poor
    assessed = assessed_rows(weighted)
    assert assessed.tolist() == [True, True, False, True, True]
    np.testing.assert_allclose(
        weighted.rows(assessed).float_columns(["p_correct", "p_poor", "p_wrong"]), probabilities[assessed]
    )
    explicit = with_predictions(table, probabilities, None, inside=np.array([1, 0, 1, 1, 1], bool))
    assert explicit.values["inside"] == ["1", "0", "1", "1", "1"] and explicit.values["pred"][1] == ""


def test_sample_nearest_reads_the_voxel_under_each_point():
    grid = Grid((4, 5, 6), (10.0, 20.0, 30.0), (1.0, 1.0, 1.0), tuple(np.eye(3).ravel()))
    volume = np.arange(2 * 6 * 5 * 4, dtype=float).reshape(2, 6, 5, 4)  # (c, z, y, x)
    points = np.array([[10.0, 20.0, 30.0], [13.2, 21.9, 34.6]])  # voxel (0,0,0) and voxel x=3, y=2, z=5
    values = sample_nearest(volume, grid, points)
    assert values.shape == (2, 2)
    assert values[0].tolist() == [volume[0, 0, 0, 0], volume[1, 0, 0, 0]]
    assert values[1].tolist() == [volume[0, 5, 2, 3], volume[1, 5, 2, 3]]


def test_overlay_png_is_written_and_slices_follow_the_landmarks(pair, tmp_path):
    paths, _ = pair
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["fixed"]))).astype(np.float32)
    image = np.stack([hu, np.roll(hu, 1, axis=2)])
    labels = np.where(hu > -500, (np.arange(hu.shape[2]) // 8) % 3, -1)
    grid = Grid.of(sitk.ReadImage(str(paths["fixed"])))
    table = read_landmarks(paths["landmarks"])
    index = grid.continuous_index(table.points())
    z, y = choose_slices(labels, index)
    assert abs(z - np.median(index[:, 2])) <= 3 and abs(y - index[0, 1]) <= 3
    assert choose_slices(labels, None)[0] == pytest.approx((hu.shape[0] - 1) / 2, abs=1)
    for trained in (True, False):
        path = save_overlay(tmp_path / f"overlay_{trained}.png", image, labels, grid, table, "case", trained)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["overlay_False.png", "overlay_True.png"]


def test_overlay_title_says_plainly_when_weights_are_untrained():
    text, colour = overlay_title("moving", trained=False)
    assert "UNTRAINED WEIGHTS - NOT A PREDICTION" in text and colour != "black"
    assert "UNTRAINED" not in overlay_title("moving", trained=True)[0]


def test_overlay_title_warns_about_a_constant_map():
    text, colour = overlay_title("moving", trained=True, note="the map is constant")
    assert "WARNING: the map is constant" in text and colour != "black"
