"""Accuracy against seconds for the bundle's methods on the sample pair: the default re-registration (the reference,
measured in the same run), the residual-informed networks that run on top of it, and the image-only network.

Each method is the bundle's own command in a fresh subprocess (``python -m monai.bundle run --config_file
configs/inference.json ...`` on ``sample_data/``, whole image, the precision "auto" picks for this CPU), so the wall
time includes reading, the re-registration where the method needs it, the tiled network and writing every output.
Prints per method the median wall time and peak RSS over ``--repeats`` runs, its ratio to the re-registration, and
the landmark mean F1, kappa and the MAE of ``error_mm`` against the sample pair's true TRE. Run from the repository
root with nothing else on the cores::

    python benchmarks/bench_methods.py --repeats 1
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import fire

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_reregistration import landmark_accuracy, run_bundle  # noqa: E402

from scripts.utils.precision import resolve_precision  # noqa: E402

REFERENCE = "re-registration (default)"
METHODS = {
    REFERENCE: ["--method", "reregistration"],
    "residual network, lstm_prior": [
        "--method",
        "network",
        "--residual_input",
        "lstm_prior",
        "--checkpoint",
        "models/model_residual.pt",
        "--class_weights_file",
        "",
    ],
    "image-only network (paper's input)": ["--method", "network"],
}


def main(repeats: int = 1, methods: str | list[str] | tuple[str, ...] = tuple(METHODS)) -> dict:
    """Run each of ``methods`` (names of ``METHODS``; the reference always runs) ``repeats`` times on the sample
    pair; print and return the medians."""
    names = [methods] if isinstance(methods, str) else list(methods)
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    names = [REFERENCE] + [n for n in names if n != REFERENCE]
    sample = REPO_ROOT / "sample_data"
    fixed, moving, landmarks = (str(sample / name) for name in ("fixed.nii.gz", "moving.nii.gz", "landmarks.csv"))
    results: dict = {
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "precision": resolve_precision("auto"),
        "repeats": repeats,
        "methods": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench_methods_") as tmp:
        for index, name in enumerate(names):
            out = Path(tmp) / f"method_{index}"
            runs = [run_bundle(fixed, moving, str(out), landmarks, METHODS[name]) for _ in range(repeats)]
            row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            row.update(landmark_accuracy(out / "moving_landmarks.csv"))
            results["methods"][name] = row  # the reference runs first
            row["wall_over_reference"] = row["wall_s"] / results["methods"][REFERENCE]["wall_s"]
            if name == REFERENCE:  # each row is printed when it is measured: a failure later keeps the earlier ones
                print(
                    f"sample pair, medians of {repeats} run(s), precision {results['precision']}, "
                    f"load average at start {results['load_average_at_start']}"
                )
                print("| method | wall s | x re-registration | peak RSS GB | mean F1 | kappa | error MAE mm |")
                print("|---|---|---|---|---|---|---|")
            print(
                f"| {name} | {row['wall_s']:.1f} | {row['wall_over_reference']:.2f} | {row['peak_rss_gb']:.2f} | "
                f"{row['mean_f1']:.3f} | {row['kappa']:.3f} | {row['error_mae_mm']:.2f} |",
                flush=True,
            )
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
