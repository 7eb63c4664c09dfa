"""train.amp=auto: bf16 where it is fast, fp32 elsewhere; explicit modes untouched."""

import pytest
import torch

from ciscr.config import TrainCfg, load_config
from ciscr.errors import ConfigError
from ciscr.utils import misc
from ciscr.utils.misc import (
    autocast,
    cpu_flags,
    cpu_has_fast_bf16,
    precision_name,
    resolve_amp,
)

SAPPHIRE = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


def test_cpu_flags_reads_the_first_flags_line():
    assert {"avx512_bf16", "amx_bf16", "fpu"} <= cpu_flags(SAPPHIRE)
    assert "avx512_bf16" not in cpu_flags(SKYLAKE)
    assert "bf16" in cpu_flags(GRAVITON)  # arm64 spells it "Features"
    assert cpu_flags("no flags here") == set()


def test_fast_bf16_needs_a_native_bf16_flag(monkeypatch):
    assert not cpu_has_fast_bf16(cpu_flags(SKYLAKE))  # AVX512 alone: oneDNN emulates bf16
    assert not cpu_has_fast_bf16(cpu_flags(GRAVITON))  # only the x86 flags are trusted
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert cpu_has_fast_bf16({"avx512_bf16"})
    assert cpu_has_fast_bf16({"amx_bf16"})
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not cpu_has_fast_bf16({"avx512_bf16", "amx_bf16"})  # a torch without oneDNN bf16


def test_auto_resolves_per_device(monkeypatch):
    assert resolve_amp("auto", "cpu", fast_cpu_bf16=True) == "bf16"
    assert resolve_amp("auto", "cpu", fast_cpu_bf16=False) == "none"
    assert resolve_amp("auto", "mps") == "none"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_amp("auto", "cuda:0") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_amp("auto", "cuda") == "none"  # e.g. a V100: fp16 would need loss scaling


@pytest.mark.parametrize("mode", ["none", "bf16", "fp16"])
def test_explicit_modes_are_kept(mode):
    assert resolve_amp(mode, "cpu", fast_cpu_bf16=True) == mode
    assert resolve_amp(mode, "cpu", fast_cpu_bf16=False) == mode


def test_precision_names_the_resolved_mode_and_refuses_auto():
    assert [precision_name(m) for m in ("none", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    with pytest.raises(ValueError, match="auto"):
        precision_name("auto")


def test_autocast_auto_follows_the_resolution(monkeypatch):
    w = torch.ones(4, 4)
    monkeypatch.setattr(misc, "_this_cpu_fast_bf16", lambda: True)
    with autocast("cpu", "auto"):
        assert (w @ w).dtype == torch.bfloat16
    monkeypatch.setattr(misc, "_this_cpu_fast_bf16", lambda: False)
    with autocast("cpu", "auto"):
        assert (w @ w).dtype == torch.float32
    assert misc.make_grad_scaler("cpu", "auto") is None


def test_auto_is_the_default_and_bad_values_are_config_errors():
    assert TrainCfg().amp == "auto"
    assert load_config("synthetic", ["train.amp=none"]).train.amp == "none"
    with pytest.raises(ConfigError, match="train.amp"):
        load_config("synthetic", ["train.amp=fp8"])
    with pytest.raises(ConfigError, match="fp16 needs a CUDA"):
        with autocast("cpu", "fp16"):
            pass
