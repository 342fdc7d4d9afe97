"""Loss curves of fp32 and bf16-autocast training from the same seed on the same patches (does bf16 match fp32?).

Runs a training config twice through ``monai.bundle.ConfigWorkflow`` (no validation, nothing exported to the
repository: ``bundle_root`` is a temporary folder) and prints both curves, their ratio and the seconds per iteration:

    python -m benchmarks.compare_training_precision --config configs/train_regnet.json --dataset_dir DIR \
        --iterations 20 --overrides "{'level': 4}"
"""

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import fire
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

REPO_ROOT = Path(__file__).resolve().parents[1]


def training_losses(config: str, dataset_dir: str, iterations: int, autocast: Optional[str], overrides: Dict) -> Dict:
    """Per-iteration losses and median seconds per iteration of ``iterations`` steps of ``config``."""
    with tempfile.TemporaryDirectory() as root:
        settings = {
            "bundle_root": root,
            "dataset_dir": dataset_dir,
            "autocast": autocast,
            "max_epochs": 1,
            "epoch_length": iterations,
            "val_interval": 10**9,
            "ckpt_interval": 10**9,
            "resume": False,
            **overrides,
        }
        workflow = ConfigWorkflow(
            config_file=str(REPO_ROOT / config),
            meta_file=str(REPO_ROOT / "configs" / "metadata.json"),
            logging_file=str(REPO_ROOT / "configs" / "logging.conf"),
            workflow_type="train",
            **settings,
        )
        workflow.initialize()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        losses: List[float] = []
        seconds: List[float] = []
        clock = [time.perf_counter()]

        def record(engine) -> None:
            losses.append(float(engine.state.output["loss"].detach()))
            now = time.perf_counter()
            seconds.append(now - clock[0])
            clock[0] = now

        trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
        trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: clock.__setitem__(0, time.perf_counter()))
        workflow.run()
        workflow.finalize()
    return {"losses": losses, "median_seconds_per_iteration": statistics.median(seconds)}


def main(
    config: str = "configs/train_regnet.json",
    dataset_dir: str = "",
    iterations: int = 20,
    overrides: Optional[Dict] = None,
) -> None:
    """Print the fp32 and bf16 curves side by side and a JSON summary."""
    if not dataset_dir:
        raise ValueError("--dataset_dir (a folder written by python -m scripts.data.prepare_data) is required")
    overrides = dict(overrides or {})
    fp32 = training_losses(config, dataset_dir, iterations, None, overrides)
    bf16 = training_losses(config, dataset_dir, iterations, "bfloat16", overrides)
    print("iteration  fp32 loss  bf16 loss  bf16/fp32")
    for i, (a, b) in enumerate(zip(fp32["losses"], bf16["losses"]), start=1):
        print(f"{i:9d}  {a:9.4f}  {b:9.4f}  {b / a:9.4f}")
    ratios = [b / a for a, b in zip(fp32["losses"], bf16["losses"])]
    summary = {
        "config": config,
        "overrides": overrides,
        "iterations": iterations,
        "fp32_seconds_per_iteration": round(fp32["median_seconds_per_iteration"], 2),
        "bf16_seconds_per_iteration": round(bf16["median_seconds_per_iteration"], 2),
        "mean_abs_relative_difference": round(statistics.mean(abs(r - 1) for r in ratios), 4),
        "fp32_mean_last_half": round(statistics.mean(fp32["losses"][iterations // 2 :]), 4),
        "bf16_mean_last_half": round(statistics.mean(bf16["losses"][iterations // 2 :]), 4),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    fire.Fire(main)
