"""Landmark metrics on small hand-computed cases."""

import json

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from scripts.data.landmark_csv import read_landmarks, table_from_points, write_landmarks
from scripts.evaluation.landmark_metrics import (
    classification_scores,
    evaluate,
    format_scores,
    load_predictions,
    main,
    setting_from_name,
    step_scores,
    true_classes,
)

TRE = np.array([0.5, 1.0, 2.0, 4.0, 5.0, 7.0, 8.0, 10.0, 2.5, 6.0])  # 6.0 mm is already wrong
PRED = np.array([0, 0, 1, 1, 2, 2, 0, 2, 0, 2])
STEP1 = np.array([0, 0, 0, 0, 1, 1, 0, 1, 0, 1])


def _write_predictions(path, tre=TRE, pred=PRED, step1=STEP1, drop=()):
    extra = {
        "pred": [str(v) for v in pred],
        "p_correct": np.full(len(tre), 0.5),
        "p_poor": np.full(len(tre), 0.25),
        "p_wrong": np.full(len(tre), 0.25),
        "step1": [str(v) for v in step1],
        "step2": [str(v) for v in true_classes(tre)],
        "tre": tre,
    }
    for name in drop:
        extra.pop(name)
    write_landmarks(table_from_points(np.zeros((len(tre), 3)), extra), path)
    return path


def test_hand_computed_scores():
    s = classification_scores(true_classes(TRE), PRED)
    assert s["confusion"] == [[3, 1, 0], [0, 1, 1], [1, 0, 3]]  # rows actual, columns predicted
    assert s["f1_correct"] == pytest.approx(0.75)
    assert s["f1_poor"] == pytest.approx(0.5)
    assert s["f1_wrong"] == pytest.approx(0.75)
    assert s["mean_f1"] == pytest.approx(2 / 3)
    assert s["accuracy"] == pytest.approx(0.7)
    assert s["kappa"] == pytest.approx((0.7 - 0.36) / 0.64)  # p_o = 0.7, p_e = (16 + 4 + 16) / 100
    assert s["kappa"] == pytest.approx(cohen_kappa_score(true_classes(TRE), PRED))
    assert s["cw"] == 1
    assert s["n"] == 10


def test_cw_counts_both_directions():
    s = classification_scores(np.array([0, 0, 2, 2, 2, 1]), np.array([2, 2, 0, 2, 2, 1]))
    assert s["cw"] == 3


def test_step_scores_use_their_own_groups():
    steps = step_scores(TRE, {1: STEP1, 2: true_classes(TRE)}, "6-3-1")
    assert steps["step1"]["confusion"] == [[5, 1], [1, 3]]
    assert steps["step1"]["f1_0-6"] == pytest.approx(5 / 6)
    assert steps["step1"]["f1_>=6"] == pytest.approx(0.75)
    assert steps["step1"]["accuracy"] == pytest.approx(0.8)
    assert "cw" not in steps["step1"]
    assert steps["step2"]["accuracy"] == 1.0 and steps["step2"]["f1_3-6"] == 1.0
    twelve = step_scores(np.array([1.0, 7.0, 13.0]), {1: np.array([0, 0, 1])}, "12-6-3")
    assert twelve["step1"]["confusion"] == [[2, 0], [0, 1]]  # step 1 of 12-6-3 splits at 12 mm


def test_settings_and_total(tmp_path):
    a = load_predictions(_write_predictions(tmp_path / "scan_affine_landmarks.csv"))
    b = load_predictions(_write_predictions(tmp_path / "scan_bspline20_landmarks.csv", pred=true_classes(TRE)))
    assert (a.setting, b.setting) == ("affine", "bspline20")
    scores = evaluate([b, a])
    assert list(scores) == ["affine", "bspline20", "total"]
    assert scores["bspline20"]["accuracy"] == 1.0
    assert scores["total"]["n"] == 20
    assert scores["total"]["accuracy"] == pytest.approx(17 / 20)
    assert scores["total"]["steps"]["step1"]["n"] == 20


def test_unassessed_landmarks_are_skipped_and_counted(tmp_path):
    path = _write_predictions(tmp_path / "scan_affine_landmarks.csv")
    table = read_landmarks(path)
    inside = ["1"] * len(TRE)
    inside[2] = inside[5] = "0"  # outside the region: written with an empty pred
    table = table.with_column("inside", inside).with_column(
        "pred", ["" if flag == "0" else v for flag, v in zip(inside, table.values["pred"])]
    )
    write_landmarks(table, path)
    predictions = load_predictions(path)
    assert predictions.unassessed == 2 and len(predictions.tre) == len(TRE) - 2
    np.testing.assert_array_equal(predictions.pred, np.delete(PRED, [2, 5]))
    scores = evaluate([predictions])
    assert scores["total"]["n"] == len(TRE) - 2 and scores["total"]["unassessed"] == 2
    assert "2 landmark(s) not assessed" in format_scores(scores)


def test_setting_from_name_is_token_exact():
    assert setting_from_name("x_bspline2000_landmarks.csv") == "bspline2000"
    assert setting_from_name("x_bspline20_landmarks.csv") == "bspline20"
    assert setting_from_name("nothing_here.csv") is None


def test_tre_from_paired_points(tmp_path):
    moving = np.array([[1.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 9.0]])
    extra = {"pred": ["0", "1", "2"], "x_moving": np.zeros(3), "y_moving": np.zeros(3), "z_moving": np.zeros(3)}
    write_landmarks(table_from_points(np.zeros((3, 3)), extra), tmp_path / "p_affine_landmarks.csv")
    write_landmarks(table_from_points(moving), tmp_path / "truth.csv")
    p = load_predictions(tmp_path / "p_affine_landmarks.csv", moving_landmarks=tmp_path / "truth.csv")
    assert np.allclose(p.tre, [1.0, 4.0, 9.0])


def test_missing_columns_name_file_and_columns(tmp_path):
    path = _write_predictions(tmp_path / "bad_landmarks.csv", drop=("pred", "tre"))
    with pytest.raises(ValueError, match=r"bad_landmarks.csv: missing column\(s\) \['pred', 'tre'\]"):
        load_predictions(path)
    path = _write_predictions(tmp_path / "range_landmarks.csv", pred=np.array([0, 1, 3, 0, 0, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="range_landmarks.csv: column 'pred' holds values outside 0..2"):
        load_predictions(path)


def test_cli_writes_json(tmp_path, capsys):
    _write_predictions(tmp_path / "scan_bspline500_landmarks.csv")
    main(str(tmp_path), output=str(tmp_path / "scores.json"))
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["bspline500"]["cw"] == 1 and scores["total"]["n"] == 10
    assert "bspline500" in capsys.readouterr().out
