"""`choose_precision`: bf16 where the CPU has bf16 units (from /proc/cpuinfo), fp32 elsewhere, overridable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusionkit import precision
from fusionkit.config import ConfigError
from fusionkit.precision import choose_precision

AVX2_ONLY = "flags\t\t: fpu sse sse2 avx fma avx2 bmi2\n"
AMX = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
GENOA = "flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd aes sve i8mm bf16\n"


@pytest.fixture
def cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def write(text: str) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        monkeypatch.setattr(precision, "CPUINFO", path)

    return write


@pytest.mark.parametrize(("text", "flag"), [(AMX, "amx_bf16"), (GRAVITON3, "bf16")])
def test_auto_picks_bf16_on_cpus_with_bf16_units(cpuinfo, text: str, flag: str) -> None:
    cpuinfo(text)
    p = choose_precision("auto", "cpu")
    assert (p.name, p.dtype, p.mixed_precision) == ("bf16", torch.bfloat16, "bf16")
    assert p.reason == f"bf16: CPU has {flag}"


def test_avx512_bf16_without_amx_stays_fp32_unless_asked(cpuinfo) -> None:
    """Zen 4: bf16 matmuls are native, but autocast measured no faster end to end (inference.md)."""
    cpuinfo(GENOA)
    p = choose_precision("auto", "cpu")
    assert p.name == "fp32" and "avx512_bf16" in p.reason and "run.precision=bf16" in p.reason
    assert choose_precision("bf16", "cpu").name == "bf16"


def test_auto_stays_fp32_on_avx2_only_cpu(cpuinfo) -> None:
    cpuinfo(AVX2_ONLY)
    p = choose_precision("auto", "cpu")
    assert (p.name, p.dtype, p.mixed_precision) == ("fp32", None, "no")
    assert p.reason.startswith("fp32: CPU has no bf16 units")


def test_unreadable_cpuinfo_means_fp32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "missing")
    assert choose_precision("auto", "cpu").name == "fp32"


def test_config_overrides_the_choice(cpuinfo) -> None:
    cpuinfo(AVX2_ONLY)
    forced = choose_precision("bf16", "cpu")
    assert forced.name == "bf16" and "much slower" in forced.reason
    cpuinfo(AMX)
    assert choose_precision("fp32", "cpu").name == "fp32"
    fp16 = choose_precision("fp16", "cpu")  # needs a GradScaler and buys nothing on CPU
    assert fp16.name == "fp32" and "CUDA" in fp16.reason


def test_unknown_precision_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="run.precision must be one of"):
        choose_precision("int8", "cpu")


def test_autocast_context_runs_matmul_in_the_chosen_dtype(cpuinfo) -> None:
    cpuinfo(AMX)
    a = torch.randn(4, 8)
    with choose_precision("auto", "cpu").autocast("cpu"):
        assert (a @ a.T).dtype == torch.bfloat16
    cpuinfo(AVX2_ONLY)
    with choose_precision("auto", "cpu").autocast("cpu"):
        assert (a @ a.T).dtype == torch.float32
