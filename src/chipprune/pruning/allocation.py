"""How many channels each group keeps: the widths that minimise a predicted loss under a cost budget.

Each group chooses its kept width (in units, as _coupling.py numbers them) from its floor up to all, in steps of
round_to. Its damage at a width is read off its curve (piecewise linear between measured widths, never extrapolated);
the model's predicted damage is the sum of the groups' (sensitivity.py measures the curves). The cost is a sum
over layers, each a function of its output and input channel counts (multiply-accumulates, parameters, or a latency
table's milliseconds), and a layer between two groups costs their product: the problem is a knapsack that is not
separable. HALP (Shen et al., NeurIPS 2022) meets the same coupling by holding each layer's input count at its current
value and solving the separable knapsack by dynamic programming on a grid of the latency; so does this solver, which
then moves the point it holds and solves again:

1. the cost is linearised at the current widths: each group's cost is that of its layers with every other group held;
2. that separable problem is solved exactly (a multiple-choice knapsack): a dynamic programme over the Pareto front of
   (cost, damage) of the groups so far, thinned to MAX_STATES points on a cost grid only where it grows beyond them;
3. the true cost of the answer is repaired: while over the budget, the move of one group to another width that adds
   the least damage per cost saved is taken, then, while one fits, the move that removes the most damage per cost
   added. A cost need not fall with a width (a latency table's: a count the hardware runs fast), so a move may go
   either way, and the least cost reachable is that of each group at its cheapest width, the others held;
4. 1-3 repeat from the new widths until they come back (ROUNDS at most); the least predicted damage wins.

With a separable cost (each layer set by one group) step 2 is exact and the answer is the optimum."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np

# The least fraction of a group's units it keeps. ResNet-56 at 52 % of its FLOPs, top-1 after BatchNorm re-estimation
# (results/sensitivity): floor 0.1 74.5 %, 0.25 74.8 %, 0.5 69.3 %; 0.25 costs nothing there and bounds the cuts that
# the additive loss model under-predicts most (many near-free groups cut together).
FLOOR = 0.25
ROUNDS = 8  # linearisations at most; ResNet-56 settled in 2 at 52 % of its FLOPs, in 6 at 30 %
MAX_STATES = 8192  # Pareto points kept per step of the dynamic programme: exact below, a 1/8192 cost grid above
MAX_OPTIONS = 64  # widths a group chooses from; a wider group moves in steps of several units (1152: 18)


class BudgetError(ValueError):
    """A budget that no allocation above the floor meets; `reachable` is the least fraction of the cost reachable."""

    def __init__(self, message: str, reachable: float) -> None:
        super().__init__(message)
        self.reachable = reachable


class Curve(NamedTuple):
    """A group's predicted damage at each measured width (in units), the widest first: its full width, damage 0."""

    kept: tuple[int, ...]
    damage: tuple[float, ...]

    @property
    def units(self) -> int:
        """The group's full width."""
        return self.kept[0]

    def at(self, kept: int) -> float:
        """The damage at `kept` units, linear between the measured widths."""
        return float(np.interp(kept, self.kept[::-1], self.damage[::-1]))


class Channels(NamedTuple):
    """A layer's channel count on one side: `total`, less what each group's removal takes from it (by group index:
    the channels gone when the group removes 0, 1, 2, ... of its units, least important first)."""

    total: int
    taken: Mapping[int, Sequence[int]]

    def count(self, removed: Sequence[int]) -> int:
        """The channels left when each group has removed `removed[g]` units."""
        return self.total - sum(t[removed[g]] for g, t in self.taken.items())


class Term(NamedTuple):
    """One layer's cost: a function of its output and input channel counts."""

    out: Channels
    inp: Channels
    cost: Callable[[int, int], float]

    def at(self, removed: Sequence[int]) -> float:
        """The cost with `removed` units gone from each group."""
        return self.cost(self.out.count(removed), self.inp.count(removed))


class Allocation(NamedTuple):
    """The units each group keeps, the cost of that and of the dense model, and the predicted damage."""

    kept: list[int]
    cost: float
    dense_cost: float
    damage: float

    @property
    def fraction(self) -> float:
        """The fraction of the dense cost kept."""
        return self.cost / self.dense_cost


def widths(curve: Curve, round_to: int | None = None, floor: float = FLOOR, options: int = MAX_OPTIONS) -> list[int]:
    """The widths a group may keep, narrowest first: from its floor (the most of `floor` of its units, round_to and
    its narrowest measured width, rounded up to a multiple of round_to) to all of its units, in steps of round_to
    (`options` at most); the full width always."""
    units, step = curve.units, round_to or 1
    least = max(math.ceil(floor * units), step, curve.kept[-1])
    step *= max(1, math.ceil(units / step / options))
    least = step * math.ceil(least / step)
    return [*range(least, units, step), units]


class _Problem(NamedTuple):
    """The allocation problem: per group its widths and their damage, and the layers' costs."""

    widths: list[list[int]]
    damage: list[list[float]]
    terms: list[Term]
    touching: list[list[int]]  # per group, the terms whose counts it changes
    units: list[int]

    def removed(self, choice: Sequence[int]) -> list[int]:
        """Units removed per group for a choice (an index into each group's widths)."""
        return [n - w[c] for n, w, c in zip(self.units, self.widths, choice, strict=True)]

    def cost(self, choice: Sequence[int]) -> float:
        """The total cost of a choice."""
        removed = self.removed(choice)
        return sum(t.at(removed) for t in self.terms)

    def damage_of(self, choice: Sequence[int]) -> float:
        """The predicted damage of a choice."""
        return sum(d[c] for d, c in zip(self.damage, choice, strict=True))

    def group_costs(self, choice: Sequence[int], g: int) -> np.ndarray:
        """The cost of group g's layers at each of its widths, every other group held at `choice`."""
        removed = self.removed(choice)
        costs = []
        for w in self.widths[g]:
            removed[g] = self.units[g] - w
            costs.append(sum(self.terms[t].at(removed) for t in self.touching[g]))
        return np.array(costs)


def allocate(
    curves: list[Curve],
    terms: list[Term],
    fraction: float,
    *,
    round_to: int | None = None,
    floor: float = FLOOR,
    options: int = MAX_OPTIONS,
) -> Allocation:
    """The widths of least predicted damage whose cost is at most `fraction` of the dense model's, each group choosing
    from `options` widths at most; BudgetError where even every group at its floor costs more."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the budget is the fraction of the cost to keep, in (0, 1], got {fraction}")
    choices = [widths(c, round_to, floor, options) for c in curves]
    problem = _Problem(
        choices,
        [[c.at(w) for w in ws] for c, ws in zip(curves, choices, strict=True)],
        terms,
        [[t for t, term in enumerate(terms) if g in term.out.taken or g in term.inp.taken] for g in range(len(curves))],
        [c.units for c in curves],
    )
    dense = [len(ws) - 1 for ws in choices]
    dense_cost = problem.cost(dense)
    budget = fraction * dense_cost
    cheapest = _cheapest(problem)
    least = problem.cost(cheapest)
    if least > budget:
        floors = "round_to and " * bool(round_to) + f"{floor:.0%} of its width"
        raise BudgetError(
            f"{fraction:.4g} of the cost cannot be reached with every group keeping its floor ({floors}): the least "
            f"reachable is {least / dense_cost:.4f}",
            least / dense_cost,
        )
    best: list[int] | None = None
    held, seen = dense, set[tuple[int, ...]]()
    for _ in range(ROUNDS):
        solved = _knapsack(problem, held, budget) or cheapest
        choice = _repaired(problem, solved, cheapest, budget)
        if best is None or problem.damage_of(choice) < problem.damage_of(best):
            best = choice
        if tuple(solved) in seen:
            break
        seen.add(tuple(solved))
        held = solved
    assert best is not None
    kept = [ws[c] for ws, c in zip(choices, best, strict=True)]
    return Allocation(kept, problem.cost(best), dense_cost, problem.damage_of(best))


def _cheapest(problem: _Problem) -> list[int]:
    """A choice of least cost, as far as moving one group at a time finds: from every group at its narrowest, each
    takes its cheapest width with the others held, until none moves. Not always the narrowest: a latency table's
    count can run faster than a smaller one (onnxruntime, batch 64: a 3x3 conv to 16 channels 1.9 ms, to 8 2.8 ms)."""
    choice = [0] * len(problem.widths)
    for _ in range(ROUNDS):
        moved = False
        for g in range(len(choice)):
            best = int(np.argmin(problem.group_costs(choice, g)))  # the narrowest of equal costs
            moved |= best != choice[g]
            choice[g] = best
        if not moved:
            break
    return choice


def _knapsack(problem: _Problem, held: list[int], budget: float) -> list[int] | None:
    """The choice of least damage whose cost, linearised at `held` (each group's layers with the others held), fits
    the budget: the Pareto front of (cost, damage) over the groups so far, extended one group at a time. None where
    nothing fits the linearised cost."""
    costs = [problem.group_costs(held, g) for g in range(len(held))]
    held_costs = [c[h] for c, h in zip(costs, held, strict=True)]
    # The budget left for the sum of the groups' costs over their cheapest widths (so no step is negative).
    room = budget - (problem.cost(held) - sum(held_costs)) - sum(float(c.min()) for c in costs)
    slack = 1e-9 * max(abs(budget), 1.0)
    front_cost, front_damage = np.zeros(1), np.zeros(1)
    parents: list[np.ndarray] = []
    for cost, damage in zip(costs, problem.damage, strict=True):
        step = cost - cost.min()
        total_cost = (front_cost[:, None] + step[None, :]).ravel()
        total_damage = (front_damage[:, None] + np.asarray(damage)[None, :]).ravel()
        index = np.nonzero(total_cost <= room + slack)[0]
        order = np.lexsort((total_damage[index], total_cost[index]))  # by cost, then damage
        index = index[order]
        index = index[_pareto(total_damage[index])]
        if len(index) > MAX_STATES:
            cells = np.floor(total_cost[index] / (max(room, slack) / MAX_STATES))
            last = np.append(cells[1:] != cells[:-1], True)  # the least damage of each cost cell: its last point
            index = index[last]
        parents.append(index)
        front_cost, front_damage = total_cost[index], total_damage[index]
    if len(front_damage) == 0:
        return None
    choice, point = [], int(np.argmin(front_damage))
    for g in range(len(costs) - 1, -1, -1):
        flat = int(parents[g][point])
        point, option = divmod(flat, len(costs[g]))
        choice.append(option)
    return choice[::-1]


def _pareto(damage: np.ndarray) -> np.ndarray:
    """Of points sorted by cost (then damage), those with less damage than every cheaper one."""
    if len(damage) == 0:
        return np.zeros(0, dtype=bool)
    best_before = np.minimum.accumulate(damage)
    return np.concatenate([[True], damage[1:] < best_before[:-1]])


def _repaired(problem: _Problem, choice: list[int], cheapest: list[int], budget: float) -> list[int]:
    """The choice within the budget at its true cost: while it costs too much, the move of one group to another width
    that adds the least damage per cost saved (`cheapest`, which fits, where no move saves); then, while a move that
    removes damage fits, the one removing the most per cost added."""
    choice = list(choice)
    cost = problem.cost(choice)
    while cost > budget:
        saving = [(added / -change, g, c, change) for g, c, change, added in _moves(problem, choice) if change < 0]
        if not saving:
            return list(cheapest)
        _, g, c, change = min(saving)
        choice[g], cost = c, cost + change
    while True:
        fits = [
            (added / change if change > 0 else -math.inf, added, g, c, change)
            for g, c, change, added in _moves(problem, choice)
            if added < 0 and cost + change <= budget
        ]
        if not fits:
            return choice
        *_, g, c, change = min(fits)
        choice[g], cost = c, cost + change


def _moves(problem: _Problem, choice: list[int]) -> Iterator[tuple[int, int, float, float]]:
    """Every move of one group to another of its widths: (group, width index, change of cost, damage added)."""
    for g, current in enumerate(choice):
        costs = problem.group_costs(choice, g)
        for c in range(len(costs)):
            if c != current:
                yield g, c, float(costs[c] - costs[current]), problem.damage[g][c] - problem.damage[g][current]
