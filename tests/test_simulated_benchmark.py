"""Pieces of the simulated benchmark on a small synthetic chest phantom (the real run takes minutes: not a test)."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from scripts.data.landmark_csv import read_landmarks, table_from_points, write_landmarks
from scripts.data.landmark_selection import select_landmarks
from scripts.evaluation.benchmark_methods import (
    BUNDLE_ROOT,
    MethodSpec,
    relabel_with_weights,
    run_bundle_predictor,
    run_derived,
)
from scripts.evaluation.landmark_metrics import evaluate, load_predictions
from scripts.evaluation.report import table2_markdown, table4_markdown, write_report
from scripts.evaluation.simulated_benchmark import (
    _check_scan,
    _check_work_dir,
    _record,
    _reusable,
    carry_rows,
    landmark_mask,
    run_methods,
    select_methods,
)
from scripts.transforms.ct_masks import ct_masks
from scripts.transforms.evaluation_deformation import deform_scan, draw_deformation, sliding_region


@pytest.fixture(scope="module")
def phantom() -> sitk.Image:
    """A 2.5 mm chest phantom (z, y, x = 64, 64, 64): soft-tissue torso, two lungs, random bright vessels."""
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:64, :64, :64].astype(float)
    hu = np.full((64, 64, 64), -1024.0)
    hu[((x - 32) / 28) ** 2 + ((y - 32) / 22) ** 2 < 1] = 40.0
    for cx in (20, 44):
        lung = ((x - cx) / 9) ** 2 + ((y - 32) / 14) ** 2 + ((z - 32) / 26) ** 2 < 1
        hu[lung] = -850.0
    for cz, cy, cx in rng.uniform([12, 22, 14], [52, 42, 50], (60, 3)):
        blob = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 < 1.5**2
        hu[blob & (hu < -500)] = 0.0
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing((2.5, 2.5, 2.5))
    return image


def test_evaluation_deformation_partners_and_size(phantom):
    body, lung = ct_masks(phantom)
    deformation = draw_deformation(phantom, body, lung, seed=3)
    params = deformation.parameters
    assert params["min_jacobian"] > 0.3
    assert params["max_per_axis_mm"][2] > 10.0  # larger than the training maximum of 10 mm per axis
    points = np.array([[80.0, 80.0, 60.0], [55.0, 70.0, 100.0]])
    partners = deformation.partners(points)
    assert np.allclose(partners + deformation.displacement(partners), points, atol=1e-3)  # x_M + v(x_M) = x_F
    moving = deform_scan(phantom, body, lung, deformation, seed=3)
    assert moving.GetSize() == phantom.GetSize() and moving.GetPixelID() == sitk.sitkInt16
    again = draw_deformation(phantom, body, lung, seed=3).parameters
    assert again["respiratory_si_mm"] == params["respiratory_si_mm"]  # seeded
    assert set(params["respiratory_si_mm"]) == {"right", "left"}


def test_landmarks_are_spread_and_in_lung(phantom):
    _, lung = ct_masks(phantom)
    points = select_landmarks(phantom, lung, count=20, min_spacing_mm=10.0)
    assert points.shape == (20, 3)
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1) + np.eye(20) * 1e9
    assert distances.min() >= 10.0 * 0.9**3 - 1e-6  # spacing only lowered in 10 % steps if needed
    lung_array = sitk.GetArrayViewFromImage(lung)
    for p in points:
        x, y, z = phantom.TransformPhysicalPointToIndex(p.tolist())
        assert lung_array[z, y, x] == 1


def test_predictor_not_run_without_config_or_weights(tmp_path):
    run = run_bundle_predictor(
        tmp_path / "f.nii.gz",
        tmp_path / "m.nii.gz",
        tmp_path / "p.csv",
        tmp_path,
        config_file="configs/does_not_exist.json",
    )
    assert run.status == "not run" and "does_not_exist.json" in run.reason
    (tmp_path / "inference.json").write_text("{}")
    run = run_bundle_predictor(
        tmp_path / "f.nii.gz",
        tmp_path / "m.nii.gz",
        tmp_path / "p.csv",
        tmp_path,
        config_file=tmp_path / "inference.json",
        weights="models/none_such.pt",
    )
    assert run.status == "not run" and "none_such.pt" in run.reason


def test_majority_and_report(tmp_path):
    tre = np.array([1.0, 2.0, 4.0, 8.0])
    registration = {"settings": {}}
    for setting in ("affine", "bspline20"):
        points = write_landmarks(
            table_from_points(np.zeros((4, 3)), {"tre": tre}), tmp_path / f"s_{setting}_points.csv"
        )
        registration["settings"][setting] = {"image": str(tmp_path / f"s_{setting}.nii.gz"), "points": str(points)}
    methods = (MethodSpec("majority class", "majority"), MethodSpec("RegNet-t", "pending", reason="no weights"))
    results = run_methods(registration, tmp_path / "f.nii.gz", tmp_path, methods)
    majority = results["majority class"]
    assert majority["status"] == "ran"
    assert majority["scores"]["total"]["accuracy"] == pytest.approx(0.5)
    assert majority["scores"]["total"]["cw"] == 2
    csv = tmp_path / "predictions" / "majority_class" / "s_affine_landmarks.csv"
    assert read_landmarks(csv, required=("pred", "p_correct", "p_poor", "p_wrong", "tre")).values["pred"] == ["0"] * 4
    assert load_predictions(csv).setting == "affine"
    assert results["RegNet-t"] == {"kind": "pending", "status": "not run", "reason": "no weights"}
    result = {
        "methods": results,
        "ground_truth": {"affine": {"counts": [2, 1, 1], "mean": 3.75, "median": 3.0, "max": 8.0}},
        "timing": {"total": 1.0},
    }
    files = write_report(result, tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| total | majority class | " in text and "**RegNet-t**: not run (no weights)" in text
    assert (tmp_path / "report" / "confusion_majority_class.png").stat().st_size > 1000
    assert json.loads((tmp_path / "report" / "report.json").read_text())["methods"]["RegNet-t"]["status"] == "not run"
    assert set(files) >= {"markdown", "json"}
    assert evaluate([load_predictions(csv)])["affine"]["n"] == 4


def test_guards(tmp_path):
    with pytest.raises(ValueError, match="training scan"):
        _check_scan(tmp_path / "thorax_popi_like_00.nii.gz", allow_training_scan=False)
    with pytest.raises(ValueError, match="outside the repository"):
        _check_work_dir(BUNDLE_ROOT / "work")
    _check_work_dir(tmp_path)  # outside the repository: fine


def test_sliding_region_moves_lung_and_below_only():
    lung = np.zeros((10, 5, 5), dtype=bool)
    lung[4:7, 2, 2] = True  # one lung column, z index 0 inferior
    body = np.ones_like(lung)
    region = sliding_region(lung, body)
    assert region[0, 2, 2] and region[7, 2, 2]  # below the lung, and its one-voxel dilation
    assert not region[9, 2, 2] and not region[5, 0, 0]  # above the lung, chest wall beside it
    assert np.array_equal(sliding_region(lung[::-1], body, inferior_first=False), region[::-1])


def test_table4_lists_each_step_then_the_merged_answer(tmp_path):
    tre = np.array([0.5, 2.0, 4.0, 7.0])
    extra = {"pred": ["0", "0", "1", "2"], "step1": ["0", "0", "0", "1"], "step2": ["0", "1", "1", "2"], "tre": tre}
    write_landmarks(table_from_points(np.zeros((4, 3)), extra), tmp_path / "s_affine_landmarks.csv")
    scores = evaluate([load_predictions(tmp_path / "s_affine_landmarks.csv")])
    text = table4_markdown(scores)
    rows = text.splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["step1", "step2", "final (merged)"]
    assert "0-6: 100.0, >=6: 100.0" in rows[0] and "| 75.0 |" in rows[1]  # step 2 gets 3 of 4 right


def test_evaluate_config_parses_and_its_run_resolves():
    from monai.bundle import ConfigParser

    from scripts.evaluation.simulated_benchmark import run_benchmark

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "evaluate.json"))
    parser["bundle_root"] = str(BUNDLE_ROOT)
    assert parser.get_parsed_content("benchmark") is run_benchmark  # the run list calls this entry point
    assert "@benchmark(" in parser["run"][0] and "@work_dir" in parser["run"][0]
    assert parser.get_parsed_content("output_dir").endswith("docs/benchmark")
    work = parser.get_parsed_content("work_dir")
    _check_work_dir(Path(work))  # outside the repository
    assert parser.get_parsed_content("scan").endswith("thorax_ricord1a_419639.nii.gz")


def test_baseline_methods_not_run_without_files_and_scored_when_they_run(tmp_path):
    tre = np.array([1.0, 4.0, 8.0])
    registration = {"settings": {}}
    for setting in ("affine", "bspline20"):
        points = write_landmarks(
            table_from_points(np.zeros((3, 3)), {"tre": tre}), tmp_path / f"s_{setting}_points.csv"
        )
        registration["settings"][setting] = {"image": str(tmp_path / f"s_{setting}.nii.gz"), "points": str(points)}

    def perfect(fixed, pairs, folder):  # predicts the true class: stands in for RegNet-t / NCC
        out = {}
        for setting, (image, points) in pairs.items():
            table = read_landmarks(points).with_column("pred", ["0", "1", "2"])
            out[setting] = (write_landmarks(table, folder / f"{setting}_landmarks.csv"), 0.5)
        return out

    methods = (
        MethodSpec("RegNet-t", "baseline", runner=perfect, files=("models/none_such_4mm.pt",)),
        MethodSpec("local NCC", "baseline", runner=perfect, files=("configs/evaluate.json",)),
    )
    results = run_methods(registration, tmp_path / "f.nii.gz", tmp_path, methods)
    assert results["RegNet-t"]["status"] == "not run" and "none_such_4mm.pt" in results["RegNet-t"]["reason"]
    ncc = results["local NCC"]
    assert ncc["status"] == "ran" and ncc["scores"]["total"]["n"] == 6 and ncc["scores"]["total"]["accuracy"] == 1.0
    assert set(ncc["scores"]) == {"affine", "bspline20", "total"} and ncc["seconds"]["affine"] == 0.5
    assert "configs/evaluate.json" in ncc["files_sha256"]


def test_landmark_mask_covers_each_landmark_neighbourhood(tmp_path):
    """Balls of 4 mm on an anisotropic grid: the 1 mm voxels around each landmark are in, far voxels are out."""
    image = sitk.Image(60, 50, 30, sitk.sitkInt16)
    image.SetSpacing((0.7, 0.7, 1.25))
    image.SetOrigin((-10.0, 5.0, 2.0))
    points = np.array([[5.3, 20.1, 20.0], [25.0, 30.0, 30.0]])
    csv = write_landmarks(table_from_points(points), tmp_path / "points.csv")
    mask_image = sitk.ReadImage(str(landmark_mask(_write(image, tmp_path), csv, tmp_path / "m.nii.gz")))
    assert mask_image.GetSize() == image.GetSize()
    assert np.allclose(mask_image.GetSpacing(), image.GetSpacing()) and np.allclose(
        mask_image.GetOrigin(), image.GetOrigin()
    )
    mask = sitk.GetArrayFromImage(mask_image).astype(bool)
    index = np.stack(np.nonzero(mask), -1)[:, ::-1]  # x, y, z
    physical = np.array([mask_image.TransformIndexToPhysicalPoint([int(i) for i in v]) for v in index])
    nearest = np.min(np.linalg.norm(physical[:, None] - points[None], axis=2), axis=1)
    assert nearest.max() <= 4.0 + 1e-6  # nothing beyond the radius
    for point in points:  # every grid point within 2.5 mm (the 1 mm neighbours + rounding) is in the mask
        grid = np.stack(np.nonzero(np.ones_like(mask)), -1)[:, ::-1]
        world = np.array(image.GetOrigin()) + grid * np.array(image.GetSpacing())
        near = grid[np.linalg.norm(world - point, axis=1) <= 2.5]
        assert len(near) > 0 and mask[near[:, 2], near[:, 1], near[:, 0]].all()


def _write(image: sitk.Image, folder: Path) -> Path:
    path = folder / "fixed.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def test_earlier_stages_are_reused_only_for_the_same_inputs(tmp_path):
    output = tmp_path / "moving.nii.gz"
    output.write_bytes(b"x")
    record = tmp_path / "pair.json"
    _record(record, {"seed": 0}, {"moving": str(output), "seconds": 3.0})
    assert _reusable(record, {"seed": 0}) == {"moving": str(output), "seconds": 3.0}
    assert _reusable(record, {"seed": 1}) is None  # other inputs: run again
    output.unlink()
    assert _reusable(record, {"seed": 0}) is None  # a file is gone: run again
    record.write_text("{not json")
    assert _reusable(record, {"seed": 0}) is None


def test_method_predictions_are_reused_until_their_files_change(tmp_path):
    """A second run with the same registration inputs and weights scores the recorded predictions without running
    the method; new weights (content, not name) run it again."""
    tre = np.array([1.0, 4.0, 8.0])
    points = write_landmarks(table_from_points(np.zeros((3, 3)), {"tre": tre}), tmp_path / "s_affine_points.csv")
    registration = {"settings": {"affine": {"image": str(tmp_path / "s_affine.nii.gz"), "points": str(points)}}}
    weights = tmp_path / "thresholds.json"
    weights.write_text("[1]")
    calls = []

    def perfect(fixed, pairs, folder):
        calls.append(1)
        table = read_landmarks(pairs["affine"][1]).with_column("pred", ["0", "1", "2"])
        return {"affine": (write_landmarks(table, folder / "affine_landmarks.csv"), 2.5)}

    methods = (MethodSpec("local NCC", "baseline", runner=perfect, files=(str(weights),)),)
    stage = {"seed": 0}
    first = run_methods(registration, tmp_path / "f.nii.gz", tmp_path, methods, stage_inputs=stage)
    again = run_methods(registration, tmp_path / "f.nii.gz", tmp_path, methods, stage_inputs=stage)
    assert len(calls) == 1 and again["local NCC"]["reused"] and "reused" not in first["local NCC"]
    assert again["local NCC"]["scores"] == first["local NCC"]["scores"] and again["local NCC"]["seconds"] == {
        "affine": 2.5
    }
    run_methods(registration, tmp_path / "f.nii.gz", tmp_path, methods, stage_inputs={"seed": 1})
    assert len(calls) == 2  # other registrations: predict again
    weights.write_text("[2]")
    run_methods(registration, tmp_path / "f.nii.gz", tmp_path, methods, stage_inputs={"seed": 1})
    assert len(calls) == 3  # new weights: predict again
    run_methods(registration, tmp_path / "f.nii.gz", tmp_path, methods)
    assert len(calls) == 4  # no stage inputs (reuse off): always predicts


def test_rows_not_selected_are_carried_from_an_earlier_report_of_the_same_landmarks(tmp_path):
    """``only=`` + ``carry_from``: unselected rows take the earlier run's scores, marked; rows that ran now and rows
    that did not run then stay as they are; another set of landmarks is refused."""
    truth = {"affine": {"counts": [5, 3, 2], "mean": 3.2, "median": 2.9, "max": 9.0}}
    earlier = {
        "ground_truth": truth,
        "methods": {
            "local NCC": {
                "status": "ran",
                "scores": {"total": {"mean_f1": 0.5}},
                "seconds": {"affine": 9.0},
                "csv": {"affine": "/elsewhere/affine_landmarks.csv"},
            },
            "majority class": {"status": "ran", "scores": {"total": {"mean_f1": 0.2}}},
            "RegNet-t": {"status": "not run", "reason": "no weights"},
        },
    }
    report = tmp_path / "report.json"
    report.write_text(json.dumps(earlier))
    specs = select_methods(
        (MethodSpec("local NCC", "baseline"), MethodSpec("majority class", "majority"), MethodSpec("RegNet-t", "x")),
        "majority class",
    )
    now = {s.name: {"kind": s.kind, "status": "not run", "reason": s.reason} for s in specs if s.kind == "pending"}
    now["majority class"] = {"status": "ran", "scores": {"total": {"mean_f1": 0.3}}}
    out = carry_rows(now, truth, report)
    assert out["local NCC"]["scores"] == {"total": {"mean_f1": 0.5}} and out["local NCC"]["carried_from"] == str(report)
    assert "csv" not in out["local NCC"]  # the earlier run's prediction files are not this run's
    assert out["majority class"]["scores"]["total"]["mean_f1"] == 0.3 and "carried_from" not in out["majority class"]
    assert out["RegNet-t"]["status"] == "not run"  # it did not run then either
    row = {"f1_correct": 0.5, "f1_poor": 0.5, "f1_wrong": 0.5, "mean_f1": 0.5, "accuracy": 0.5, "kappa": 0.2}
    table = table2_markdown(
        {
            **out,
            "local NCC": {**out["local NCC"], "scores": {"total": {**row, "cw": 1, "n": 10}}},
            "majority class": {"status": "ran", "scores": {"total": {**row, "cw": 1, "n": 10}}},
        }
    )
    assert "| total | local NCC (carried) |" in table and "| total | majority class |" in table
    other = {"affine": {**truth["affine"], "counts": [6, 2, 2]}}
    with pytest.raises(ValueError, match="true classes differ"):
        carry_rows(now, other, report)
    report.write_text("{}")
    with pytest.raises(ValueError, match="not a benchmark report"):
        carry_rows(now, truth, report)


def test_derived_rows_relabel_the_probabilities_of_their_source(tmp_path):
    """argmax and class-weighted rows from one prediction CSV (the probabilities stay); a weights file that is missing
    makes the row "not run" with its name."""
    table = table_from_points(np.zeros((3, 3)), {"tre": np.array([1.0, 4.0, 8.0])})
    for name, values in (
        ("pred", ["0", "0", "0"]),
        ("p_correct", [0.6, 0.5, 0.4]),
        ("p_poor", [0.3, 0.4, 0.25]),
        ("p_wrong", [0.1, 0.1, 0.35]),
    ):
        table = table.with_column(name, values)
    source = write_landmarks(table, tmp_path / "src" / "affine_landmarks.csv")
    plain = relabel_with_weights(None)(source, tmp_path / "argmax.csv")
    assert read_landmarks(plain).values["pred"] == ["0", "0", "0"]
    weights = tmp_path / "w.json"
    weights.write_text(json.dumps({"weights": [1.0, 1.5, 2.0]}))
    weighted = read_landmarks(relabel_with_weights(str(weights))(source, tmp_path / "weighted.csv"))
    assert (
        weighted.values["pred"] == ["0", "1", "2"]
        and weighted.values["p_poor"] == read_landmarks(source).values["p_poor"]
    )
    spec = MethodSpec(
        "w", "derived", source="s", relabel=relabel_with_weights(str(weights)), files=(str(tmp_path / "missing.json"),)
    )
    runs = run_derived(spec, {"status": "ran", "csv": {"affine": str(source)}, "seconds": {"affine": 1.0}}, tmp_path)
    assert runs["all"].status == "not run" and "missing.json not found" in runs["all"].reason
