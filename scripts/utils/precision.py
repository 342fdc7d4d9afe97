"""Which floating-point precision to compute in: bfloat16 only where the hardware has it natively.

On a CPU without AVX-512 BF16 or AMX (most laptops, AMD EPYC before Zen 4) oneDNN has no bf16 convolution kernel
and falls back to a reference loop: measured on a 2-core AMD EPYC (AVX2), a Conv3d(32, 32, 3) ran at 0.4 GFLOP/s in
bf16 against 194 GFLOP/s in fp32 (benchmarks/bench_training.py). "auto" picks bf16 only where it is fast.
"""

from __future__ import annotations

import torch

AUTO = "auto"


def native_bfloat16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bf16 convolutions natively: a CUDA GPU with bf16, or a CPU with AVX-512 BF16 or
    AMX tiles (torch's own CPU feature checks)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


def resolve_precision(precision: str | None, device: torch.device | str = "cpu") -> str:
    """``precision`` as given ("float32", "bfloat16", ...), or for "auto" "bfloat16" where ``device`` has it
    natively (``native_bfloat16``) and "float32" elsewhere; None and "" mean "float32".

    Args:
        precision: "float32", "bfloat16", "auto", None or "".
        device: device checked for native bfloat16 with "auto".

    Returns:
        The precision name, e.g. "float32" or "bfloat16".
    """
    if precision in (None, ""):
        return "float32"
    if precision == AUTO:
        return "bfloat16" if native_bfloat16(device) else "float32"
    return str(precision)
