"""Registered pairs (scripts.registration.registered_pairs): the user-side protocols drawn, the estimate bookkeeping."""

import json
from collections import Counter

import numpy as np
import pytest

import scripts.registration.registered_pairs as registered_pairs
from scripts.registration.registered_pairs import (
    ENGINE_PROTOCOLS,
    INPUTS,
    LARGE_ERROR_PROTOCOLS,
    PROTOCOLS,
    draw_protocol,
)


def _draws(mix: str, n: int = 400) -> list[dict]:
    rng = np.random.RandomState(11)
    return [draw_protocol(rng, mix) for _ in range(n)]


def test_each_mix_draws_its_own_kinds_and_inputs():
    for mix, kinds in (("elastix", PROTOCOLS), ("engines", ENGINE_PROTOCOLS), ("large_errors", LARGE_ERROR_PROTOCOLS)):
        draws = _draws(mix)
        assert set(Counter(d["kind"] for d in draws)) == set(kinds), mix
        if mix == "elastix":
            assert all("input" not in d for d in draws)  # its pairs are the whole lung crop, as before the others
        else:
            assert set(d["input"] for d in draws) == set(INPUTS), mix
    assert not any(d["kind"].startswith(("bspline", "ants")) for d in _draws("large_errors"))


def test_the_former_mixes_draw_as_before():
    """Adding a mix changes no draw of the other two: pairs made earlier stay reproducible from their seeds."""
    first = draw_protocol(np.random.RandomState(5), "elastix")
    assert first == draw_protocol(np.random.RandomState(5), "elastix")
    rng = np.random.RandomState(5)
    kind = str(rng.choice(PROTOCOLS, p=(0.08, 0.1, 0.1, 0.17, 0.55)))
    assert first["kind"] == kind and first["seed"] == int(rng.randint(1, 2**31 - 1))


def test_an_unknown_mix_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown protocol mix 'ants_only'"):
        draw_protocol(np.random.RandomState(0), "ants_only")


def test_estimate_reads_each_pair_from_its_own_record_not_a_stale_datalist(tmp_path, monkeypatch):
    """A datalist written before a pair was estimated lacks the estimate its record JSON holds: ``estimate`` starts
    from the JSON, so the pair is not registered again, and the datalist comes out up to date."""
    record_path = tmp_path / "pair_000.json"
    stale = {"record": str(record_path), "registered": str(tmp_path / "pair_000_registered.nii.gz"), "index": 0}
    estimated = {**stale, "residual_estimate": {"path": "r.nii.gz", "options_sha256": "abc", "seconds": 40.0}}
    record_path.write_text(json.dumps(estimated))
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [stale], "validation": []}))
    seen = []

    def fake_estimate_pair(record, options, suffix):
        seen.append(record)
        return record

    monkeypatch.setattr(registered_pairs, "estimate_pair", fake_estimate_pair)
    registered_pairs.estimate(str(tmp_path), splits="training")
    assert seen[0]["residual_estimate"]["seconds"] == 40.0
    datalist = json.loads((tmp_path / "datalist.json").read_text())
    assert datalist["training"][0]["residual_estimate"] == estimated["residual_estimate"]


def test_a_run_for_some_scans_keeps_the_pairs_of_the_others_in_the_datalist(tmp_path, monkeypatch):
    """``make --scans`` adds pairs for the named scans; the datalist still lists every pair in the folder, so the
    validation pairs of an earlier run are not dropped (they were, and had to be merged back by hand)."""
    earlier = tmp_path / "pairs" / "scan_v" / "pair_000.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text(json.dumps({"scan": "scan_v", "index": 0, "record": str(earlier)}))
    monkeypatch.setattr(registered_pairs, "find_scans", lambda data_dir, scans: [tmp_path / "scan_t.nii.gz"])
    monkeypatch.setattr(registered_pairs, "prepare_scan", lambda path, folder: {})
    made = {"protocol": {"kind": "none"}, "lung_class_fractions": [], "seconds": 0.0}
    monkeypatch.setattr(registered_pairs, "make_registered_pair", lambda *args: dict(made))
    path = registered_pairs.run(str(tmp_path), str(tmp_path), pairs_per_scan=2, validation_scans="scan_v")
    datalist = json.loads(open(path).read())
    assert [(r["scan"], r["index"]) for r in datalist["training"]] == [("scan_t", 0), ("scan_t", 1)]
    assert [r["record"] for r in datalist["validation"]] == [str(earlier)]
