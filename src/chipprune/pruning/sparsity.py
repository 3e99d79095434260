"""The paper's sparsity lists: `[0.]+[0.15]*2+[0.4]*27`, plain `0,0.15,0.15`, or a named preset."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import NamedTuple

from ..models import get_arch

_TERM = re.compile(r"\[\s*([^\[\]]*?)\s*\](?:\s*\*\s*(\d+))?")
_NUMBER = re.compile(r"(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
MAX_RATES = 10_000  # far above any network's layer count; a larger repeat would only build a huge list


class SparsityError(ValueError):
    """A sparsity string that cannot be read, or does not fit the architecture."""


def parse_rates(text: str) -> list[float]:
    """Rates from `[a]*k+[b, c]+…` or `a,b,c` (no eval)."""
    text = text.strip()
    if not text:
        raise SparsityError("empty sparsity")
    if "[" not in text:
        return [_number(t) for t in text.split(",")]
    rates: list[float] = []
    for term in text.split("+"):
        m = _TERM.fullmatch(term.strip())
        if not m:
            raise SparsityError(f"cannot read {term.strip()!r} in {text!r}: expected [rate, …] or [rate]*count")
        values = [_number(t) for t in m.group(1).split(",")]
        count = int(m.group(2) or 1)
        if len(rates) + len(values) * count > MAX_RATES:
            raise SparsityError(f"too many rates: the sparsity string asks for more than {MAX_RATES}")
        rates += values * count
    return rates


def _number(token: str) -> float:
    token = token.strip()
    if not _NUMBER.fullmatch(token):
        raise SparsityError(f"not a rate: {token!r}")
    return float(token)


def resolve(arch_name: str, sparsity: str) -> list[float]:
    """The rates for an architecture from a preset name or a sparsity string, checked for count and range."""
    arch = get_arch(arch_name)
    if sparsity.strip()[:1].isalpha():
        if sparsity not in arch.presets:
            known = ", ".join(arch.presets) or "none"
            raise SparsityError(f"unknown preset {sparsity!r} for {arch_name} (presets: {known})")
        sparsity = arch.presets[sparsity]
    rates = parse_rates(sparsity)
    if len(rates) != arch.num_rates:
        presets = f"; presets: {', '.join(arch.presets)}" if arch.presets else ""
        raise SparsityError(f"{arch_name} takes {arch.num_rates} rates ({arch.rate_layout}), got {len(rates)}{presets}")
    bad = [r for r in rates if not 0 <= r < 1]
    if bad:
        raise SparsityError(f"rates must be in [0, 1), got {bad[0]}")
    return rates


def widths(arch_name: str, sparsity: str, round_to: int | None = None) -> dict[str, int]:
    """Per-conv output widths for an architecture at a sparsity, each rounded to a multiple of `round_to` if given
    (aligned); every conv keeps at least one channel."""
    w = get_arch(arch_name).widths_for_rates(resolve(arch_name, sparsity))
    empty = [name for name, c in w.items() if c < 1]
    if empty and not round_to:
        raise SparsityError(f"sparsity leaves no channels in {empty[0]}")
    return aligned(w, full_widths(arch_name), round_to) if round_to else w


def full_widths(arch_name: str) -> dict[str, int]:
    """Per-conv output widths of the unpruned architecture."""
    arch = get_arch(arch_name)
    return arch.widths_for_rates([0.0] * arch.num_rates)


def aligned(widths: dict[str, int], full: dict[str, int], n: int) -> dict[str, int]:
    """Each width rounded to the nearest multiple of n (halves up), never below n nor above the layer's full width.

    Hardware runs some channel counts much faster than their neighbours: on an AVX512-bf16 CPU the paper-1 ResNet-56
    (widths 9, 13, 19, 27, 38) trains in bf16 at 343 images/s, rounded to multiples of 16 at 497
    (docs/performance.md)."""
    if n < 1:
        raise SparsityError(f"round_to must be a positive integer, got {n}")
    return {name: min(full[name], max(n, n * math.floor(c / n + 0.5))) for name, c in widths.items()}


class Rounded(NamedTuple):
    """One change that rounding made: a width by the paper's floor, the width kept, and in how many layers."""

    floor: int
    kept: int
    layers: int


def rounding(arch_name: str, sparsity: str, round_to: int) -> list[Rounded]:
    """What `round_to` changes in the paper's widths of a sparsity, one row per distinct change."""
    floor, kept = widths(arch_name, sparsity), widths(arch_name, sparsity, round_to)
    changes = Counter((floor[name], kept[name]) for name in floor if floor[name] != kept[name])
    return [Rounded(f, k, n) for (f, k), n in sorted(changes.items())]


def format_rates(rates: list[float]) -> str:
    """The compact `[a]*k+[b]` form of a rate list."""
    runs: list[tuple[float, int]] = []
    for r in rates:
        if runs and runs[-1][0] == r:
            runs[-1] = (r, runs[-1][1] + 1)
        else:
            runs.append((r, 1))
    return "+".join(f"[{r!r}]" + (f"*{k}" if k > 1 else "") for r, k in runs)
