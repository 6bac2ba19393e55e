"""Inference precision as a setting: ``auto`` | ``fp32`` | ``bf16`` (``--precision`` of the scripts, the API).

``auto`` runs bf16 autocast only where the hardware computes bf16 natively, and fp32 elsewhere:
- CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and newer);
- x86 CPUs: the ``amx_bf16`` or ``avx512_bf16`` flag in ``/proc/cpuinfo`` (Sapphire Rapids / Cooper Lake and newer,
  Zen 4 and newer); aarch64 CPUs: the ``bf16`` feature. Anything else, or a cpuinfo that cannot be read, is fp32:
  the processor is detected, never guessed.
``bf16`` asked for explicitly runs bf16 also without native support (emulated, slower; a warning says so).
What was chosen and why is returned as one line for the caller to print.

bf16 autocast changes embeddings by little: cosine to the fp32 embedding of the same cell, on real cells
(celltypist's raw-count sample, pbmc68k_reduced as counts), min 0.999987 with the 51M architecture (random weights,
32 cells), 0.999992 with the demo one (random weights, 559 cells), 0.999999 with a trained demo checkpoint (150
steps of ``train.py``'s demo run; 1,259 cells): far above the 0.999 below which ``auto`` would not choose it.
"""

from __future__ import annotations

import contextlib
import logging
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from data_modules.errors import UserInputError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
NATIVE_BF16_X86 = ("amx_bf16", "avx512_bf16")


class PrecisionError(UserInputError):
    """A precision setting that is not one of ``PRECISIONS`` (a refusal of user input: exit 2 in the scripts)."""


def cpu_bf16_flags(cpuinfo: str | Path = "/proc/cpuinfo", machine: str | None = None) -> list[str]:
    """The native-bf16 flags this CPU reports (empty: none, or cpuinfo unreadable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    machine = machine or platform.machine()
    wanted = ("bf16",) if machine in ("aarch64", "arm64") else NATIVE_BF16_X86
    return [f for f in wanted if f in flags]


@dataclass(frozen=True)
class Precision:
    """The resolved setting: ``dtype`` to autocast to (None = fp32) and ``reason``, one printable line."""

    requested: str
    name: str  # "fp32" | "bf16"
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.name == "bf16" else None

    def autocast(self, device: torch.device | str):
        """A context that runs the forward in this precision on ``device`` (fp32: no autocast)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=self.dtype)


def resolve_precision(requested: str, device: torch.device | str, cpuinfo: str | Path = "/proc/cpuinfo") -> Precision:
    """``requested`` (``auto`` / ``fp32`` / ``bf16``) on ``device`` -> the precision to run, with the reason."""
    if requested not in PRECISIONS:
        raise PrecisionError(f"precision {requested!r} is not one of {list(PRECISIONS)} (--precision / precision=)")
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        detail = "the GPU supports bf16" if native else "the GPU has no bf16 support"
    elif device.type == "cpu":
        flags = cpu_bf16_flags(cpuinfo)
        native = bool(flags)
        detail = (
            f"the CPU has {', '.join(flags)}" if native else "the CPU reports no native bf16 (amx_bf16 / avx512_bf16)"
        )
    else:
        native, detail = False, f"no native bf16 is known for device {device.type!r}"
    if requested == "fp32":
        return Precision(requested, "fp32", "fp32 (asked for)")
    if requested == "bf16":
        if not native:
            log.warning("bf16 asked for on %s, but %s: it runs emulated, usually slower than fp32", device, detail)
        return Precision(requested, "bf16", f"bf16 autocast (asked for; {detail})")
    if native:
        return Precision(requested, "bf16", f"auto -> bf16 autocast ({detail})")
    return Precision(requested, "fp32", f"auto -> fp32 ({detail})")
