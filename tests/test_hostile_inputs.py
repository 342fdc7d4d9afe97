"""Hostile input: the mistakes people make with a bundle run (a misspelt option, half of the sample pair, an output
folder that cannot take the results, stale or mixed result sets, interrupts, non-HU images, landmark tables of any
kind) each end with a complete result set and exit 0, or one line, exit 1 and nothing new in the output folder."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import monai.bundle
import numpy as np
import pytest
import SimpleITK as sitk

from scripts.data.image_io import InputError, load_pair, read_image
from scripts.data.landmark_csv import read_landmarks
from scripts.data.result_set import ResultSet, deferred_signals, verify_manifest
from scripts.inferers.io_transforms import BadInputExit
from scripts.workflows.batch_inference import BatchInference
from scripts.workflows.bundle_run import UsageExit, check_options, unknown_options
from tests.helpers.synthetic_pair import image_from_array, phantom_hu, write_pair
from tests.test_inference_workflow import make_workflow

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_FIXED = REPO_ROOT / "sample_data" / "fixed.nii.gz"
INFERENCE = ["--config_file", "configs/inference.json"]


def _bundle_argv(*options: str) -> list[str]:
    """``sys.argv`` as ``python -m monai.bundle run <options>`` sets it."""
    return [str(Path(monai.bundle.__file__).parent / "__main__.py"), "run", *options]


def _run_bundle(tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "monai.bundle", "run", *INFERENCE, *options]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def _last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


def _listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def pair(tmp_path) -> dict[str, Path]:
    return write_pair(tmp_path / "data")


def _workflow(tmp_path: Path, pair: dict[str, Path], **override):
    settings = dict(fixed_image=str(pair["fixed"]), moving_image=str(pair["moving"]), landmarks=str(pair["landmarks"]))
    settings.update(override)
    return make_workflow(tmp_path, **settings)


def _run(workflow) -> None:
    workflow.initialize()
    workflow.run()
    workflow.finalize()


# 1. options checked first


@pytest.mark.slow
def test_the_issue_typo_stops_before_anything_runs(tmp_path, pair):
    """``--fixed_imag`` used to run on the shipped sample and name the outputs after the user's moving image."""
    out = tmp_path / "out"
    result = _run_bundle(
        tmp_path, "--fixed_imag", str(pair["fixed"]), "--moving_image", str(pair["moving"]), "--output_dir", str(out)
    )
    assert result.returncode == 1
    assert _last_line(result) == "unknown option --fixed_imag; did you mean --fixed_image?"
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_unknown_options_suggest_the_closest_ids():
    from monai.bundle import ConfigParser

    config = ConfigParser(ConfigParser.load_config_files(str(REPO_ROOT / "configs" / "inference.json")))
    assert unknown_options(config, ["fixed_image", "network_def#decoder", "output_dir"]) == []
    assert unknown_options(config, ["moving_imag"]) == ["unknown option --moving_imag; did you mean --moving_image?"]
    (nested,) = unknown_options(config, ["network_def#decodr"])
    assert nested.startswith("unknown option --network_def#decodr; did you mean --network_def#decoder")
    (far,) = unknown_options(config, ["zzzz"])
    assert far == "unknown option --zzzz; see the configs for the options"
    batch = ConfigParser(ConfigParser.load_config_files(str(REPO_ROOT / "configs" / "batch_inference.json")))
    assert unknown_options(batch, ["inference_overrides#method"]) == []  # a new entry of an open mapping


def test_check_options_reads_the_command_line(tmp_path):
    check_options(_bundle_argv(*INFERENCE, "--method", "network", "--output_dir=x", "--meta_file", "m.json"))
    check_options(["pytest", "run", "--anything"])  # not a bundle command line: nothing to check
    with pytest.raises(UsageExit, match=r"unknown option --landmark; did you mean --landmarks\?"):
        check_options(_bundle_argv(*INFERENCE, "--landmark=l.csv"))
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"config_file": "configs/inference.json", "outputdir": "x"}))
    with pytest.raises(UsageExit, match=r"unknown option --outputdir; did you mean --output_dir\?"):
        check_options(_bundle_argv("--args_file", str(args)))


def test_batch_overrides_are_checked(tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("fixed,moving\na.nii.gz,b.nii.gz\n")
    with pytest.raises(UsageExit, match=r"unknown option --tile_sise; did you mean --tile_size\?"):
        BatchInference(pairs, tmp_path / "out", REPO_ROOT, overrides={"tile_sise": 49})


def test_an_unknown_method_is_one_line_listing_the_methods(tmp_path, pair):
    workflow = _workflow(tmp_path, pair, method="rereg")
    with pytest.raises(UsageExit) as info:
        workflow.initialize()
    assert str(info.value) == "unknown --method 'rereg'; choose one of: reregistration, network, multiview"
    assert not (tmp_path / "out").exists()


def test_half_of_the_sample_pair_stops(tmp_path, pair):
    """A user's moving image with the sample's fixed image (an option left out) is refused in one line."""
    workflow = make_workflow(tmp_path, moving_image=str(pair["moving"]))
    with pytest.raises(UsageExit, match=r"--fixed_image is the shipped sample .* but --moving_image is"):
        workflow.initialize()
    assert not (tmp_path / "out").exists()


def test_the_same_file_twice_is_a_warning(tmp_path, pair, capsys):
    workflow = _workflow(tmp_path, pair, moving_image=str(pair["fixed"]), landmarks="")
    workflow.initialize()  # the bundle's logging.conf logs to stdout
    assert "WARNING - --fixed_image and --moving_image are the same file" in capsys.readouterr().out
    workflow.parser.get_parsed_content("result_set").discard()


# 2. output checked first


@pytest.mark.slow
def test_an_output_dir_that_is_a_file_stops_before_loading(tmp_path, pair):
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    result = _run_bundle(
        tmp_path,
        "--fixed_image",
        str(pair["fixed"]),
        "--moving_image",
        str(pair["moving"]),
        "--output_dir",
        str(blocker),
    )
    assert result.returncode == 1
    assert _last_line(result) == f"--output_dir {blocker}: is a file, not a folder; give a folder for the results"
    assert "pair on a" not in result.stdout  # nothing was loaded
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc: a folder no user can create")
def test_an_output_dir_that_cannot_be_created_stops(tmp_path, pair):
    workflow = _workflow(tmp_path, pair, output_dir="/proc/misalignment_results")
    with pytest.raises(UsageExit, match=r"^--output_dir /proc/misalignment_results: cannot create the folder"):
        workflow.initialize()


def test_an_unwritable_output_dir_stops(tmp_path, pair, monkeypatch):
    """A folder this user cannot write (simulated: the tests may run as root, who writes anywhere)."""
    out = tmp_path / "readonly"
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == out else real_access(path, mode))
    workflow = _workflow(tmp_path, pair, output_dir=str(out))
    with pytest.raises(UsageExit, match=rf"^--output_dir {out}: the folder is not writable by this user$"):
        workflow.initialize()


# 3. results as a set


@pytest.mark.slow
def test_a_rerun_without_landmarks_removes_the_old_table(tmp_path, pair):
    out = tmp_path / "out"
    _run(_workflow(tmp_path, pair))
    assert (out / "moving_landmarks.csv").is_file()
    _run(_workflow(tmp_path, pair, landmarks=""))
    assert not (out / "moving_landmarks.csv").exists()
    manifest = verify_manifest(out, "moving")
    assert manifest is not None and "landmarks" not in manifest["inputs"]
    assert sorted(p.name for p in out.iterdir()) == sorted(f["name"] for f in manifest["files"]) + ["moving_run.json"]


def test_the_manifest_records_the_run(tmp_path, pair):
    out = tmp_path / "out"
    _run(_workflow(tmp_path, pair))
    manifest = json.loads((out / "moving_run.json").read_text())
    metadata = json.loads((REPO_ROOT / "configs" / "metadata.json").read_text())
    assert manifest["bundle"] == f"{metadata['name']} {metadata['version']}"
    assert manifest["method"] == "network" and manifest["settings"]["tile_size"] == 49
    assert manifest["inputs"]["fixed_image"]["path"] == str(pair["fixed"].resolve())
    assert manifest["inputs"]["moving_image"]["bytes"] == pair["moving"].stat().st_size
    assert len(manifest["inputs"]["landmarks"]["sha256"]) == 64
    assert {f["name"] for f in manifest["files"]} == {
        f"moving_{s}" for s in ("misalignment.nii.gz", "probabilities.nii.gz", "landmarks.csv", "overlay.png")
    }
    assert manifest["started"] <= manifest["finished"]
    (out / "moving_overlay.png").write_bytes(b"edited")
    assert verify_manifest(out, "moving") is None  # a changed file: the set is no longer the run's


@pytest.mark.slow
def test_two_pairs_with_one_stem_never_mix(tmp_path, pair):
    """A second pair whose moving image has the same stem replaces the first run's set as a whole."""
    other = write_pair(tmp_path / "other", shift_voxels=4)
    out = tmp_path / "out"
    _run(_workflow(tmp_path, pair))
    _run(_workflow(tmp_path, other, landmarks=""))
    manifest = verify_manifest(out, "moving")
    assert manifest is not None and manifest["inputs"]["moving_image"]["path"] == str(other["moving"].resolve())
    assert not (out / "moving_landmarks.csv").exists()


def _interrupted(*args, **kwargs):
    """Ctrl-C while the overlay is written (the maps are written by then)."""
    raise KeyboardInterrupt


@pytest.mark.slow
def test_an_interrupt_leaves_the_earlier_set_untouched(tmp_path, pair, monkeypatch):
    out = tmp_path / "out"
    _run(_workflow(tmp_path, pair))
    before = _listing(out)

    monkeypatch.setattr("scripts.inferers.io_transforms.save_overlay", _interrupted)  # after the maps were written
    workflow = _workflow(tmp_path, write_pair(tmp_path / "other", shift_voxels=4))
    workflow.initialize()
    with pytest.raises(KeyboardInterrupt):
        workflow.run()
    assert _listing(out) == before  # no file of the new set, no staging folder, no lock


def test_an_interrupt_of_a_first_run_leaves_nothing(tmp_path, pair, monkeypatch):
    monkeypatch.setattr("scripts.inferers.io_transforms.save_overlay", _interrupted)
    workflow = _workflow(tmp_path, pair)
    workflow.initialize()
    with pytest.raises(KeyboardInterrupt):
        workflow.run()
    assert not (tmp_path / "out").exists()


def test_signals_wait_for_the_renames():
    with pytest.raises(KeyboardInterrupt):
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            done = True  # reached: the interrupt waits for the end of the block
    assert done


def test_a_second_run_on_the_same_stem_stops_while_the_first_runs(tmp_path, pair):
    out = tmp_path / "out"
    first = ResultSet(out, "moving").open()
    workflow = _workflow(tmp_path, pair)
    with pytest.raises(UsageExit, match=r"another run \(pid \d+ .*\) is writing the results of moving there"):
        workflow.initialize()
    first.discard()
    _run(_workflow(tmp_path, pair))  # the lock is free again
    assert verify_manifest(out, "moving") is not None


def test_a_stale_lock_is_taken_over(tmp_path, pair):
    out = tmp_path / "out"
    out.mkdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)  # a process that has ended
    (out / ".moving.lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "earlier"}))
    (out / ".moving.0123456789ab.partial").mkdir()  # its staging folder
    _run(_workflow(tmp_path, pair, landmarks=""))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


@pytest.mark.slow
def test_batch_reruns_a_pair_whose_set_was_changed(tmp_path, pair):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"fixed,moving\n{pair['fixed']},{pair['moving']}\n")
    tiny = dict(
        method="network",
        checkpoint=str(tmp_path / "none.pt"),
        hidden_channels=4,
        tile_size=49,
        precision="float32",
        require_lung=False,
    )
    batch = BatchInference(pairs, tmp_path / "batch", REPO_ROOT, overrides=tiny, progress=False)
    assert [r.status for r in batch.run()] == ["done"]
    assert [r.status for r in batch.run()] == ["skipped"]
    (tmp_path / "batch" / "0000_moving" / "moving_probabilities.nii.gz").unlink()
    assert [r.status for r in batch.run()] == ["done"]


def test_batch_main_exits_non_zero_when_a_pair_failed(tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("fixed,moving\nabsent_fixed.nii.gz,absent_moving.nii.gz\n")
    with pytest.raises(UsageExit, match=r"^batch QA: 1 of 1 pairs failed"):
        BatchInference(pairs, tmp_path / "out", REPO_ROOT, progress=False).main()
    results = BatchInference(pairs, tmp_path / "out", REPO_ROOT, progress=False, allow_failures=True).main()
    assert [r.status for r in results] == ["failed"]
    assert (tmp_path / "out" / "batch_report.txt").read_text().splitlines()[
        -1
    ] == "0 done, 0 skipped, 1 failed of 1 pairs"


# 4. input plausibility


def _write(path: Path, array: np.ndarray) -> Path:
    sitk.WriteImage(image_from_array(array), str(path))
    return path


@pytest.mark.parametrize(
    "case, values, cause",
    [
        ("raw stored values", lambda hu: (hu + 1024).astype(np.uint16), "raw stored values without the rescale slope"),
        ("an MR image", lambda hu: np.random.default_rng(0).uniform(0, 600, hu.shape).astype(np.float32), "MR image"),
        ("a mask", lambda hu: (hu > -500).astype(np.uint8), "a label mask given as an image"),
        ("no tissue", lambda hu: np.random.default_rng(0).normal(-1000, 20, hu.shape).astype(np.int16), "no tissue"),
    ],
)
def test_non_hu_images_are_refused_by_name(tmp_path, pair, case, values, cause):
    bad = _write(tmp_path / "bad.nii.gz", values(phantom_hu()))
    with pytest.raises(InputError, match=f"^moving image {bad}: not a CT in Hounsfield units: .*{cause}"):
        load_pair(pair["fixed"], bad)
    with pytest.raises(InputError, match=f"^fixed image {bad}: not a CT in Hounsfield units"):
        load_pair(bad, pair["moving"])


def test_a_non_hu_image_stops_the_run_with_nothing_written(tmp_path, pair):
    bad = _write(tmp_path / "raw.nii.gz", (phantom_hu() + 1024).astype(np.uint16))
    workflow = _workflow(tmp_path, pair, moving_image=str(bad))
    workflow.initialize()
    with pytest.raises(BadInputExit, match="not a CT in Hounsfield units"):
        workflow.run()
    assert not (tmp_path / "out").exists()


def test_an_empty_image_file_is_called_empty(tmp_path):
    empty = tmp_path / "moving.nii.gz"
    empty.touch()
    with pytest.raises(InputError, match=f"^moving image {empty}: the file is empty \\(0 bytes\\)$"):
        read_image(empty, "moving image")


def test_a_nan_coordinate_is_reported_as_nan_with_its_row(tmp_path):
    table = tmp_path / "landmarks.csv"
    table.write_text("x,y,z\n1,2,3\n4,nan,6\n")
    with pytest.raises(ValueError, match=r"landmarks.csv: row 3, column 'y': 'nan' is not a finite number$"):
        read_landmarks(table)


# 6. the landmark CSV reader, fuzzed


def _fuzz_cases(count: int, seed: int = 0) -> list[bytes]:
    """Landmark files as people and programs write them: a good table mangled by BOMs, CRLF, semicolons, tabs,
    unicode, NUL bytes, huge or odd numbers, cut rows, extra columns, and plain random bytes."""
    rng = random.Random(seed)
    good = ["id,x,y,z", "0,1.5,-2.0,3.25", "1,10,20,30"]
    pieces = [
        "nan",
        "inf",
        "-inf",
        "1e400",
        "-1e308",
        "1,5",
        "٣",
        "１２",
        "0x1F",
        "",
        " ",
        '"',
        "\x00",
        "é",
        "🫁",
        "9" * 400,
        "1e-400",
        "+3",
        "3.",
        ".5",
        "1_000",
    ]
    cases = []
    for _ in range(count):
        kind = rng.randrange(6)
        lines = list(good)
        if kind == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
            cases.append(data)
            continue
        if kind == 1:  # a cell replaced
            row = rng.randrange(1, len(lines))
            cells = lines[row].split(",")
            cells[rng.randrange(len(cells))] = rng.choice(pieces)
            lines[row] = ",".join(cells)
        elif kind == 2:  # separators
            separator = rng.choice([";", "\t", "|", ", "])
            lines = [line.replace(",", separator) for line in lines]
        elif kind == 3:  # a header mangled
            lines[0] = rng.choice(["X,Y,Z", "id,x,y", "x,y,z,x", "\ufeffid,x,y,z", "id,x,y,z,é名", "", "id;x;y;z"])
        elif kind == 4:  # rows cut or extended
            row = rng.randrange(1, len(lines))
            lines[row] = lines[row].rsplit(",", 1)[0] if rng.random() < 0.5 else lines[row] + ",extra"
        text = rng.choice(["\n", "\r\n", "\r"]).join(lines) + rng.choice(["", "\n", "\r\n"])
        prefix = "\ufeff" if rng.random() < 0.3 else ""
        cases.append((prefix + text).encode(rng.choice(["utf-8", "utf-8", "utf-16", "latin-1"]), errors="replace"))
    return cases


def test_fuzzed_landmark_files_read_or_fail_in_one_line_naming_the_file(tmp_path):
    outcomes = {"read": 0, "refused": 0}
    for i, data in enumerate(_fuzz_cases(400)):
        path = tmp_path / f"case_{i}.csv"
        path.write_bytes(data)
        try:
            table = read_landmarks(path)
        except ValueError as error:
            message = str(error)
            assert message.startswith(str(path)), (data, message)
            assert "\n" not in message, (data, message)
            outcomes["refused"] += 1
            continue
        assert np.isfinite(table.points()).all(), data
        outcomes["read"] += 1
    assert outcomes["read"] >= 40 and outcomes["refused"] >= 100, outcomes  # both paths were exercised


@pytest.mark.parametrize(
    "name, data, ok",
    [
        ("bom_crlf", "\ufeffid,x,y,z\r\n0,{x},{y},{z}\r\n".encode(), True),
        ("semicolons", b"id;x;y;z\n0;1;2;3\n", False),
        ("random_bytes", bytes(range(256)) * 3, False),
        ("huge_number", b"id,x,y,z\n0,1e400,2,3\n", False),
        ("utf16", "id,x,y,z\n0,{x},{y},{z}\n".encode("utf-16"), False),
    ],
)
def test_landmark_files_end_in_a_complete_set_or_nothing(tmp_path, pair, name, data, ok):
    """Through the bundle run: exit with a complete set (manifest verified) or one line and nothing written."""
    inside = sitk.ReadImage(str(pair["fixed"])).TransformContinuousIndexToPhysicalPoint((12, 12, 12))
    table = tmp_path / f"{name}.csv"
    table.write_bytes(
        data.replace(b"{x}", b"%.3f" % inside[0])
        .replace(b"{y}", b"%.3f" % inside[1])
        .replace(b"{z}", b"%.3f" % inside[2])
    )
    out = tmp_path / "out"
    workflow = _workflow(tmp_path, pair, landmarks=str(table))
    workflow.initialize()
    if ok:
        workflow.run()
        assert verify_manifest(out, "moving") is not None
        assert (out / "moving_landmarks.csv").is_file()
    else:
        with pytest.raises(BadInputExit) as info:
            workflow.run()
        assert str(table) in str(info.value) and "\n" not in str(info.value)
        assert not out.exists()
