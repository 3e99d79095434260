"""The arithmetic that training and evaluation run in: bf16 autocast with channels_last where the hardware computes
bf16 natively (CUDA GPUs; CPUs with AMX or AVX512-bf16), float32 elsewhere.

On this project's 2-core Xeon (AVX512-bf16), bf16 autocast + channels_last trains the dense ResNet-56 at 448
images/s against 204 in float32 (batch 256; benchmarks/train_speed.py, docs/performance.md). Scoring never uses
it: channel independence is computed in float64 from float32 feature maps."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": torch.float32}
AMP_CHOICES = ("auto", *AMP)
# torch.cpu.get_capabilities() keys of the instruction sets that compute bf16 natively, best first.
CPU_BF16 = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Precision:
    """Autocast dtype (bf16, fp16 with loss scaling, or off: float32), memory format, and why they were chosen."""

    amp: str
    channels_last: bool
    why: str

    def autocast(self, device: torch.device) -> AbstractContextManager[None]:
        """The autocast context of this precision on `device` (a no-op for float32)."""
        return torch.autocast(device.type, dtype=AMP[self.amp], enabled=self.amp != "off")

    def describe(self) -> str:
        """One line for the user: what runs, and why."""
        what = "float32" if self.amp == "off" else f"{self.amp} autocast"
        return f"{what}{' + channels_last' if self.channels_last else ''} ({self.why})"


FLOAT32 = Precision("off", False, "the default")


def native_bf16(device: torch.device) -> str | None:
    """What computes bf16 natively on `device` (for the message), or None where nothing does."""
    if device.type == "cuda":
        return "CUDA GPU with bf16" if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        capabilities: dict[str, bool] = dict(getattr(torch.cpu, "get_capabilities", dict)())  # torch >= 2.7 has it
        found = [name for name in CPU_BF16 if capabilities.get(name)]
        return f"CPU with {found[0].replace('_', '-').upper()}" if found else None
    return None


def choose(amp: str, channels_last: bool | None, device: torch.device) -> Precision:
    """The precision for `--amp` (auto: bf16 where native_bf16, else off) and `--channels-last` (None: with autocast,
    or on CUDA, where cuDNN prefers it in float32 too)."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    why = "asked"
    if amp == "auto":
        native = native_bf16(device)
        amp, why = ("bf16", f"auto: {native}") if native else ("off", f"auto: no native bf16 on this {device.type}")
    if channels_last is None:
        channels_last = amp != "off" or device.type == "cuda"
    return Precision(amp, channels_last, why)
