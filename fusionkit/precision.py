"""Which dtype to train and infer in: bf16 where the hardware multiplies bf16 natively, fp32 elsewhere.

bf16 autocast pays off only where matmuls run natively in bf16 at a rate that beats the casts: GPUs
with bf16 tensor cores (Ampere and later), CPUs with Intel AMX (`amx_bf16`: DINOv2-S forward 3.1x
faster than fp32, cosine 0.9999) and Arm's BF16 extension (`bf16`). AVX512-BF16 alone (`avx512_bf16`,
AMD Zen 4) runs a bare bf16 matmul ~2.7x faster, but measured end to end here (MiniLM-L6 + DINOv2-S
embed: 0.97x; the tiny training job: 0.7x) autocast loses what the matmuls gain, so "auto" keeps fp32
there and `run.precision: bf16` opts in. On an AVX2-only CPU bf16 is emulated: hundreds of times slower.

The choice comes from the CPU's flags, not from a timing probe: a probe on a busy machine is noisy,
and a run must not switch precision between its start and its resume. `run.precision` overrides it.

    p = choose_precision("auto", torch.device("cpu"))
    log.info("precision %s", p.reason)          # "bf16: CPU has amx_bf16"
    with p.autocast("cpu"):
        out = model(**batch)
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# CPU flags that mean bf16 matmuls run in hardware: x86 AMX, x86 AVX512-BF16, Arm v8.6 BF16.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
# ...and those where "auto" picks bf16 (fast enough end to end; see the module docstring).
CPU_AUTO_BF16_FLAGS = ("amx_bf16", "bf16")
CPUINFO = Path("/proc/cpuinfo")  # module-level so tests can point it at a fake file

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_TORCH_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}


@dataclass(frozen=True)
class Precision:
    """The chosen precision and why, in one sentence for the log."""

    name: str  # "fp32" | "bf16" | "fp16"
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype; None = plain fp32."""
        return _DTYPES[self.name]

    @property
    def mixed_precision(self) -> str:
        """The same choice spelled for `accelerate.Accelerator(mixed_precision=...)`."""
        return "no" if self.name == "fp32" else self.name

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """`torch.autocast` for this precision (a no-op context for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.dtype)


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`); empty where it is absent."""
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_bf16_flag() -> str | None:
    """The first flag saying this CPU has bf16 matrix units, or None."""
    flags = cpu_flags()
    return next((f for f in CPU_BF16_FLAGS if f in flags), None)


def _cpu(requested: str) -> Precision:
    flag = cpu_bf16_flag()
    native = f"CPU has {flag}" if flag else "CPU has no bf16 units (" + "/".join(CPU_BF16_FLAGS[:2]) + ")"
    if requested == "auto":
        if flag in CPU_AUTO_BF16_FLAGS:
            return Precision("bf16", f"bf16: {native}")
        if flag:
            return Precision("fp32", f"fp32: {native} but no AMX, where bf16 autocast measured no faster end "
                             "to end; set run.precision=bf16 to use it")  # fmt: skip
        return Precision("fp32", f"fp32: {native}; emulated bf16 would be far slower")
    if requested == "bf16":
        slow = "" if flag else ", expect it to be much slower than fp32"
        return Precision("bf16", f"bf16 (run.precision): {native}{slow}")
    if requested == "fp16":
        return Precision("fp32", "fp32: fp16 autocast with loss scaling is for CUDA; CPU runs in fp32")
    return Precision("fp32", "fp32 (run.precision)")


def _cuda(requested: str, device: torch.device) -> Precision:
    name = torch.cuda.get_device_name(device)
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    if requested == "auto":
        if native:
            return Precision("bf16", f"bf16: {name} has bf16 tensor cores")
        return Precision(
            "fp32", f"fp32: {name} has no native bf16; set run.precision=fp16 for mixed precision"
        )
    if requested == "bf16" and not native:
        return Precision("bf16", f"bf16 (run.precision): {name} emulates bf16, expect it to be slow")
    return Precision(requested, f"{requested} (run.precision) on {name}")


def choose_precision(requested: str = "auto", device: torch.device | str = "cpu", what: str = "run.precision") -> Precision:
    """Resolve `run.precision` ("auto" | "fp32" | "bf16" | "fp16") for `device`.

    auto: bf16 on GPUs with bf16 tensor cores and on CPUs with AMX or Arm's BF16 (`CPU_AUTO_BF16_FLAGS`),
    fp32 elsewhere, AVX512-BF16 without AMX included (measured no faster end to end). An explicit
    bf16 is honoured everywhere; fp16 only on CUDA (it needs a GradScaler, and CPUs gain nothing from it).
    `what`: the setting as the caller wrote it (`run.precision`, `--precision`, `precision`), for the error.
    """
    if requested not in PRECISIONS:
        spelled = _TORCH_NAMES.get(str(requested).removeprefix("torch."))
        hint = f" ({requested!r} is {spelled!r} here)" if spelled else ""
        raise ConfigError(f"{what} must be one of {PRECISIONS}, got {requested!r}{hint}")
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda(requested, device)
    if device.type == "cpu":
        return _cpu(requested)
    if requested == "auto":
        return Precision("fp32", f"fp32: auto picks mixed precision on CUDA and CPUs only, not {device.type}")
    return Precision(requested, f"{requested} (run.precision) on {device.type}")


def inference_precision(requested: str, device: torch.device | str, what: str) -> Precision:
    """`choose_precision` for eval and predict, saying (as training does) when an explicit choice does not run:
    fp16 on a CPU runs in fp32."""
    chosen = choose_precision(requested, device, what)
    if requested not in ("auto", chosen.name):
        logging.getLogger("fusionkit").warning("%s %s: %s", what, requested, chosen.reason)
    return chosen
