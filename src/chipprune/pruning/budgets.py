"""What to prune to: four budgets, each a small frozen record that checks itself when built, and the one place that
says which budgets go with which other choices (residual mode, scores, calibration).

`Sparsity` holds the paper's per-layer rates of a registry architecture; `Ratio`, `Flops` and `Latency` prune any
model through its dependency graph. How they spread the cut over the groups is their `allocate`: every group the same
fraction (uniform), one ranking of all groups' scores (global; `Ratio` and `Flops`), or, for `Flops` and `Latency`,
by each group's measured sensitivity (sensitivity: pruning/sensitivity.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

Allocate = Literal["uniform", "global", "sensitivity"]
ALLOCATIONS: tuple[str, ...] = ("uniform", "global", "sensitivity")
RUNTIMES = ("eager", "torchscript", "onnxruntime")
RESIDUAL_MODES = ("coupled", "paper")


class BudgetError(ValueError):
    """A budget, or a choice beside it, that cannot be carried out as given."""


def _whole(name: str, value: int | None) -> None:
    if value is not None and (type(value) is not int or value < 1):
        raise BudgetError(f"{name} must be a whole number >= 1, got {value!r}")


def _fraction(name: str, value: float, *, zero: bool, one: bool) -> None:
    """A finite number between 0 and 1, each end included where asked."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if zero else value > 0) and (value <= 1 if one else value < 1)
    if not ok:
        raise BudgetError(f"{name} must be a number in {'[' if zero else '('}0, 1{']' if one else ')'}, got {value!r}")


@dataclass(frozen=True)
class Sparsity:
    """The paper's per-layer rates of a registry architecture: a preset (paper-1), the paper's syntax
    ([0.]+[0.15]*2+[0.4]*27) or a comma-separated list; each kept count rounded to a multiple of round_to."""

    spec: str
    round_to: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.spec, str) or not self.spec.strip():
            raise BudgetError(f"a sparsity is a preset name or a list of rates, got {self.spec!r}")
        _whole("round_to", self.round_to)


@dataclass(frozen=True)
class Ratio:
    """Remove this fraction of every dependency group's channels (uniform), or of all of them ranked together
    (global); kept counts at multiples of round_to."""

    ratio: float
    allocate: Allocate = "uniform"
    round_to: int | None = None

    def __post_init__(self) -> None:
        _fraction("ratio", self.ratio, zero=True, one=False)
        if self.allocate not in ("uniform", "global"):
            raise BudgetError(f"a ratio is allocated uniform or global, got {self.allocate!r}")
        _whole("round_to", self.round_to)


@dataclass(frozen=True)
class Flops:
    """Keep this fraction of the model's multiply-accumulates (reached within 2 %), spread over the groups as
    `allocate` says; kept counts at multiples of round_to."""

    fraction: float
    allocate: Allocate = "uniform"
    round_to: int | None = None

    def __post_init__(self) -> None:
        _fraction("fraction", self.fraction, zero=False, one=True)
        if self.allocate not in ALLOCATIONS:
            raise BudgetError(f"allocate must be one of {', '.join(ALLOCATIONS)}, got {self.allocate!r}")
        _whole("round_to", self.round_to)


@dataclass(frozen=True)
class Latency:
    """Run in at most this fraction of the dense model's latency, as measured on `runtime` with `threads` CPU
    threads (None: torch's) at `batch_size`, `repeats` timed runs per table entry; the cut spread over the groups
    as `allocate` says (uniform or sensitivity)."""

    fraction: float
    runtime: str = "eager"
    threads: int | None = None
    batch_size: int = 1
    repeats: int = 20
    allocate: Allocate = "uniform"

    def __post_init__(self) -> None:
        _fraction("fraction", self.fraction, zero=False, one=True)
        if self.allocate not in ("uniform", "sensitivity"):
            raise BudgetError(f"a latency budget is allocated uniform or sensitivity, got {self.allocate!r}")
        if self.runtime not in RUNTIMES:
            raise BudgetError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        for name, value in (("threads", self.threads), ("batch_size", self.batch_size), ("repeats", self.repeats)):
            _whole(name, value)


Budget = Sparsity | Ratio | Flops | Latency


class Spelling(NamedTuple):
    """How refusals name the choices: as the API's parameters, or as the command line's options."""

    residual_paper: str
    data: str
    scores: str
    recalibrate_bn: str
    kinds: dict[type, str]  # each budget's name


API = Spelling(
    "residual='paper'", "calibration", "scores", "recalibrate_bn",
    {Sparsity: "a Sparsity budget", Ratio: "a Ratio budget", Flops: "a Flops budget", Latency: "a Latency budget"},
)  # fmt: skip
CLI = Spelling(
    "--residual paper", "--data", "--scores", "--recalibrate-bn",
    {Sparsity: "--sparsity", Ratio: "--ratio", Flops: "--flops-target", Latency: "--latency-target"},
)  # fmt: skip


def check(
    budget: Budget,
    *,
    library: bool,
    residual: str,
    calibration: bool,
    recalibrate_bn: int,
    processes: int = 1,
    spelling: Spelling = API,
) -> None:
    """BudgetError for a budget that does not go with the model (a library model has no paper rates), the residual
    mode, calibration data (needed to re-estimate BatchNorm) or the processes it runs in."""
    kind = spelling.kinds
    if residual not in RESIDUAL_MODES:
        raise BudgetError(f"residual must be one of {', '.join(RESIDUAL_MODES)}, got {residual!r}")
    if type(recalibrate_bn) is not int or recalibrate_bn < 0:
        raise BudgetError(f"{spelling.recalibrate_bn} must be >= 0, got {recalibrate_bn}")
    if recalibrate_bn and not calibration:
        raise BudgetError(f"{spelling.recalibrate_bn} needs {spelling.data} (its batches come from the train split)")
    if isinstance(budget, Sparsity):
        if library:
            raise BudgetError(
                f"{kind[Sparsity]} holds the paper's per-layer rates of the registry architectures; prune a library "
                f"model with {kind[Flops]} or {kind[Ratio]}"
            )
        return
    if isinstance(budget, Latency) and residual == "paper":
        raise BudgetError(f"{spelling.residual_paper} does not apply to {kind[Latency]}")
    if residual == "paper":
        raise BudgetError(
            f"{spelling.residual_paper} applies to {kind[Sparsity]}: with {kind[type(budget)]} the dependency graph "
            "couples the residual channels"
        )
    if processes > 1:
        raise BudgetError(f"{kind[type(budget)]} runs in one process; run it without torchrun")
    if isinstance(budget, Flops | Latency) and budget.allocate == "sensitivity" and not calibration:
        raise BudgetError(f"allocating by sensitivity needs {spelling.data}: its curves are measured on its images")
