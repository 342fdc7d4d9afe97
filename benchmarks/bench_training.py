"""Training-step throughput: samples/s, achieved GFLOP/s and its ratio to a plain conv3d peak measured in the same run.

One step = forward + loss + backward + Adam update on 101^3 patches (or the larger encoder windows of a larger output
block, ``--output_sizes``), exactly the path the training configs use
(``PatchTrainingNetwork`` / ``AutocastInferer`` / the losses). FLOPs of forward + backward come from
``torch.utils.flop_counter.FlopCounterMode``; the peak is a Conv3d(32 -> 32, 3^3) forward in fp32 and bf16, contiguous
and channels-last, the fastest of which is the reference. Also labelled voxels per second (25^3 output voxels per
sample of the misalignment network, or n^3 for ``--output_sizes "[n]"``; 21^3 of RegNet). ``--residual_input
lstm_prior --freeze_encoders true`` measures the residual-informed recipe (configs/train_residual.json),
``--residual_input encoders --freeze_encoders false`` its variant whose encoders read r and learn. Prints medians;
run from the repository root:

    python -m benchmarks.bench_training --models "['regnet','misalignment']" --batches "[1]" --repeats 3
    python -m benchmarks.bench_training --models "['misalignment']" --batches "[4]" --precisions "['bf16']" \
        --channels_last true --residual_input lstm_prior --freeze_encoders true
    python -m benchmarks.bench_training --models "['misalignment']" --batches "[2]" --precisions "['fp32']" \
        --channels_last true --residual_input lstm_prior --freeze_encoders true --output_sizes "[25,41,57]"
"""

import json
import statistics
import time
from typing import Callable, Dict, List, Sequence

import fire
import torch
from torch.utils.flop_counter import FlopCounterMode

from scripts.engines.losses import HierarchicalCrossEntropyLoss, RegNetLoss
from scripts.engines.trainer import AutocastInferer, PatchTrainingNetwork, as_bool
from scripts.networks.misalignment_net import MisalignmentNet
from scripts.networks.regnet import RegNet
from scripts.utils.encoder_windows import window_sizes
from scripts.utils.precision import native_bfloat16

PATCH = 101
REGNET_LABELLED_VOXELS = 21**3  # RegNet's output voxels with a target, per sample


def _median_seconds(step: Callable[[], None], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def conv3d_peak(size: int = 48, repeats: int = 5) -> Dict[str, float]:
    """GFLOP/s of a Conv3d(32, 32, 3, padding=1) forward on ``[1, 32, size^3]`` in four forms (medians). On a CPU
    without native bf16 (0.4 GFLOP/s on an AVX2 EPYC: minutes per call) bf16 is timed once, without warm-up."""
    results = {}
    flops = 2 * 32 * 32 * 27 * size**3
    native = native_bfloat16("cpu")
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        slow = dtype == torch.bfloat16 and not native
        for layout_name, layout in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last_3d)):
            conv = torch.nn.Conv3d(32, 32, 3, padding=1).to(dtype=dtype, memory_format=layout)
            x = torch.randn(1, 32, size, size, size).to(dtype=dtype, memory_format=layout)
            with torch.no_grad():
                seconds = _median_seconds(lambda: conv(x), 1 if slow else repeats, warmup=0 if slow else 2)
            results[f"conv3d {dtype_name} {layout_name}"] = flops / seconds / 1e9
    return results


def _training_step(
    model: str,
    batch: int,
    precision: str,
    decoder: str,
    channels_last: bool,
    residual_input: str = "none",
    freeze_encoders: bool = False,
    output_size: int = 25,
) -> Callable[[], None]:
    torch.manual_seed(0)
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    inferer = AutocastInferer("bfloat16" if precision == "bf16" else None)

    def patch(size: int = PATCH, channels: int = 2) -> torch.Tensor:
        """A pair window in HU; with 5 channels r (mm, about +-6) follows, as the "encoders" variant reads it."""
        pair = (torch.rand(batch, 2, size, size, size) * 1500 - 1000).round()
        if channels > 2:
            pair = torch.cat([pair, torch.randn(batch, channels - 2, size, size, size) * 3], dim=1)
        return pair.to(memory_format=layout)

    if model == "regnet":
        network: torch.nn.Module = RegNet().to(memory_format=layout)
        inputs = patch() / 1000.0 + 1.0
        target = torch.randn(batch, 3, 21, 21, 21)
        loss_fn: torch.nn.Module = RegNetLoss()
    elif model == "misalignment":
        net = MisalignmentNet(decoder=decoder, residual_input=residual_input)
        network = PatchTrainingNetwork(net, freeze_encoders).to(memory_format=layout)
        inputs = tuple(patch(n, net.encoder_channels) for n in window_sizes(output_size, net.factors).values())
        block = (batch, 1, output_size, output_size, output_size)
        if residual_input != "none":
            inputs += (torch.randn(batch, 3, *block[2:]).to(memory_format=layout) * 3,)
        target = torch.rand(block) * 12
        loss_fn = HierarchicalCrossEntropyLoss.from_decoder(net.decoder)
    else:
        raise ValueError(f"unknown model {model!r}; use 'regnet' or 'misalignment'")
    network.train()
    trained = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=1e-3, fused=True)  # as the training configs

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(inferer(inputs, network), target)
        loss.backward()
        optimizer.step()

    return step


def training_throughput(
    model: str,
    batch: int,
    precision: str,
    decoder: str = "lstm",
    channels_last: bool = False,
    repeats: int = 3,
    residual_input: str = "none",
    freeze_encoders: bool = False,
    output_size: int = 25,
) -> Dict[str, float]:
    """Median seconds per step, samples/s, labelled voxels/s, GFLOP per step (forward + backward) and GFLOP/s."""
    step = _training_step(model, batch, precision, decoder, channels_last, residual_input, freeze_encoders, output_size)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    seconds = _median_seconds(step, repeats, warmup=1)
    return {
        "seconds_per_step": seconds,
        "samples_per_s": batch / seconds,
        "labelled_voxels_per_s": batch * (REGNET_LABELLED_VOXELS if model == "regnet" else output_size**3) / seconds,
        "gflop_per_step": flops / 1e9,
        "gflop_per_s": flops / seconds / 1e9,
    }


def run_benchmark(
    models: Sequence[str] = ("regnet", "misalignment"),
    batches: Sequence[int] = (1,),
    precisions: Sequence[str] = ("fp32", "bf16"),
    decoder: str = "lstm",
    channels_last: bool = False,
    repeats: int = 3,
    threads: int = 0,
    residual_input: str = "none",
    freeze_encoders: bool = False,
    output_sizes: Sequence[int] = (25,),
) -> List[Dict[str, object]]:
    """Measure the conv3d peak, then every (model, batch, precision); print a table and one JSON line per row."""
    channels_last, freeze_encoders = as_bool(channels_last), as_bool(freeze_encoders)  # "true" from the command line
    if threads > 0:
        torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {repeats} (after 1 warm-up)")
    peaks = conv3d_peak()
    for name, value in peaks.items():
        print(f"{name:32s} {value:8.1f} GFLOP/s")
    peak_name = max(peaks, key=peaks.get)
    peak = peaks[peak_name]
    print(f"peak reference: {peak_name} = {peak:.1f} GFLOP/s")
    rows: List[Dict[str, object]] = []
    for model, output_size in [(m, n) for m in models for n in (output_sizes if m != "regnet" else [21])]:
        for batch in batches:
            for precision in precisions:
                result = training_throughput(
                    model,
                    batch,
                    precision,
                    decoder,
                    channels_last,
                    repeats,
                    residual_input,
                    freeze_encoders,
                    output_size,
                )
                name = model if model == "regnet" else f"misalignment-{decoder}"
                if model != "regnet" and residual_input != "none":
                    name += f"+r:{residual_input}"
                row: Dict[str, object] = {
                    "model": name,
                    "freeze_encoders": freeze_encoders and model != "regnet",
                    "output_size": output_size,
                    "batch": batch,
                    "precision": precision,
                    "channels_last": channels_last,
                    **{k: round(v, 4) for k, v in result.items()},
                    "ratio_to_peak": round(result["gflop_per_s"] / peak, 4),
                    "peak_reference": peak_name,
                }
                rows.append(row)
                print(
                    f"{row['model']:22s} {output_size}^3 batch {batch:2d} {precision}: "
                    f"{result['seconds_per_step']:7.2f} s/step "
                    f"{result['samples_per_s']:6.3f} samples/s {result['labelled_voxels_per_s']:9.0f} voxels/s "
                    f"{result['gflop_per_step']:8.1f} GFLOP/step "
                    f"{result['gflop_per_s']:7.1f} GFLOP/s = {100 * row['ratio_to_peak']:.0f}% of peak"
                )
                print(json.dumps(row))
    return rows


def main(**kwargs: object) -> None:
    """Command line: the arguments of ``run_benchmark``."""
    run_benchmark(**kwargs)


if __name__ == "__main__":
    fire.Fire(main)
