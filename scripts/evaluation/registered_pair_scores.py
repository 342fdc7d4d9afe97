"""Voxel scores of the network beside the re-registration on registered pairs (the residual network's held-out measure).

For every pair of a split of a registered-pairs datalist (``scripts.registration.registered_pairs``; the validation
split holds pairs of the validation scan only), patch centres are drawn uniformly over the lungs, so the voxels keep
the pair's own class mix; on the same lung voxels of each 25^3 output block the script scores the network (argmax,
or its class-weighted decision) and the re-registration estimator (calibrated, and |r| thresholded at 3 and 6 mm)
against the true class of the exact residual |e|. Prints and writes the scores as JSON. ``fit_weights`` fits the
network's class-weighted decision the same way on the TRAINING pairs::

    python -m scripts.evaluation.registered_pair_scores score --weights models/model.pt --residual_input none \
        --datalist <work_dir>/registered/datalist.json --output docs/training/registered_val.json
    python -m scripts.evaluation.registered_pair_scores fit_weights --weights W.pt --residual_input lstm \
        --output models/class_weights.json
    python -m scripts.evaluation.registered_pair_scores compare --weights "['a.pt','b.pt']" --split training
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import fire
import numpy as np
import torch

from scripts.data.patch_sampling import candidate_centres, centred_range
from scripts.data.registered_patches import RegisteredPatchd, load_registered_pair, read_registered_datalist
from scripts.engines.checkpoints import load_network_weights
from scripts.engines.class_weights import write_class_weights
from scripts.engines.patch_validation import voxel_scores
from scripts.inferers.class_decision import apply_class_weights, read_class_weights
from scripts.inferers.misalignment_inferer import PRECISIONS, inference_copy
from scripts.networks.misalignment_net import MisalignmentNet
from scripts.registration.calibration_tables import ResidualCalibration
from scripts.registration.reregistration import ReregistrationOptions
from scripts.utils.atomic_write import atomic_write_text
from scripts.utils.class_decision import fit_class_weights
from scripts.utils.constants import CLASS_THRESHOLDS_MM, LATENT_SIZE
from scripts.utils.precision import AUTO, resolve_precision

logger = logging.getLogger(__name__)


def network_probabilities(prepared: torch.nn.Module, net: MisalignmentNet, batch: list, precision: torch.dtype):
    """``[B, 3, 25, 25, 25]`` probabilities of the prepared network for a list of RegisteredPatchd samples.

    Args:
        prepared: the network prepared for inference (``inference_copy``).
        net: the original ``MisalignmentNet`` (its factors, ``residual_input`` and ``probabilities``).
        batch: ``RegisteredPatchd`` samples with ``image_4mm``, ``image_2mm``, ``image_1mm`` and ``residual``.
        precision: dtype the inputs are cast to (the prepared network's).

    Returns:
        float32 tensor ``[B, 3, 25, 25, 25]``.
    """
    stack = {k: torch.stack([s[k] for s in batch]) for k in ("image_4mm", "image_2mm", "image_1mm", "residual")}
    levels = {4: stack["image_4mm"], 2: stack["image_2mm"], 1: stack["image_1mm"]}
    windows = [levels[f].to(precision).contiguous(memory_format=torch.channels_last_3d) for f in net.factors]
    residual = None
    if net.residual_input != "none":
        residual = stack["residual"].to(precision).contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        return net.probabilities(prepared.forward_tile(windows, residual).float())


def collect(
    weights: str | Sequence[str],
    residual_input: str,
    decoder: str,
    hidden_channels: int,
    datalist: str,
    split: str,
    patches_per_pair: int,
    batch_size: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """True classes, network probabilities ``[N, 3]`` and |r| of the lung voxels of uniformly drawn patches of the
    ``split`` pairs of ``datalist`` (one path, or several separated by commas). ``weights``: one checkpoint, or a
    list of them (same architecture) scored on the same voxels, each pair loaded once: then ``networks`` holds
    ``[len(weights), N, 3]`` and ``network`` the first.

    Args:
        weights: one checkpoint or a sequence of checkpoints of the same architecture.
        residual_input: the network's ``residual_input`` ("none", "lstm", "lstm_prior" or "encoders").
        decoder: the network's decoder ("lstm", "multi_cnn" or "single_cnn").
        hidden_channels: ConvLSTM hidden size.
        datalist: registered-pairs datalist (JSON), or several separated by commas.
        split: datalist split, e.g. "training" or "validation".
        patches_per_pair: patch centres drawn per pair (fewer if the lung has fewer candidates).
        batch_size: patches per network call.
        seed: seed of the patch centres.

    Returns:
        Dict with ``labels`` ``[N]``, ``residual`` ``[N]`` (|r|, mm), ``networks`` ``[len(weights), N, 3]``,
        ``network`` ``[N, 3]`` and ``pairs`` (count).

    Raises:
        ValueError: when ``datalist`` is empty.
    """
    if not str(datalist):
        raise ValueError("no --datalist: give <work_dir>/registered/datalist.json (from registered_pairs)")
    checkpoints = [weights] if isinstance(weights, str) else list(weights)
    entries = [e for name in str(datalist).split(",") if name for e in read_registered_datalist(name, split)]
    precision = resolve_precision(AUTO)
    nets = []
    for checkpoint in checkpoints:
        net = MisalignmentNet(decoder=decoder, hidden_channels=hidden_channels, residual_input=residual_input)
        net = load_network_weights(net, checkpoint).eval()
        nets.append((net, inference_copy(net, precision)))
    patch = RegisteredPatchd(residual_windows=residual_input == "encoders")
    rng = np.random.RandomState(seed)
    collected: dict[str, list] = {"labels": [], "residual": []}
    per_network: list[list[np.ndarray]] = [[] for _ in nets]
    for index, entry in enumerate(entries):
        pair = load_registered_pair(entry, residual_pyramid=patch.residual_windows)
        centres = candidate_centres(pair["lung_mask"], LATENT_SIZE // 2)
        chosen = centres[rng.choice(len(centres), size=min(patches_per_pair, len(centres)), replace=False)]
        for b in range(0, len(chosen), batch_size):
            batch = [patch({**pair, "centre": c}) for c in chosen[b : b + batch_size]]
            lungs = [
                pair["lung_mask"][np.ix_(*[centred_range(int(c), LATENT_SIZE) for c in centre])]
                for centre in chosen[b : b + batch_size]
            ]
            for sample, lung in zip(batch, lungs):
                collected["labels"].append(np.digitize(sample["magnitude"][0].numpy()[lung], CLASS_THRESHOLDS_MM))
                collected["residual"].append(np.linalg.norm(sample["residual"].numpy(), axis=0)[lung])
            for (net, prepared), found in zip(nets, per_network):
                probabilities = network_probabilities(prepared, net, batch, PRECISIONS[precision])
                found.extend(probabilities[k].numpy()[:, lung].T for k, lung in enumerate(lungs))
        logger.info("pair %d/%d (%s) predicted", index + 1, len(entries), entry.get("record", ""))
    out = {k: np.concatenate(v) for k, v in collected.items()}
    out["networks"] = np.stack([np.concatenate(found) for found in per_network])
    out["network"] = out["networks"][0]
    out["pairs"] = np.array(len(entries))
    return out


def reregistration_scores(
    labels: np.ndarray, residual: np.ndarray, calibration: ResidualCalibration | None
) -> dict[str, dict]:
    """The re-registration's voxel scores on the collected voxels: |r| thresholds, and with a ``calibration`` its
    argmax and, if it has class weights, the bundle's default mean-F1 decision (AUCs: of the reweighted p).

    Args:
        labels: ``[N]`` true classes.
        residual: ``[N]`` |r| at the same voxels, mm.
        calibration: calibration tables, or None for the thresholds only.

    Returns:
        Dict method name -> ``voxel_scores`` (with ``class_weights`` for the mean-F1 decision).
    """
    thresholds = ResidualCalibration.thresholds().predict(residual)[0].T
    results = {"re-registration (|r| thresholds)": voxel_scores(labels, thresholds)}
    if calibration is not None:
        calibrated = calibration.predict(residual)[0].T
        results["re-registration (calibrated)"] = voxel_scores(labels, calibrated)
        if calibration.class_weights is not None:
            weighted = calibrated * np.asarray(calibration.class_weights, dtype=np.float32)
            results["re-registration (calibrated, mean-F1 decision)"] = {
                "class_weights": calibration.class_weights,
                **voxel_scores(labels, weighted / weighted.sum(axis=1, keepdims=True).clip(1e-12)),
            }
    return results


def score(
    weights: str = "models/model.pt",
    residual_input: str = "none",
    decoder: str = "lstm",
    hidden_channels: int = 16,
    datalist: str = "",
    split: str = "validation",
    patches_per_pair: int = 24,
    batch_size: int = 4,
    calibration_file: str = "models/reregistration_calibration.json",
    class_weights_file: str = "",
    seed: int = 0,
    output: str = "",
) -> dict:
    """Scores of the network ``weights`` and of the re-registration on the same lung voxels (see the module).

    Args:
        weights: network checkpoint.
        residual_input: the network's ``residual_input``.
        decoder: the network's decoder.
        hidden_channels: ConvLSTM hidden size.
        datalist: registered-pairs datalist (JSON), or several separated by commas.
        split: datalist split to score.
        patches_per_pair: patch centres drawn per pair.
        batch_size: patches per network call.
        calibration_file: calibration JSON of the re-registration; "" scores only the |r| thresholds.
        class_weights_file: class-weights JSON of the network; "" scores only its argmax.
        seed: seed of the patch centres.
        output: JSON file to write; "" writes nothing.

    Returns:
        Dict of the run's settings and per method the ``voxel_scores``.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(message)s")
    calibration = ResidualCalibration.read(calibration_file, ReregistrationOptions()) if calibration_file else None
    class_weights = read_class_weights(class_weights_file, weights) if class_weights_file else None
    start = time.perf_counter()
    found = collect(
        weights, residual_input, decoder, hidden_channels, datalist, split, patches_per_pair, batch_size, seed
    )
    labels, network, residual = found["labels"], found["network"], found["residual"]
    results = {
        "datalist": str(datalist),
        "split": split,
        "pairs": int(found["pairs"]),
        "patches_per_pair": patches_per_pair,
        "weights": weights,
        "residual_input": residual_input,
        "seconds": round(time.perf_counter() - start, 1),
        "network (argmax)": voxel_scores(labels, network),
    }
    if class_weights is not None:
        weighted = apply_class_weights(torch.from_numpy(network), class_weights).numpy()
        results["network (class-weighted)"] = {"class_weights": class_weights, **voxel_scores(labels, weighted)}
    results.update(reregistration_scores(labels, residual, calibration))
    summary = {k: (round(v["mean_f1"], 3), round(v["kappa"], 3)) for k, v in results.items() if isinstance(v, dict)}
    logger.info("mean F1, kappa: %s", summary)
    if output:
        atomic_write_text(Path(output), json.dumps(results, indent=1))
    return results


def fit_weights(
    weights: str = "models/model.pt",
    output: str = "models/class_weights.json",
    residual_input: str = "none",
    decoder: str = "lstm",
    hidden_channels: int = 16,
    datalist: str = "",
    patches_per_pair: int = 16,
    batch_size: int = 4,
    seed: int = 4321,
) -> dict:
    """Fit the class-weighted decision (``scripts.engines.class_weights``) on the TRAINING registered pairs' lung
    voxels, in their own class mix, and write ``output`` with the hash of ``weights``.

    Args:
        weights: network checkpoint.
        output: class-weights JSON to write.
        residual_input: the network's ``residual_input``.
        decoder: the network's decoder.
        hidden_channels: ConvLSTM hidden size.
        datalist: registered-pairs datalist (JSON), or several separated by commas.
        patches_per_pair: patch centres drawn per training pair.
        batch_size: patches per network call.
        seed: seed of the patch centres.

    Returns:
        The written record (see ``scripts.engines.class_weights.write_class_weights``).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(message)s")
    found = collect(
        weights, residual_input, decoder, hidden_channels, datalist, "training", patches_per_pair, batch_size, seed
    )
    fitted_on = {
        "datalist": str(datalist),
        "pairs": int(found["pairs"]),
        "patches_per_pair": patches_per_pair,
        "seed": seed,
    }
    record = write_class_weights(weights, found["labels"], found["network"], fitted_on, output)
    logger.info(
        "class weights %s: mean F1 %.3f (argmax %.3f) on the training voxels",
        record["weights"],
        record["mean_f1_fitted"],
        record["mean_f1_argmax"],
    )
    return record


def compare(
    weights: Sequence[str] = ("models/model_residual.pt",),
    residual_input: str = "lstm_prior",
    decoder: str = "lstm",
    hidden_channels: int = 16,
    datalist: str = "",
    split: str = "training",
    patches_per_pair: int = 4,
    batch_size: int = 4,
    calibration_file: str = "models/reregistration_calibration.json",
    seed: int = 11,
    output: str = "",
) -> dict:
    """Several checkpoints of one architecture on the same lung voxels (each pair loaded once: choosing among a run's
    checkpoints on the TRAINING pairs costs one pass): per checkpoint its argmax scores and the mean F1 of a
    class-weight decision fitted on these very voxels (in-sample), beside |r| thresholds and the calibration.

    Args:
        weights: checkpoints of one architecture, a sequence or a comma-separated string.
        residual_input: their ``residual_input``.
        decoder: their decoder.
        hidden_channels: ConvLSTM hidden size.
        datalist: registered-pairs datalist (JSON), or several separated by commas.
        split: datalist split to score.
        patches_per_pair: patch centres drawn per pair.
        batch_size: patches per network call.
        calibration_file: calibration JSON of the re-registration; "" for the |r| thresholds only.
        seed: seed of the patch centres.
        output: JSON file to write; "" writes nothing.

    Returns:
        Dict of the run's settings, the re-registration's scores and per checkpoint its argmax scores, fitted class
        weights and in-sample mean F1.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(message)s")
    if isinstance(weights, str):
        weights = [w for w in weights.split(",") if w]
    start = time.perf_counter()
    found = collect(
        weights, residual_input, decoder, hidden_channels, datalist, split, patches_per_pair, batch_size, seed
    )
    labels, residual = found["labels"], found["residual"]
    calibration = ResidualCalibration.read(calibration_file, ReregistrationOptions()) if calibration_file else None
    results: dict = {
        "datalist": str(datalist),
        "split": split,
        "pairs": int(found["pairs"]),
        "patches_per_pair": patches_per_pair,
        "seed": seed,
        "residual_input": residual_input,
        "voxels": int(labels.size),
        "class_mix": (np.bincount(labels, minlength=3) / max(labels.size, 1)).round(4).tolist(),
        **reregistration_scores(labels, residual, calibration),
    }
    for checkpoint, probabilities in zip(weights, found["networks"]):
        class_weights, fitted, _ = fit_class_weights(labels, probabilities)
        results[checkpoint] = {
            "argmax": voxel_scores(labels, probabilities),
            "class_weights_fitted_here": class_weights,
            "mean_f1_class_weighted_in_sample": fitted,
        }
    results["seconds"] = round(time.perf_counter() - start, 1)
    summary = {k: round(v["argmax"]["mean_f1"], 3) for k, v in results.items() if isinstance(v, dict) and "argmax" in v}
    logger.info("mean F1 (argmax) per checkpoint: %s", summary)
    if output:
        atomic_write_text(Path(output), json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    fire.Fire(
        {"score": score, "fit_weights": fit_weights, "compare": compare},
        serialize=lambda results: json.dumps(results, indent=1),
    )
