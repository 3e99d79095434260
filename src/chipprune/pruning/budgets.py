"""What to prune to: four budgets, each a small frozen record that checks itself when built.

`Sparsity` holds the paper's per-layer rates of a registry architecture; `Ratio`, `Flops` and `Latency` prune any
model through its dependency graph. How the channels are spread over the layers is the budget's `allocate`: every
group the same fraction (uniform), one ranking of all groups' scores (global), or by each group's measured
sensitivity (sensitivity). This module is the one place that says which combinations are valid."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Allocate = Literal["uniform", "global", "sensitivity"]
ALLOCATIONS: tuple[Allocate, ...] = ("uniform", "global", "sensitivity")
RUNTIMES = ("eager", "torchscript", "onnxruntime")


class BudgetError(ValueError):
    """A budget that cannot be met as given."""


def _check_round_to(round_to: int | None) -> None:
    if round_to is not None and (type(round_to) is not int or round_to < 1):
        raise BudgetError(f"round_to must be a whole number >= 1, got {round_to!r}")


def _check_fraction(name: str, value: float, *, zero: bool, one: bool) -> None:
    """A finite number in the interval from 0 to 1, each end included where asked."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if zero else value > 0) and (value <= 1 if one else value < 1)
    if not ok:
        interval = f"{'[' if zero else '('}0, 1{']' if one else ')'}"
        raise BudgetError(f"{name} must be a number in {interval}, got {value!r}")


def _check_allocate(allocate: str) -> None:
    if allocate not in ALLOCATIONS:
        raise BudgetError(f"allocate must be one of {', '.join(ALLOCATIONS)}, got {allocate!r}")


@dataclass(frozen=True)
class Sparsity:
    """The paper's per-layer rates of a registry architecture: a preset (paper-1), the paper's syntax
    ([0.]+[0.15]*2+[0.4]*27) or a comma-separated list; each kept count rounded to a multiple of round_to."""

    spec: str
    round_to: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.spec, str) or not self.spec.strip():
            raise BudgetError(f"a sparsity is a preset name or a list of rates, got {self.spec!r}")
        _check_round_to(self.round_to)


@dataclass(frozen=True)
class Ratio:
    """Remove this fraction of every dependency group's channels (uniform), or of all channels ranked together."""

    ratio: float
    allocate: Allocate = "uniform"
    round_to: int | None = None

    def __post_init__(self) -> None:
        _check_fraction("ratio", self.ratio, zero=True, one=False)
        _check_allocate(self.allocate)
        _check_round_to(self.round_to)


@dataclass(frozen=True)
class Flops:
    """Keep this fraction of the model's multiply-accumulates (reached within 2 %)."""

    fraction: float
    allocate: Allocate = "uniform"
    round_to: int | None = None

    def __post_init__(self) -> None:
        _check_fraction("fraction", self.fraction, zero=False, one=True)
        _check_allocate(self.allocate)
        _check_round_to(self.round_to)


@dataclass(frozen=True)
class Latency:
    """Run in at most this fraction of the dense model's latency, as measured on `runtime` with `threads` CPU
    threads (None: torch's) at `batch_size`."""

    fraction: float
    runtime: str = "eager"
    threads: int | None = None
    batch_size: int = 1
    allocate: Allocate = "uniform"

    def __post_init__(self) -> None:
        _check_fraction("fraction", self.fraction, zero=False, one=True)
        if self.runtime not in RUNTIMES:
            raise BudgetError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        for name, value in (("threads", self.threads), ("batch_size", self.batch_size)):
            if value is not None and (type(value) is not int or value < 1):
                raise BudgetError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.allocate == "global":
            raise BudgetError("a latency budget spreads its cut uniformly or by sensitivity, not by one global ranking")


Budget = Sparsity | Ratio | Flops | Latency
