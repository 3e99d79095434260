"""CHIP on any CNN: Torch-Pruning's dependency graph finds the coupled channels, CHIP says which to remove.

Torch-Pruning (DepGraph, Fang et al. 2023) traces the model and splits its channels into groups that must be pruned
together: a conv's filters with its BatchNorm and the inputs of every layer that reads them, all the layers added
together through residual shortcuts, the slices of a concatenation, a depthwise conv tied to its producer. It also
does the physical surgery. chipprune supplies the importance of every channel of every group:

- Scores are taken on the *input* of every consumer layer (a conv or linear layer whose input channels a group
  prunes): the map the layer reads, after its producer's norm and activation where there are ones, and each call
  site's own map (a ReLU module reused three times feeds three different consumers).
- Group rule: each consumer map of a group contributes its per-channel CI divided by its own mean CI (over all its
  channels: a map after a concatenation also holds other groups' channels), mapped to the group's channels through
  Torch-Pruning's root indices (concatenations, flattening); the importance of a group channel is the mean of the
  contributions mapped to it. Within a group this orders the channels as their sum does; the mean puts every group
  on one scale (mean about 1), which `scope="global"` ranks together. A map read by several layers counts once.
- Fallbacks, each with a warning naming the groups: a group whose only consumers read 2-D maps (a Linear after
  global pooling or flattening) is scored on those (one position per image: a magnitude ranking); a group with no
  observed consumer is scored by the L1 norm of its producers' filters.
- Weight criteria (l1, random) score the filters of each group's producers (conv or linear layers whose outputs the
  group prunes), combined by the same rule.

The layers that produce the model's outputs keep their channels (the classifier keeps its classes), as do
`ignored_layers`. A FLOP is a multiply-accumulate of a conv or linear layer (chipprune.profile.count_macs), counted on
one forward pass of `example_inputs`."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import linecache
import math
import sys
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import numpy as np
import torch
import torch_pruning as tp
from torch import Tensor, nn
from tqdm import tqdm

from ..calibrate import Tap, score_maps
from ..criteria import L1, ActivationCriterion, Criterion, WeightCriterion, get_criterion
from ..models import PRUNERS, traceable
from . import _tracing as tracing
from . import allocation, latency
from ._coupling import LAYERS, Cost, Group, Space, costs, couple, macs_after, removable, removal, remove
from ._torch_pruning import require_tested
from .latency import Report, Runner

SCOPES = ("local", "global")
Measure = Callable[[Cost], Callable[[int, int], float]]  # a layer -> its cost at (output, input) channel counts
FLOPS_TOLERANCE = 0.02  # flops_target is reached within this fraction of itself
LATENCY_OPTIONS = 16  # widths a group chooses from in a latency allocation: each is a table entry per layer it feeds


@dataclass
class Analysis:
    """A model's graph and trace, its prunable groups, their importance, and its layers' costs."""

    graph: tp.DependencyGraph
    record: tracing.Record
    shuffles: list[tracing.Shuffle]
    names: dict[nn.Module, str]
    groups: list[Group]
    importance: dict[str, Tensor]
    costs: list[Cost]
    macs: int  # all of the model's multiply-accumulates
    fixed: int  # those of the layers outside the graph


def prune_model(
    model: nn.Module,
    example_inputs: Tensor,
    calibration: Iterable[Any],
    *,
    pruning_ratio: float | dict[str, float] | None = None,
    flops_target: float | None = None,
    criterion: str | Criterion = "chip",
    scope: str = "local",
    ignored_layers: Iterable[nn.Module | str] = (),
    round_to: int | None = None,
    importance: dict[str, Tensor] | None = None,
    latency_target: float | None = None,
    runtime: Runner | None = None,
) -> nn.Module:
    """A physically pruned copy of `model` (which is left as it is), its channels ranked by `criterion`.

    calibration: batches of inputs, or (inputs, targets) pairs. Give exactly one of pruning_ratio (the fraction of
    channels removed from every group, or a dict from module name to the ratio of the groups holding it) and
    flops_target (the fraction of the FLOPs to keep, reached within 2 % where the groups allow it). scope "global"
    ranks all groups' channels together. round_to: keep channel counts at multiples of it. importance: from
    group_importance on this model (calibration is then not read), to prune one model several ways from one scoring
    pass. latency_target (instead of the other two budgets): the fraction of the dense model's latency on `runtime`
    (a latency.Runner; eager PyTorch on the CPU by default) to keep, as prune_to_latency."""
    if latency_target is not None:
        if pruning_ratio is not None or flops_target is not None or scope != "local" or round_to is not None:
            raise ValueError("latency_target goes alone: no pruning_ratio, flops_target, global scope or round_to")
        return prune_to_latency(
            model, example_inputs, calibration, latency_target, runtime or Runner(),
            criterion=criterion, ignored_layers=ignored_layers, importance=importance,
        )[0]  # fmt: skip
    _check(pruning_ratio, flops_target, scope, round_to)
    names = {m: n for n, m in model.named_modules()}
    unknown = sorted(set(pruning_ratio) - set(names.values())) if isinstance(pruning_ratio, dict) else []
    if unknown:
        raise ValueError(f"pruning_ratio: no module named {', '.join(unknown)} in the model")
    analysis = analyse(model, example_inputs, calibration, criterion, ignored_layers, names, importance)
    order = [ranking(analysis.importance[g.root], g) for g in analysis.groups]
    least = [len(g.units) - removable(g, units) for g, (units, _) in zip(analysis.groups, order, strict=True)]
    _warn_narrow(analysis.groups, round_to)

    def cut(ratio: float | list[float]) -> dict[Space, list[int]]:
        return removal(analysis.groups, _choose(analysis.groups, order, least, ratio, scope == "global", round_to))

    if flops_target is None:
        assert pruning_ratio is not None
        ratios = (
            [_ratio_of(g, analysis, pruning_ratio) for g in analysis.groups]
            if isinstance(pruning_ratio, dict)
            else pruning_ratio
        )
        return checked_prune(model, example_inputs, analysis, cut(ratios))
    return checked_prune(model, example_inputs, analysis, _search(analysis, cut, flops_target, scope == "global"))


def prune_to_latency(
    model: nn.Module,
    example_inputs: Tensor,
    calibration: Iterable[Any],
    latency_target: float,
    runner: Runner,
    *,
    criterion: str | Criterion = "chip",
    ignored_layers: Iterable[nn.Module | str] = (),
    importance: dict[str, Tensor] | None = None,
    curves: Mapping[str, allocation.Curve] | None = None,
    cache: str | None = None,
    progress: bool = False,
) -> tuple[nn.Module, Report]:
    """A pruned copy of `model` that runs in at most `latency_target` × the dense model's time as `runner` measures
    it (chipprune.pruning.latency), and how it went. `curves`: each group's sensitivity curve, by its root layer's
    name (sensitivity.sensitivity_curves): the widths are then those of least predicted damage for the table's time
    (allocation.allocate), not one fraction for all. `cache`: the folder of the latency tables (default
    CHIP_CACHE_DIR); `progress`: a bar while the table's entries are measured, and a line per whole-model check, on
    stderr."""
    if not 0 < latency_target <= 1:
        raise ValueError(f"latency_target is the fraction of the latency to keep, in (0, 1], got {latency_target}")
    names = {m: n for n, m in model.named_modules()}
    analysis = analyse(model, example_inputs, calibration, criterion, ignored_layers, names, importance)
    orders = [ranking(analysis.importance[g.root], g)[0] for g in analysis.groups]
    sample = tuple(example_inputs.shape[1:])
    shapes = _input_shapes(model, example_inputs)
    layers = {c.out: latency.describe(c.out.node.module, shapes[c.out.node.module]) for c in analysis.costs}
    table = latency.Table.cached(runner, cache)
    table.recheck([(layers[c.out], c.in_channels, c.out_channels) for c in analysis.costs])
    dense = runner.time(model, sample)
    choice = latency.Choice.start(analysis.groups, analysis.costs, layers, table, orders, dense.median_ms)
    if curves is None:
        plan = functools.partial(_uniform_plan, choice)
    else:
        terms = cost_terms(analysis, orders, lambda c: lambda out, inp: table.ms(layers[c.out], inp, out))
        chosen = _curves_of(analysis, curves)
        plan = functools.partial(_allocated_plan, analysis, orders, chosen, terms, dense.median_ms)
    # The search is on the aim, in the table's predicted milliseconds, measured: the target first, then the aim that a
    # line through the measured ratios against the predicted ones puts at the band's middle (a line, not the last
    # two points: a 20 ms model timed on 2 shared cores varied by 10 % from one check to the next).
    middle = (1 + latency.BAND) / 2 * latency_target
    aim = latency_target * dense.median_ms
    check = dataclasses.replace(runner, repeats=latency.CHECKS * runner.repeats)
    tried, seen = list[latency.Trial](), set[tuple[int, ...]]()
    for _ in range(latency.ROUNDS):
        planned = plan(aim, progress and not tried)
        if planned.widths in seen:
            break  # the correction led back to a choice already measured
        seen.add(planned.widths)
        pruned = checked_prune(model, example_inputs, analysis, planned.cut)
        base, measured = check.times([model, pruned], sample)
        trial = latency.Trial(measured.median_ms / base.median_ms, base, measured, planned.predicted_ms, pruned)
        tried.append(trial)
        if progress:
            tqdm.write(
                f"round {len(tried)}: {trial.ratio:.3f}x the dense latency measured, "
                f"{trial.predicted_ms / dense.median_ms:.3f}x predicted ({latency_target} asked)",
                file=sys.stderr,
            )
        if latency.BAND * latency_target <= trial.ratio <= latency_target:
            break
        if trial.ratio > latency_target and planned.at_floor:
            break  # no group can give more
        aim = latency.next_aim(tried, dense.median_ms, middle)
    met = [t for t in tried if t.ratio <= latency_target]
    if not met:
        met = [_floor_trial(model, example_inputs, analysis, choice, check, latency_target, tried)]
    best = max(met, key=lambda t: t.ratio)
    table.save()
    report = latency.Report(
        best.dense, best.pruned, best.predicted_ms, latency_target * best.dense.median_ms, len(tried), table.measured
    )
    return best.model.train(model.training), report


class _Plan(NamedTuple):
    """A round's choice: the channels removed, the table's prediction, the units each group keeps (to know the
    choice again), and whether every group is at its floor."""

    cut: dict[Space, list[int]]
    predicted_ms: float
    widths: tuple[int, ...]
    at_floor: bool


def _uniform_plan(choice: latency.Choice, aim_ms: float, progress: bool) -> _Plan:
    """Every group gives up the same fraction, the least predicted at `aim_ms`, then takes back what fits."""
    fraction = latency.fraction_for(choice, aim_ms, progress)
    latency.choose(choice, fraction, aim_ms)
    kept = tuple(len(order) - n for order, n in zip(choice.orders, choice.removed, strict=True))
    return _Plan(choice.cut(), choice.predict(), kept, fraction >= 1)


def _allocated_plan(
    analysis: Analysis, orders: list[list[int]], curves: list[allocation.Curve], terms: list[allocation.Term],
    dense_ms: float, aim_ms: float, progress: bool,
) -> _Plan:  # fmt: skip
    """The widths of least predicted damage whose table time, scaled to the dense model's measured time, is at most
    `aim_ms`; every group at its floor where even that predicts more. The table's entries are measured as the
    allocation asks for them (LATENCY_OPTIONS widths a group: a bar would not know its total)."""
    fraction, at_floor = min(1.0, aim_ms / dense_ms), False
    try:
        chosen = allocation.allocate(curves, terms, fraction, floor=latency.FLOOR, options=LATENCY_OPTIONS)
    except allocation.BudgetError as e:
        # The floor's own cost, a hair above it for the rounding of fraction x dense cost.
        fraction, at_floor = min(1.0, e.reachable * (1 + 1e-9)), True
        chosen = allocation.allocate(curves, terms, fraction, floor=latency.FLOOR, options=LATENCY_OPTIONS)
    cut = removal(analysis.groups, [order[: len(order) - k] for order, k in zip(orders, chosen.kept, strict=True)])
    return _Plan(cut, chosen.fraction * dense_ms, tuple(chosen.kept), at_floor)


def _curves_of(analysis: Analysis, curves: Mapping[str, allocation.Curve]) -> list[allocation.Curve]:
    """The curve of each of the analysis's groups; ValueError where one is missing or is of another width."""
    found = []
    for g in analysis.groups:
        curve = curves.get(g.root)
        if curve is None or curve.units != len(g.units):
            what = "no curve" if curve is None else f"a curve of {curve.units} units, not {len(g.units)}"
            raise ValueError(f"curves: {what} for the group of {g.root}: curves of another model")
        found.append(curve)
    return found


def _floor_trial(
    model: nn.Module, example_inputs: Tensor, analysis: Analysis, choice: latency.Choice, check: Runner,
    latency_target: float, tried: list[latency.Trial],
) -> latency.Trial:  # fmt: skip
    """The model with every group at its floor, measured, where it meets the target the search missed; else a
    ValueError naming the fastest ratio measured, the least that can be asked for."""
    latency.choose(choice, 1.0, 0.0)  # every group at the floor, less what costs no time
    pruned = checked_prune(model, example_inputs, analysis, choice.cut())
    base, measured = check.times([model, pruned], tuple(example_inputs.shape[1:]))
    floor = latency.Trial(measured.median_ms / base.median_ms, base, measured, choice.predict(), pruned)
    if floor.ratio <= latency_target:
        return floor
    # The floor is not always the fastest: a pruned ShuffleNetV2 ran 1.48x the dense time in eager PyTorch.
    fastest = min([floor, *tried], key=lambda t: t.ratio)
    measured_text = (
        f"measured {fastest.ratio:.3f} x the dense model's latency ({fastest.pruned.median_ms:.3f} ms against "
        f"{fastest.dense.median_ms:.3f} ms)"
    )
    if fastest.ratio >= 1:
        raise ValueError(
            f"latency target {latency_target:g}: pruning does not make this model faster on this runtime: the fastest "
            f"model that keeps {latency.FLOOR:.0%} of every layer's channels {measured_text}"
        )
    raise ValueError(
        f"latency target {latency_target:g}: the fastest model that keeps {latency.FLOOR:.0%} of every layer's "
        f"channels {measured_text}; ask for {math.ceil(100 * fastest.ratio) / 100:.2f} or more"
    )


@torch.no_grad()
def _input_shapes(model: nn.Module, example_inputs: Tensor) -> dict[nn.Module, tuple[int, ...]]:
    """The shape (less the batch) of the first input of each conv and linear layer in one eval-mode pass."""
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        shapes.setdefault(module, tuple(inputs[0].shape[1:]))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, LAYERS)]
    training = model.training
    try:
        model.eval()(example_inputs)
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return shapes


def group_importance(
    model: nn.Module,
    example_inputs: Tensor,
    calibration: Iterable[Any],
    *,
    criterion: str | Criterion = "chip",
    ignored_layers: Iterable[nn.Module | str] = (),
) -> dict[str, Tensor]:
    """The importance of the channels of every prunable group, keyed by the name of the group's root layer: one
    value per channel class of the group, the root's channels first (for most groups, one per root channel)."""
    names = {m: n for n, m in model.named_modules()}
    return analyse(model, example_inputs, calibration, criterion, ignored_layers, names).importance


def analyse(
    model: nn.Module,
    example_inputs: Tensor,
    calibration: Iterable[Any],
    criterion: str | Criterion,
    ignored_layers: Iterable[nn.Module | str],
    names: dict[nn.Module, str],
    importance: dict[str, Tensor] | None = None,
) -> Analysis:
    """Groups and their importances (measured unless given); the given ignored layers and the output layers keep
    their outputs."""
    chosen = get_criterion(criterion) if isinstance(criterion, str) else criterion
    if not isinstance(chosen, ActivationCriterion | WeightCriterion):
        raise ValueError(f"criterion must be a name or have batch_sum or weight_scores, got {criterion!r}")
    ignored = {names.get(m, "?") if isinstance(m, nn.Module) else m for m in ignored_layers}
    unknown = sorted(ignored - set(names.values()))
    if unknown:
        raise ValueError(f"ignored_layers: no module named {', '.join(unknown)} in the model")
    require_tested()
    training = model.training
    try:
        analysis = _structure(model, example_inputs, ignored, names)
        sizes = {g.root: len(g.classes) for g in analysis.groups}
        if importance is not None and {k: len(v) for k, v in importance.items()} != sizes:
            raise ValueError("importance: not from group_importance on this model with these ignored_layers")
        if importance is None:  # else prune_model runs the pruned model before returning it
            _probe(model, example_inputs, analysis)
        analysis.importance = importance or _importances(model, analysis, chosen, calibration)
        return analysis
    finally:
        model.train(training)


def _structure(model: nn.Module, example_inputs: Tensor, ignored: set[str], names: dict[nn.Module, str]) -> Analysis:
    """The model's graph, trace, groups and costs (no importance yet); `ignored` and the output layers keep their
    outputs."""
    graph, record, shuffles = _graph(model, example_inputs)
    ignored = ignored | {names[m] for m in _output_layers(graph)}
    kept = {sub for n in ignored for sub in model.get_submodule(n).modules()}
    macs = record.macs
    layers = costs(graph, macs)
    fixed = sum(macs.values()) - sum(macs[c.out.node.module] for c in layers)
    return Analysis(graph, record, shuffles, names, couple(graph, names, kept), {}, layers, sum(macs.values()), fixed)


class Channel(NamedTuple):
    """One layer's entry of a channel: its module, "in" or "out" (the side of it the channel is on), its position."""

    module: str
    side: str
    position: int


def channel_classes(model: nn.Module, example_inputs: Tensor) -> dict[str, list[list[Channel]]]:
    """Per prunable group (keyed by its root layer, as group_importance), its channel classes in the order of the
    importances: the entries of the model's modules that removing the class removes."""
    names = {m: n for n, m in model.named_modules()}
    require_tested()
    training = model.training
    try:
        analysis = _structure(model, example_inputs, set(), names)
    finally:
        model.train(training)
    graph = analysis.graph
    return {
        g.root: [
            [
                Channel(names[s.node.module], "out" if graph.is_out_channel_pruning_fn(s.fn) else "in", i)
                for s, i in cls
                if s.node.module in names
            ]
            for cls in g.classes
        ]
        for g in analysis.groups
    }


def _probe(model: nn.Module, example_inputs: Tensor, analysis: Analysis) -> None:
    """ValueError, before any scoring, where removing channels breaks the model: one unit of every group is removed
    and the example run; the message names the module and the call that failed, and the groups whose removal
    breaks it (found by halving), to pass as ignored_layers."""

    def failure(chosen: list[int]) -> str | None:
        units = [[len(g.units) - 1] if i in chosen and len(g.units) > 1 else [] for i, g in enumerate(analysis.groups)]
        cut = removal(analysis.groups, units)
        # Shapes first, on a copy without data: copying regnet_y_128gf's 2.6 GB took 7 of its 83 s, and the halving
        # below copies once per step. Only a failure there is run for real (meta tensors check no index's range).
        if _failure(_pruned(model, analysis, cut, on_meta=True), example_inputs.to("meta")) is None:
            return None
        return _failure(_pruned(model, analysis, cut), example_inputs)

    every = list(range(len(analysis.groups)))
    message = failure(every)
    if message is not None:
        roots = [analysis.groups[i].root for i in _culprits(every, failure)]
        shown = ", ".join(repr(r) for r in roots[:4]) + (f", ... ({len(roots)} groups)" if len(roots) > 4 else "")
        raise ValueError(f"{message}; ignored_layers=[{shown}] keeps the channels that break it")


def _culprits(chosen: list[int], failure: Callable[[list[int]], str | None]) -> list[int]:
    """The groups of `chosen` (which fails) whose removal fails, by halving; a half that fails only with the other
    half counts whole."""
    if len(chosen) == 1:
        return chosen
    halves = [chosen[: len(chosen) // 2], chosen[len(chosen) // 2 :]]
    failing = [h for h in halves if failure(h) is not None]
    return [g for h in failing for g in _culprits(h, failure)] if failing else chosen


def _failure(pruned: nn.Module, example_inputs: Tensor) -> str | None:
    """None if the pruned model runs the example in eval mode; else which module and call failed, and how."""
    training = pruned.training
    try:
        with torch.no_grad():
            pruned.eval()(example_inputs)
    except (RuntimeError, ValueError, IndexError, AssertionError) as e:
        return _describe(e, pruned)
    finally:
        pruned.train(training)
    return None


def _describe(error: Exception, model: nn.Module) -> str:
    """One line: the innermost module of `model` whose forward raised `error`, its source line, and the error."""
    names = {m: n for n, m in model.named_modules()}
    where = "the model"
    for frame, line in traceback.walk_tb(error.__traceback__):
        module = frame.f_locals.get("self")
        if isinstance(module, nn.Module) and module in names:
            code = linecache.getline(frame.f_code.co_filename, line).strip()
            where = f"{names[module] or 'the model'} ({type(module).__name__}): `{code}`"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"removing channels breaks {where}: {type(error).__name__}: {first}"


def _check(
    pruning_ratio: float | dict[str, float] | None, flops_target: float | None, scope: str, round_to: int | None
) -> None:
    """ValueError for a request that makes no sense."""
    if (pruning_ratio is None) == (flops_target is None):
        raise ValueError("give exactly one of pruning_ratio and flops_target")
    ratios = pruning_ratio.values() if isinstance(pruning_ratio, dict) else [pruning_ratio]
    if pruning_ratio is not None and not all(isinstance(r, float | int) and 0 <= r < 1 for r in ratios):
        raise ValueError(f"pruning ratios must lie in [0, 1), got {pruning_ratio}")
    if flops_target is not None and not 0 < flops_target <= 1:
        raise ValueError(f"flops_target is the fraction of the FLOPs to keep, in (0, 1], got {flops_target}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if round_to is not None and round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to}")


def _graph(
    model: nn.Module, example_inputs: Tensor
) -> tuple[tp.DependencyGraph, tracing.Record, list[tracing.Shuffle]]:
    """The dependency graph of `model` (left in eval mode), its trace, and its channel shuffles, with indices mapped
    from the trace through concatenations, splits and reshapes of the channels."""
    record = tracing.Record()

    def forward(m: nn.Module, x: Tensor) -> Any:
        with tracing.recording(m, record):
            return m(x)

    graph = tp.DependencyGraph()
    # Its last step, index mapping, can fail on sizes it inferred (shufflenet: ZeroDivisionError): redone below.
    with traceable(model), torch.enable_grad(), contextlib.suppress(TypeError, ZeroDivisionError):
        graph.build_dependency(model, example_inputs, forward_fn=forward, customized_pruners=PRUNERS, verbose=False)
    tracing.map_indices(graph, record)
    return graph, record, tracing.reshapes(graph, record)


def _output_layers(graph: tp.DependencyGraph) -> set[nn.Module]:
    """The conv and linear layers nearest the model's outputs, through any other operation: they keep their outputs."""
    stack = [node for node in graph.module2node.values() if not node.outputs]  # what the outputs come from
    seen, found = set(stack), set[nn.Module]()
    while stack:
        node = stack.pop()
        if isinstance(node.module, LAYERS):
            found.add(node.module)
            continue
        stack += [n for n in node.inputs if n not in seen]
        seen.update(node.inputs)
    return found


Member = tuple[nn.Module, list[int], list[int]]  # a layer of a group, its channel indices, their class positions


def _members(graph: tp.DependencyGraph, group: Group, inputs: bool) -> list[Member]:
    """The conv/linear layers whose input (or output) channels the group holds, with their indices and classes."""
    is_side = graph.is_in_channel_pruning_fn if inputs else graph.is_out_channel_pruning_fn
    found: dict[nn.Module, tuple[list[int], list[int]]] = {}
    for position, cls in enumerate(group.classes):
        for space, i in cls:
            if isinstance(space.node.module, LAYERS) and is_side(space.fn):
                idxs, positions = found.setdefault(space.node.module, ([], []))
                idxs.append(i)
                positions.append(position)
    return [(m, idxs, positions) for m, (idxs, positions) in found.items()]


def _importances(
    model: nn.Module, analysis: Analysis, chosen: Criterion, calibration: Iterable[Any]
) -> dict[str, Tensor]:
    """The importance of every group's channel classes, keyed by the name of the group's root layer."""
    graph, names, groups = analysis.graph, analysis.names, analysis.groups
    producers = [_members(graph, group, inputs=False) for group in groups]
    if not isinstance(chosen, ActivationCriterion):
        return {
            g.root: _combine([(_filter_scores(chosen, m), i, r) for m, i, r in made], len(g.classes))
            for g, made in zip(groups, producers, strict=True)
        }
    consumers = [_members(graph, group, inputs=True) for group in groups]
    taps = {
        names[m]: Tap(names[m], "input", graph.get_in_channels(m), -1 if isinstance(m, nn.Linear) else 1)
        for members in consumers
        for m, _, _ in members
    }
    inputs = (batch[0] if isinstance(batch, tuple | list) else batch for batch in calibration)
    device = next(model.parameters()).device
    scores, _, same = score_maps(model, taps, chosen, inputs, device=device)
    importance, flat, unseen = {}, [], []
    for group, made, read in zip(groups, producers, consumers, strict=True):
        read = [(m, i, r) for m, i, r in read if names[m] not in same]  # a map read by several layers counts once
        spatial = [(m, i, r) for m, i, r in read if analysis.record.input_dims.get(names[m], 4) > 2]
        if spatial or read:
            flat += [] if spatial else [group.root]
            importance[group.root] = _combine(
                [(scores[names[m]], i, r) for m, i, r in spatial or read], len(group.classes)
            )
        else:
            unseen.append(group.root)
            importance[group.root] = _combine([(_filter_scores(L1(), m), i, r) for m, i, r in made], len(group.classes))
    if flat:
        warnings.warn(
            f"{chosen.name}: no spatial feature map reads the channels of the groups rooted at "
            f"{', '.join(flat)}; scored on the 2-D input of the linear layers reading them (one position "
            "per image: a magnitude ranking)",
            stacklevel=4,
        )
    if unseen:
        warnings.warn(
            f"{chosen.name}: no layer's input was observed holding the channels of the groups rooted at "
            f"{', '.join(unseen)}; scored by the L1 norm of their filters",
            stacklevel=4,
        )
    return importance


def _filter_scores(chosen: WeightCriterion, layer: nn.Module) -> Tensor:
    """A weight criterion's scores of a conv's filters; the L1 norms of a linear layer's rows."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        return chosen.weight_scores(cast(nn.Conv2d, layer))
    return L1().weight_scores(cast(nn.Conv2d, layer))  # only its weight is read


def _combine(members: list[tuple[Tensor, list[int], list[int]]], channels: int) -> Tensor:
    """Per group channel, the mean over its members' entries of score / that member's mean score (0 if all 0)."""
    total = torch.zeros(channels, dtype=torch.float64)
    count = torch.zeros(channels, dtype=torch.float64)
    for score, idxs, root_idxs in members:
        score = score.double().cpu()
        mean = score.mean()
        normalized = score[idxs] / mean if mean > 0 else torch.zeros(len(idxs), dtype=torch.float64)
        total.index_add_(0, torch.tensor(root_idxs), normalized)
        count.index_add_(0, torch.tensor(root_idxs), torch.ones(len(idxs), dtype=torch.float64))
    return total / count.clamp_min(1)


def ranking(importance: Tensor, group: Group) -> tuple[list[int], list[float]]:
    """The group's units by rising importance (the mean of their classes'), ties by position."""
    scores = [float(importance[unit].mean()) for unit in group.units]
    order = sorted(range(len(scores)), key=lambda u: (scores[u], u))
    return order, [scores[u] for u in order]


def _ratio_of(group: Group, analysis: Analysis, ratios: dict[str, float]) -> float:
    """The ratio a dict gives the group: that of a module (or one holding it) whose outputs the group holds."""
    graph = analysis.graph
    held = {
        analysis.names[s.node.module]
        for cls in group.classes
        for s, _ in cls
        if s.node.module in analysis.names and graph.is_out_channel_pruning_fn(s.fn)
    }
    for key, ratio in ratios.items():
        if any(n == key or n.startswith(key + ".") for n in held):
            return ratio
    return 0.0


def _kept(units: int, kept: int, least: int, round_to: int | None) -> int:
    """At least `least` units; with round_to, a multiple of it, at least round_to: a group narrower than round_to keeps
    all its units (no smaller count of it is a multiple), as --sparsity's widths do."""
    kept = max(kept, least)
    if round_to:
        kept = max(round_to, kept - kept % round_to, -(-least // round_to) * round_to)
    return min(kept, units)


def _warn_narrow(groups: list[Group], round_to: int | None) -> None:
    """Name the groups that round_to leaves whole, being narrower than it."""
    narrow = [g.root for g in groups if round_to and 0 < len(g.units) < round_to]
    if narrow:
        shown = ", ".join(narrow[:4]) + (f", ... ({len(narrow)} groups)" if len(narrow) > 4 else "")
        warnings.warn(f"round_to {round_to}: groups of fewer units keep them all: {shown}", stacklevel=3)


def _choose(
    groups: list[Group],
    order: list[tuple[list[int], list[float]]],
    least: list[int],
    ratio: float | list[float],
    global_scope: bool,
    round_to: int | None,
) -> list[list[int]]:
    """The units each group loses: per group, the fraction `ratio` of its units (a list: one ratio per group), or
    with global scope the fraction `ratio` of all groups' units, the least important across groups; each group keeps
    at least its `least` units (every layer one channel: coupling.removable)."""
    sizes = [len(g.units) for g in groups]
    if not global_scope:
        ratios = ratio if isinstance(ratio, list) else [ratio] * len(groups)
        keep = [_kept(n, int(n * (1 - r)), low, round_to) for n, r, low in zip(sizes, ratios, least, strict=True)]
    else:
        assert isinstance(ratio, float | int)
        total = sum(sizes)
        pooled = sorted((score, g, k) for g, (_, scores) in enumerate(order) for k, score in enumerate(scores))
        lost = [0] * len(groups)
        for _, g, _ in pooled[: total - int(total * (1 - ratio))]:
            lost[g] += 1
        keep = [_kept(n, n - lost_g, low, round_to) for n, lost_g, low in zip(sizes, lost, least, strict=True)]
    return [units[: n - k] for (units, _), n, k in zip(order, sizes, keep, strict=True)]


def _macs(analysis: Analysis, cut: dict[Space, list[int]]) -> int:
    """The model's multiply-accumulates without the channels `cut`."""
    return analysis.fixed + macs_after(analysis.costs, cut)


def _search(
    analysis: Analysis, cut: Callable[[float | list[float]], dict[Space, list[int]]], target: float, global_scope: bool
) -> dict[Space, list[int]]:
    """The channels to remove so that target × the model's FLOPs stay, within 2 %: bisecting on the ratio, then
    (local scope) moving groups one by one from the ratio just above the target to the one just below. Where the
    groups' steps allow no closer point, the closest point at or below the target, with a warning."""
    if 1 - target <= FLOPS_TOLERANCE * target:  # keeping everything is within the tolerance
        return {}

    def kept(c: dict[Space, list[int]]) -> float:
        return _macs(analysis, c) / analysis.macs

    lo, hi = 0.0, 1.0  # ratios keeping more / less than the target
    for _ in range(40):
        ratio = (lo + hi) / 2
        trial = cut(ratio)
        if abs(kept(trial) - target) <= FLOPS_TOLERANCE * target:
            return trial
        lo, hi = (ratio, hi) if kept(trial) > target else (lo, ratio)
    best = cut(hi)
    if not global_scope:
        n = len(analysis.groups)
        left, right = 0, n  # groups moved to `hi`: too few / enough to go below the target
        while right - left > 1:
            moved = (left + right) // 2
            trial = cut([hi] * moved + [lo] * (n - moved))
            if abs(kept(trial) - target) <= FLOPS_TOLERANCE * target:
                return trial
            left, right = (moved, right) if kept(trial) > target else (left, moved)
        best = cut([hi] * right + [lo] * (n - right))
    if kept(best) > target * (1 + FLOPS_TOLERANCE):
        raise ValueError(f"flops_target {target:.4f}: the prunable groups keep at least {kept(best):.4f} of the FLOPs")
    warnings.warn(
        f"flops_target {target:.4f}: the channel groups allow no point within 2 %; keeping "
        f"{kept(best):.4f} of the FLOPs, the closest below",
        stacklevel=3,
    )
    return best


def cost_terms(analysis: Analysis, orders: list[list[int]], measure: Measure) -> list[allocation.Term]:
    """The cost of every layer of the graph as a function of the units each group removes."""
    spaces = {s for c in analysis.costs for s in (c.out, c.inp)}
    taken: dict[Space, dict[int, list[int]]] = {}
    for g, (group, order) in enumerate(zip(analysis.groups, orders, strict=True)):
        per_unit = [Counter(s for p in group.units[u] for s, _ in group.classes[p] if s in spaces) for u in order]
        for space in set().union(*per_unit) if per_unit else ():
            taken.setdefault(space, {})[g] = [0, *np.cumsum([c[space] for c in per_unit]).tolist()]
    return [
        allocation.Term(
            allocation.Channels(c.out_channels, taken.get(c.out, {})),
            allocation.Channels(c.in_channels, taken.get(c.inp, {})),
            measure(c),
        )
        for c in analysis.costs
    ]


def _pruned(model: nn.Module, analysis: Analysis, cut: dict[Space, list[int]], on_meta: bool = False) -> nn.Module:
    """A copy of `model` without the channels `cut`, its calls that hold channel counts replaced; `on_meta`: its
    floating-point parameters and buffers on the meta device (shapes, no data; index maps stay as they are)."""
    memo: dict[int, Any] = {}
    if on_meta:
        for t in (t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()):
            empty = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    pruned = copy.deepcopy(model, memo)
    with traceable(pruned):
        remove(pruned, analysis.graph, analysis.names, cut)
    tracing.install(pruned, tracing.replacements(analysis.graph, analysis.record, analysis.shuffles, cut))
    return pruned.train(model.training)


def checked_prune(
    model: nn.Module, example_inputs: Tensor, analysis: Analysis, cut: dict[Space, list[int]]
) -> nn.Module:
    """The pruned model, once it has run the example (else ValueError saying where it broke)."""
    pruned = _pruned(model, analysis, cut)
    message = _failure(pruned, example_inputs)
    if message is not None:
        raise ValueError(message)
    return pruned
