"""Allocation failures: which errors are one, and what they asked for (the CLI's advice, calibration's retry)."""

from __future__ import annotations

import re

import torch

from .files.fileio import size_text


def out_of_memory(e: BaseException) -> bool:
    """Whether an error is an allocation failure: torch's on a GPU, the CPU allocator's (a RuntimeError told by its
    message), or Python's."""
    if isinstance(e, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)


def memory_reason(e: BaseException) -> str:
    """What an allocation failure asked for, in a few words."""
    asked = re.search(r"tried to allocate ([\d.]+ ?[KMGT]?i?B|\d+ bytes)", str(e))
    if asked is None:
        return "out of memory"
    amount = asked.group(1)
    if amount.endswith(" bytes"):
        amount = size_text(int(amount.split()[0]))
    return f"out of memory: {amount} asked for at once"
