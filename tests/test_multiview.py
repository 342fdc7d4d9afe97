"""The multiview estimator: each view on a synthetic pair with a known deformation, the combiner's file round trip
and refusal, and ``--method multiview`` through ConfigWorkflow."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from monai.bundle import ConfigWorkflow
from scipy import ndimage

import scripts.registration.combiner_fit as combiner_fit
import scripts.registration.views as views
from scripts.inferers.io_transforms import BadInputExit
from scripts.inferers.reregistration_inferer import MultiviewInferer
from scripts.registration.ants_registration import AntsError, AntsOptions
from scripts.registration.ants_registration import register as ants_register
from scripts.registration.calibration_tables import options_sha256
from scripts.registration.combiner import CombinerMismatch, ViewCombiner
from scripts.registration.reregistration import ReregistrationOptions
from scripts.registration.views import ViewError, ViewOptions, compute_views
from tests.helpers.chest_phantom import chest_phantom_arrays
from tests.test_reregistration import textured, warp, write_phantom_pair

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPE = (48, 56, 56)  # (z, y, x) at 1 mm


def smooth_deformation() -> np.ndarray:
    """A smooth displacement ``[3, z, y, x]`` in voxels (z, y, x components) of up to 3 mm."""
    z, y, x = np.indices(SHAPE).astype(np.float64)
    return np.stack(
        [
            1.5 * np.sin(2 * np.pi * y / SHAPE[1]),
            1.0 * np.cos(2 * np.pi * z / SHAPE[0]),
            3.0 * np.sin(2 * np.pi * z / SHAPE[0]) * np.cos(np.pi * y / SHAPE[1]),
        ]
    )


def known_pair() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A phantom pair D(x) = F(x + u(x)): image ``[2, z, y, x]``, the body, the lungs and the true r = -u
    (``[3, z, y, x]``, components x, y, z, mm)."""
    hu, body, lungs = chest_phantom_arrays(SHAPE, seed=5, gas=False)
    u = smooth_deformation()
    return np.stack([hu, warp(hu, u)]), body, lungs, (-u[::-1]).astype(np.float32)


@pytest.mark.slow
def test_ants_view_finds_a_known_smooth_deformation_within_half_a_millimetre():
    image, body, _, truth = known_pair()
    fixed, moving = (sitk.GetImageFromArray(a) for a in image)
    options = AntsOptions(transform="syn", syn_metric="CC", syn_iterations=(60, 40, 20))
    t = np.moveaxis(sitk.GetArrayFromImage(ants_register(fixed, moving, options)), -1, 0)
    sel = textured(image[0], body)
    error = np.linalg.norm(t[:, sel] - truth[:, sel], axis=0)
    assert np.median(error) < 0.5
    assert np.median(np.linalg.norm(truth[:, sel], axis=0)) > 1.0  # a real deformation there


ANTS_REPEATS = """
import hashlib
import numpy as np, SimpleITK as sitk
from scripts.registration.ants_registration import AntsOptions, register
noise = np.random.default_rng(0).normal(0, 300, (56, 56, 56)).astype(np.float32)
fixed = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(noise), 2.0)
fixed.SetSpacing((2.0, 2.0, 2.0))
moving = sitk.Resample(fixed, sitk.TranslationTransform(3, (1.5, 1.5, 1.5)), sitk.sitkLinear, 0.0)
for seed in (7, 7, 8):
    options = AntsOptions(transform="syn", syn_iterations=(20, 10, 0), threads=1, random_seed=seed)
    print(hashlib.sha256(sitk.GetArrayFromImage(register(fixed, moving, options)).tobytes()).hexdigest())
"""


def test_ants_on_one_thread_repeats_bit_for_bit_with_its_seed():
    """The seed reaches ANTs (``ants.registration`` drops unknown keywords): on one thread the same seed gives the same
    field twice, another seed another field (the affine stage samples the metric at random). In a fresh process:
    ANTs' ITK takes its thread count once, at a process's first registration."""
    run = subprocess.run([sys.executable, "-c", ANTS_REPEATS], cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    first, again, other = run.stdout.split()
    assert first == again and first != other


def test_views_of_a_perfect_re_registration_on_a_known_deformation():
    """With r = the true misalignment every view says what it should: |r| is the truth, warping by r restores the
    local similarity, the Jacobian of a smooth field is near 1, the lungs are inside, flat air has no structure."""
    image, body, lungs, truth = known_pair()
    options = ViewOptions(working_spacing_mm=None)
    features, seconds = compute_views(image, truth, body, 1.0, options)
    named = dict(zip(options.features, features))
    assert features.shape == (len(options.features),) + SHAPE and np.isfinite(features).all()
    assert set(seconds) >= {"residual", "neighbourhood", "similarity", "texture", "lung"}
    np.testing.assert_allclose(np.expm1(named["log1p_r"]), np.linalg.norm(truth, axis=0), rtol=1e-4, atol=1e-4)
    assert (named["log1p_max_r_4mm"] >= named["log1p_r"] - 1e-4).all()
    sel = textured(image[0], body)
    assert np.median(named["ncc_after"][sel]) > 0.95 > np.median(named["ncc_before"][sel])
    assert np.median(named["ncc_gain"][sel]) > 0.05
    assert np.median(named["abs_difference_after_hu"][sel]) < 0.6 * np.median(named["abs_difference_before_hu"][sel])
    assert abs(np.median(named["jacobian_r"][body]) - 1.0) < 0.05
    assert np.median(named["lung_depth_mm"][lungs]) > 0 > np.median(named["lung_depth_mm"][~body])
    air = ~ndimage.binary_dilation(body, iterations=5)  # away from the skin's edge
    assert np.percentile(named["structure_min_eigenvalue"][air], 90) < 0.2 * np.median(
        named["structure_min_eigenvalue"][sel]
    )


def test_views_on_a_working_grid_come_back_on_the_pair_grid():
    image, body, _, truth = known_pair()
    features, _ = compute_views(image, truth, body, 1.0, ViewOptions(working_spacing_mm=2.0))
    assert features.shape[1:] == SHAPE and np.isfinite(features).all()
    native, _ = compute_views(image, truth, body, 1.0, ViewOptions(working_spacing_mm=None))
    depth = ViewOptions().features.index("lung_depth_mm")
    inner = textured(image[0], body)
    assert np.median(np.abs(features[depth][inner] - native[depth][inner])) < 2.0  # mm
    thick, _ = compute_views(image, truth, body, (1.0, 1.0, 3.0), ViewOptions(working_spacing_mm=2.0))  # 3 mm slices
    assert thick.shape[1:] == SHAPE and np.isfinite(thick).all()


def test_context_view_is_the_pair_level_size_of_r_and_leaves_the_default_hash():
    """The context view is the same at every voxel: the median and 90th percentile of |r| over the region; adding
    the view to the vocabulary changes neither the default features nor the hash the shipped combiner was fitted for.
    """
    image, body, _, truth = known_pair()
    options = ViewOptions(views=("residual", "context"), working_spacing_mm=None)
    features, seconds = compute_views(image, 2.0 * truth, body, 1.0, options)
    named = dict(zip(options.features, features))
    size = np.linalg.norm(2.0 * truth, axis=0)[body]
    for key, q in (("log1p_median_r_region", 50), ("log1p_p90_r_region", 90)):
        assert np.ptp(named[key]) == 0
        assert np.expm1(named[key][0, 0, 0]) == pytest.approx(np.percentile(size, q), rel=1e-5)
    assert "context" in seconds
    shipped = json.loads((REPO_ROOT / "models" / "multiview_combiner.json").read_text())
    assert ViewOptions().sha256() == shipped["views_sha256"]
    assert "log1p_median_r_region" not in ViewOptions().features


def test_matching_view_finds_a_known_local_shift_and_nothing_after_a_perfect_r():
    """Block matching on a known deformation: D(x) = F(x + u) with u = 2 mm along x inside a box: where r misses u
    the matched shift is u within 0.5 mm at textured voxels; where r = the truth there is nothing left to match. Its
    settings enter the hash only when the view is on."""
    hu, body, _ = chest_phantom_arrays(SHAPE, seed=5, gas=False)
    u = np.zeros((3,) + SHAPE)
    u[2, 8:40, 4:28, 4:52] = 2.0  # voxels along x (1 mm), in the front half
    u = ndimage.gaussian_filter(u, (0, 1.0, 1.0, 1.0))
    moving = warp(hu, u)
    truth = (-u[::-1]).astype(np.float32)  # r = -u, components x, y, z
    options = ViewOptions(views=("residual", "matching"), working_spacing_mm=None)
    inside = textured(hu, body) & (np.abs(u[2] - 2.0) < 1e-3)
    outside = textured(hu, body) & (np.abs(u[2]) < 1e-3)
    assert inside.sum() > 500 and outside.sum() > 100
    features, seconds = compute_views(np.stack([hu, moving]), np.zeros_like(truth), body, 1.0, options)
    named = dict(zip(options.features, features))
    assert np.median(np.abs(named["matching_shift_mm"][inside] - 2.0)) < 0.5
    assert np.median(named["matching_shift_mm"][outside]) < 0.5
    assert np.median(named["matching_ncc_gain"][inside]) > 0.05 and "matching" in seconds
    features, _ = compute_views(np.stack([hu, moving]), truth, body, 1.0, options)
    named = dict(zip(options.features, features))
    assert np.mean(named["matching_shift_mm"][inside] < 0.5) > 0.9
    assert ViewOptions(views=("residual",)).sha256() == ViewOptions(views=("residual",), matching_reach_mm=6.0).sha256()
    assert (
        options.sha256()
        != ViewOptions(views=("residual", "matching"), working_spacing_mm=None, matching_reach_mm=6.0).sha256()
    )


def test_a_failing_view_ends_with_one_error_naming_the_pair_and_the_view(monkeypatch):
    image, body, _, truth = known_pair()

    def failing(*args, **kwargs):
        raise AntsError("pair with moving image m.nii.gz: registration with ANTs (syn) failed (test)")

    monkeypatch.setattr(views, "ants_register", failing)
    options = ViewOptions(views=("residual", "ants"), working_spacing_mm=None)
    with pytest.raises(ViewError, match="pair with moving image m.nii.gz: the ants view failed"):
        compute_views(image, truth, body, 1.0, options, name="pair with moving image m.nii.gz")
    broken = truth.copy()
    broken[0, 10, 10, 10] = np.nan
    with pytest.raises(ViewError, match="m.nii.gz: the neighbourhood view gave non-finite values"):
        compute_views(image, broken, body, 1.0, ViewOptions(working_spacing_mm=None), name="m.nii.gz")


def synthetic_combiner(options: ViewOptions, seed: int = 0, rounds: int = 30) -> tuple[ViewCombiner, np.ndarray]:
    """A combiner fitted by the real fitting code on synthetic features where e grows with |r| and with a low NCC
    after the re-registration; returns it and held-out features."""
    rng = np.random.default_rng(seed)
    features = list(options.features)
    x = rng.normal(size=(6000, len(features))).astype(np.float32)
    r = rng.gamma(2.0, 1.5, size=len(x))
    x[:, features.index("log1p_r")] = np.log1p(r)
    after = rng.uniform(0.2, 1.0, size=len(x))
    x[:, features.index("ncc_after")] = after
    e = r * (1.0 + 2.0 * (1.0 - after)) + rng.gamma(1.0, 0.5, size=len(x))
    original = combiner_fit.ROUNDS
    combiner_fit.ROUNDS = rounds
    try:
        boosters = combiner_fit.train_models(x[:4000], e[:4000], features, seed)
    finally:
        combiner_fit.ROUNDS = original
    raw = {name: b.predict(x[:4000]) for name, b in boosters.items()}
    combiner = ViewCombiner(
        features=features,
        models={name: b.model_to_string() for name, b in boosters.items()},
        calibration=combiner_fit.calibrate(raw, e[:4000]),
        view_options=json.loads(json.dumps(options.__dict__, default=lambda o: o.__dict__)),
        views_sha256=options.sha256(),
        reregistration_sha256=options_sha256(ReregistrationOptions()),
        class_weights=[1.0, 1.5, 1.2],
    )
    return combiner, x[4000:]


def test_combiner_file_round_trip_is_exact_json_and_monotone_in_r(tmp_path):
    options = ViewOptions()
    combiner, held_out = synthetic_combiner(options)
    path = tmp_path / "combiner.json"
    path.write_text(combiner.to_json())
    record = json.loads(path.read_text())  # plain JSON: LightGBM's text models, no pickle
    assert record["format"] == "misalignment-view-combiner/1" and set(record["models"]) == set(combiner_fit.MODELS)
    read = ViewCombiner.read(path, options, ReregistrationOptions())
    p, expected = combiner.predict(held_out)
    p_read, expected_read = read.predict(held_out)
    np.testing.assert_array_equal(p, p_read)
    np.testing.assert_array_equal(expected, expected_read)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
    assert (p >= 0).all() and read.class_weights == [1.0, 1.5, 1.2]
    # monotone in |r|: raising log1p_r alone never lowers P(>= 3 mm), P(>= 6 mm) or the expected error
    column = options.features.index("log1p_r")
    steps = np.repeat(held_out[:50], 20, axis=0)
    steps[:, column] = np.tile(np.log1p(np.linspace(0, 12, 20)), 50)
    p_steps, e_steps = read.predict(steps)
    at_least_3 = (1 - p_steps[:, 0]).reshape(50, 20)
    assert (np.diff(at_least_3, axis=1) >= -1e-9).all()
    assert (np.diff(p_steps[:, 2].reshape(50, 20), axis=1) >= -1e-9).all()
    assert (np.diff(e_steps.reshape(50, 20), axis=1) >= -1e-6).all()


def test_fit_writes_a_readable_combiner_and_scores_each_protocol_kind(tmp_path, monkeypatch):
    """``combiner_fit.fit`` end to end on synthetic samples of three training scans and one validation scan: the
    combiner it writes is read back for its settings, the LOSO scores come per protocol kind with every voxel counted
    once, and where the error depends on the NCC after the re-registration the views beat |r| alone."""
    options = ViewOptions()
    features = list(options.features)
    rng = np.random.default_rng(3)
    kinds = ("none", "bspline", "ants_syn")

    def split(scans: tuple[str, ...], per_pair: int = 1500) -> dict:
        records = [
            {"record": f"{scan}_{k}", "scan": scan, "protocol": {"kind": kinds[k], "seed": k}}
            for scan in scans
            for k in range(len(kinds))
        ]
        x = rng.normal(size=(len(records) * per_pair, len(features))).astype(np.float32)
        r = rng.gamma(2.0, 1.5, size=len(x))
        after = rng.uniform(0.2, 1.0, size=len(x))
        x[:, features.index("log1p_r")], x[:, features.index("ncc_after")] = np.log1p(r), after
        e = (r * (1.0 + 2.0 * (1.0 - after)) + rng.gamma(1.0, 0.5, size=len(x))).astype(np.float32)
        pair = np.repeat(np.arange(len(records)), per_pair)
        return {"x": x, "e": e, "scan": np.array([records[k]["scan"] for k in pair]), "pair": pair, "records": records}

    data = {"training": split(("scan_a", "scan_b", "scan_c")), "validation": split(("scan_v",))}
    monkeypatch.setattr(combiner_fit, "collect", lambda *args, **kwargs: data)
    monkeypatch.setattr(combiner_fit, "ROUNDS", 30)
    output, report = tmp_path / "combiner.json", tmp_path / "fit.json"
    fewer = tmp_path / "fewer.json"  # the pairs of a smaller fit: scores on its voxels alone
    fewer.write_text(
        json.dumps({"training": [r for r in data["training"]["records"] if r["protocol"]["kind"] != "none"]})
    )
    results = combiner_fit.fit("unused.json", output=str(output), report=str(report), score_on=str(fewer))
    read = ViewCombiner.read(output, options, ReregistrationOptions())
    assert read.features == features and (tmp_path / "reliability.png").is_file()
    assert json.loads(report.read_text())["class_weights"] == results["class_weights"]
    for scores in (results["multiview"]["per_protocol_loso"], results["reregistration"]["per_protocol_loso"]):
        assert set(scores) == {f"{kind}/whole" for kind in kinds}
        assert sum(v["voxels"] for v in scores.values()) == len(data["training"]["e"])
        assert all(sum(v["class_counts"]) == v["voxels"] for v in scores.values())
    loso = results["multiview"]["leave_one_scan_out"]
    assert loso["decision_mean_f1"] > results["reregistration"]["leave_one_scan_out"]["decision_mean_f1"] + 0.05
    assert 0 <= loso["ece"] < 0.05
    subset = results["multiview"]["leave_one_scan_out_on"]
    assert subset["pairs"] == 6 and sum(map(sum, subset["confusion"])) == 6 * 1500
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"training": [{"record": "scan_z_0"}]}))
    with pytest.raises(ValueError, match="missing.json: 1 of its training pairs are not among the fitted pairs"):
        combiner_fit.subset_scores(data["training"], str(missing), np.zeros((1, 3)), np.zeros(1), np.zeros(1))


def test_pair_samples_compute_every_view_once_and_serve_any_subset_from_the_cache(tmp_path, monkeypatch):
    """A registered pair's samples: the true |e| at lung voxels, the features of the views asked for; the first call
    caches every view, a later call for another subset reads its columns from that cache and computes nothing."""
    image, body, lungs, truth = known_pair()

    def write(array: np.ndarray, name: str) -> str:
        vector = array.ndim == 4
        picture = sitk.GetImageFromArray(np.moveaxis(array, 0, -1) if vector else array, isVector=vector)
        sitk.WriteImage(picture, str(tmp_path / name))
        return str(tmp_path / name)

    record = {
        "record": str(tmp_path / "pair_000.json"),
        "seed": 7,
        "fixed": write(image[0].astype(np.int16), "pair_000_fixed.nii.gz"),
        "registered": write(image[1].astype(np.int16), "pair_000_registered.nii.gz"),
        "lung_mask": write(lungs.astype(np.uint8), "pair_000_lung_mask.nii.gz"),
        "residual_true": write(truth, "pair_000_residual_true.nii.gz"),
        "residual_estimate": {
            "path": write(truth, "pair_000_residual_estimate.nii.gz"),
            "options_sha256": options_sha256(ReregistrationOptions()),
        },
    }
    first = ViewOptions(views=("residual", "similarity"))
    x, e = combiner_fit.pair_samples(record, first, per_pair=500, seed=0)
    assert x.shape == (500, len(first.features)) and e.shape == (500,)
    np.testing.assert_allclose(np.expm1(x[:, 0]), e, atol=0.01)  # r is the truth here
    assert len(list(tmp_path.glob("pair_000_views_*_500_0.npz"))) == 1

    def no_views(*args, **kwargs):
        raise AssertionError("views computed again")

    monkeypatch.setattr(combiner_fit, "compute_views", no_views)
    second = ViewOptions(views=("residual", "lung", "context"))
    y, e_again = combiner_fit.pair_samples(record, second, per_pair=500, seed=0)
    assert y.shape == (500, len(second.features))
    np.testing.assert_array_equal(y[:, 0], x[:, 0])
    np.testing.assert_array_equal(e_again, e)
    record["residual_estimate"]["options_sha256"] = "other"
    with pytest.raises(ValueError, match="pair_000.json: its re-registration estimate is not of the default"):
        combiner_fit.pair_samples(record, second, per_pair=500, seed=0)


def test_a_correction_of_r_keeps_large_errors_that_r_measures_and_survives_the_file(tmp_path):
    """Where |r| is the error (large errors a second registration recovers) the ``log_ratio_to_r`` regressor gives it
    back at every size, 20 mm included; the file records the target and a file naming an unknown one is refused."""
    options = ViewOptions(views=("residual", "similarity"))
    features = list(options.features)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(8000, len(features))).astype(np.float32)
    r = rng.uniform(0.0, 25.0, size=len(x))
    x[:, features.index("log1p_r")] = np.log1p(r)
    boosters = combiner_fit.train_models(x, r, features, expected_target="log_ratio_to_r")
    held = x[:500]
    combiner = ViewCombiner(
        features=features,
        models={name: b.model_to_string() for name, b in boosters.items()},
        calibration={},
        view_options=json.loads(json.dumps(options.__dict__, default=lambda o: o.__dict__)),
        views_sha256=options.sha256(),
        reregistration_sha256=options_sha256(ReregistrationOptions()),
        expected_target="log_ratio_to_r",
    )
    _, expected = combiner.predict(held)
    truth = np.expm1(held[:, 0])
    assert np.max(np.abs(expected - truth)[truth > 10]) < 0.3 and np.mean(np.abs(expected - truth)) < 0.1
    path = tmp_path / "combiner.json"
    path.write_text(combiner.to_json())
    read = ViewCombiner.read(path, options, ReregistrationOptions())
    assert read.expected_target == "log_ratio_to_r"
    np.testing.assert_array_equal(read.predict(held)[1], expected)
    record = json.loads(path.read_text())
    record["expected_target"] = "median_mm"
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="combiner.json: not a combiner file.*unknown expected_target 'median_mm'"):
        ViewCombiner.read(path)


def test_combiner_of_other_settings_or_a_broken_file_is_refused_by_name(tmp_path):
    combiner, _ = synthetic_combiner(ViewOptions())
    path = tmp_path / "combiner.json"
    path.write_text(combiner.to_json())
    with pytest.raises(CombinerMismatch, match=f"{path}: fitted for other view settings"):
        ViewCombiner.read(path, ViewOptions(window_mm=9.0), ReregistrationOptions())
    with pytest.raises(CombinerMismatch, match=f"{path}: fitted on residuals of other re-registration settings"):
        ViewCombiner.read(path, ViewOptions(), ReregistrationOptions(bspline_iterations=100))
    with pytest.raises(FileNotFoundError, match="combiner file not found"):
        ViewCombiner.read(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="bad.json: not a combiner file"):
        ViewCombiner.read(tmp_path / "bad.json")
    record = json.loads(path.read_text())
    record["models"]["at_least_3"] = "tree\nnot a model"
    (tmp_path / "broken.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="broken.json: (its models do not parse|not a combiner file)"):
        ViewCombiner.read(tmp_path / "broken.json")


def multiview_workflow(paths: dict[str, Path], out: Path, combiner_file: Path) -> ConfigWorkflow:
    """configs/inference.json with ``--method multiview`` on a phantom pair."""
    return ConfigWorkflow(
        config_file=str(REPO_ROOT / "configs" / "inference.json"),
        meta_file=str(REPO_ROOT / "configs" / "metadata.json"),
        logging_file=str(REPO_ROOT / "configs" / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(REPO_ROOT),
        method="multiview",
        combiner_file=str(combiner_file),
        fixed_image=str(paths["fixed"]),
        moving_image=str(paths["moving"]),
        landmarks=str(paths["landmarks"]),
        output_dir=str(out),
        progress=False,
    )


@pytest.mark.slow
def test_method_multiview_writes_the_contract_files(tmp_path):
    paths = write_phantom_pair(tmp_path / "data")
    combiner, _ = synthetic_combiner(ViewOptions())
    combiner_file = tmp_path / "combiner.json"
    combiner_file.write_text(combiner.to_json())
    out = tmp_path / "out"
    workflow = multiview_workflow(paths, out, combiner_file)
    workflow.initialize()
    assert not workflow.check_properties()
    assert isinstance(workflow.parser.get_parsed_content("inferer"), MultiviewInferer)
    workflow.run()
    workflow.finalize()
    names = sorted(p.name for p in out.iterdir())
    expected_files = ("misalignment.nii.gz", "probabilities.nii.gz", "error_mm.nii.gz", "overlay.png")
    assert names == sorted(f"moving_{s}" for s in expected_files + ("landmarks.csv", "run.json"))
    probabilities = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "moving_probabilities.nii.gz")))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "moving_misalignment.nii.gz")))
    inside = labels != 255
    assert inside.any()
    np.testing.assert_allclose(probabilities[inside].sum(axis=-1), 1.0, atol=1e-3)
    manifest = json.loads((out / "moving_run.json").read_text())
    assert manifest["method"] == "multiview"
    assert any(str(combiner_file) in json.dumps(v) for v in manifest["inputs"].values())
    with open(out / "moving_landmarks.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5 and all(0 <= float(r["p_wrong"]) <= 1 for r in rows)


def test_method_multiview_refuses_a_combiner_of_other_settings_and_writes_nothing(tmp_path):
    paths = write_phantom_pair(tmp_path / "data")
    combiner, _ = synthetic_combiner(ViewOptions(window_mm=9.0))
    combiner_file = tmp_path / "combiner.json"
    combiner_file.write_text(combiner.to_json())
    workflow = multiview_workflow(paths, tmp_path / "out", combiner_file)
    workflow.initialize()
    with pytest.raises(BadInputExit, match="combiner.json: fitted for other view settings"):
        workflow.run()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
