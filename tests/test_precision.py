"""precision "auto": bf16 only where the device computes it natively (a CPU without AVX-512 BF16 / AMX runs bf16
convolutions hundreds of times slower than fp32), for inference and training alike."""

import pytest
import torch

from scripts.engines.trainer import AutocastInferer
from scripts.inferers.misalignment_inferer import MisalignmentInferer
from scripts.utils import precision as precision_module
from scripts.utils.precision import native_bfloat16, resolve_precision


@pytest.mark.parametrize(
    "avx512_bf16, amx, expected", [(False, False, "float32"), (True, False, "bfloat16"), (False, True, "bfloat16")]
)
def test_auto_picks_bf16_only_on_a_cpu_with_native_bf16(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert native_bfloat16("cpu") == (expected == "bfloat16")
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("bfloat16", "cpu") == "bfloat16" and resolve_precision("float32", "cpu") == "float32"
    assert resolve_precision(None) == "float32" and resolve_precision("") == "float32"


def test_auto_autocast_follows_the_device(monkeypatch):
    linear = torch.nn.Linear(4, 2)
    x = torch.randn(3, 4)
    monkeypatch.setattr(precision_module, "native_bfloat16", lambda device="cpu": False)
    assert AutocastInferer("auto")(x, linear).dtype == torch.float32
    monkeypatch.setattr(precision_module, "native_bfloat16", lambda device="cpu": True)
    assert AutocastInferer("auto")(x, linear).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="auto"):
        AutocastInferer("float64")


def test_misalignment_inferer_accepts_auto_and_names_the_choices():
    assert MisalignmentInferer(precision="auto").precision == "auto"
    with pytest.raises(ValueError, match="auto"):
        MisalignmentInferer(precision="half")
