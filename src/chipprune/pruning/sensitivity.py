"""Per-group budgets by measured sensitivity: how much the loss grows when one group alone is pruned, and the widths
that spend a budget (FLOPs, parameters, a latency table's time) where it hurts least.

- **Curves**: for each prunable group of the dependency graph (graph.py), the group alone is pruned to each of
  a few ratios (RATIOS) by the given importance (the criterion's scores, computed once for all groups: no second
  scoring), its BatchNorm statistics re-estimated on the sample's recalibration batches (as `chip prune
  --recalibrate-bn`), and the cross-entropy loss and top-1 measured on its held-out evaluation batches; the dense
  model is measured the same way. One pass over the groups. The curves are cached on disk (CHIP_CACHE_DIR/sensitivity,
  one JSON file per model, criterion, importance, sample, ratios and precision), written after each group, so a killed
  measurement goes on where it stopped; a damaged file is measured again, with a warning.
- **Allocation**: allocation.py chooses the widths of least predicted damage (the sum of each group's loss
  increment at its width) under the budget, each group keeping at least its floor (allocation.FLOOR of its width,
  round_to, and its narrowest measured width)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..calibrate import recalibrate_bn
from ..files.fileio import atomic_write, cache_root
from ..training.precision import FLOAT32, Precision
from . import allocation, graph
from ._coupling import Cost, removal
from .allocation import FLOOR, Allocation, Channels, Term
from .graph import Measure

RATIOS = (0.25, 0.5, 0.75, 0.9)  # fractions of a group's units removed, one measurement each
RECALIBRATION_IMAGES, EVALUATION_IMAGES = 256, 1024  # a sample's two parts (results/sensitivity)
SENSITIVITY_IMAGES = RECALIBRATION_IMAGES + EVALUATION_IMAGES
SIGNALS = ("loss", "top1")  # what the damage is: the loss increment, or the top-1 drop (points)
FORMAT = "chipprune-sensitivity/1"
Batch = tuple[Tensor, Tensor]


class Sample(NamedTuple):
    """The held-out images of a measurement: batches to re-estimate BatchNorm statistics on, and batches to measure
    the loss and top-1 on (inputs as the model takes them, integer class targets)."""

    recalibration: list[Batch]
    evaluation: list[Batch]


class Point(NamedTuple):
    """One measurement: the units a group keeps, the mean cross-entropy and the top-1 (%) on the evaluation batches."""

    kept: int
    loss: float
    top1: float


class GroupCurve(NamedTuple):
    """A group's measurements, by the root layer that names it: its units, and a point per measured width."""

    root: str
    units: int
    points: tuple[Point, ...]

    def curve(self, dense: Point, signal: str = "loss") -> allocation.Curve:
        """The damage at each width: the loss increment (or top-1 drop) over the dense model's."""
        if signal not in SIGNALS:
            raise ValueError(f"signal must be one of {', '.join(SIGNALS)}, got {signal!r}")
        damage = [p.loss - dense.loss if signal == "loss" else dense.top1 - p.top1 for p in self.points]
        return allocation.Curve((self.units, *(p.kept for p in self.points)), (0.0, *damage))


class Curves(NamedTuple):
    """Every group's curve and the dense model's point; the cache file, the points measured in this call (0: all
    read from the cache), and the seconds they took."""

    dense: Point
    groups: list[GroupCurve]
    path: Path
    measured: int
    seconds: float


class Pruned(NamedTuple):
    """A model pruned by prune_by_sensitivity, the widths chosen, and the curves they came from."""

    model: nn.Module
    allocation: Allocation
    curves: Curves


def split_sample(
    batches: Iterable[Batch], recalibration: int = RECALIBRATION_IMAGES, evaluation: int = EVALUATION_IMAGES
) -> Sample:
    """A Sample of the first `recalibration` images of `batches` and the `evaluation` after them (what
    results/sensitivity measured ResNet-56 with: 256 and 1,024 training images after the 640 scored)."""
    sizes, parts = [recalibration, evaluation], [list[Batch](), list[Batch]()]
    for x, y in batches:
        for i in (0, 1):
            take = min(len(x), sizes[i])
            if take:
                parts[i].append((x[:take], y[:take]))
                sizes[i] -= take
                x, y = x[take:], y[take:]
        if not any(sizes):
            break
    return Sample(*parts)


def measured_widths(units: int, ratios: Iterable[float] = RATIOS) -> list[int]:
    """The widths a group of `units` is measured at: each ratio's, rounded, at least 1, each once, widest first."""
    kept = {max(1, round((1 - r) * units)) for r in ratios}
    return sorted((k for k in kept if k < units), reverse=True)


def macs(layer: Cost) -> Callable[[int, int], float]:
    """A layer's multiply-accumulates at (output, input) channel counts, as chipprune.pruning._coupling counts them."""
    if layer.groups == 0:  # depthwise
        return lambda out, inp: float(layer.unit * out)
    return lambda out, inp: float(layer.unit * out * (inp // layer.groups))


def params(layer: Cost) -> Callable[[int, int], float]:
    """A layer's weights and bias at (output, input) channel counts."""
    module = layer.out.node.module
    bias = float(getattr(module, "bias", None) is not None)
    if layer.groups == 0:
        per = module.weight.numel() / layer.out_channels
        return lambda out, inp: (per + bias) * out
    per = module.weight.numel() / (layer.out_channels * (layer.in_channels // layer.groups))
    return lambda out, inp: (per * (inp // layer.groups) + bias) * out


MEASURES: dict[str, Measure] = {"macs": macs, "params": params}


def sensitivity_curves(
    model: nn.Module,
    example_inputs: Tensor,
    importance: dict[str, Tensor],
    sample: Sample,
    *,
    criterion: str = "chip",
    ratios: Iterable[float] = RATIOS,
    ignored_layers: Iterable[nn.Module | str] = (),
    precision: Precision = FLOAT32,
    model_id: str | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = False,
) -> Curves:
    """Each prunable group's loss and top-1 on `sample` when it alone is pruned to each of `ratios` by `importance`
    (from graph.group_importance with `criterion` and these ignored_layers). `model_id` names the model in the cache
    (the SHA-256 of its file; default: a digest of its class and tensors); `cache`: the folder (default
    CHIP_CACHE_DIR)."""
    analysis = _analysis(model, example_inputs, importance, criterion, ignored_layers)
    return _curves(
        model, example_inputs, analysis, sample, criterion, tuple(ratios), precision, model_id, cache, progress
    )


def prune_by_sensitivity(
    model: nn.Module,
    example_inputs: Tensor,
    importance: dict[str, Tensor],
    sample: Sample,
    fraction: float,
    *,
    measure: str | Measure = "macs",
    signal: str = "loss",
    round_to: int | None = None,
    floor: float = FLOOR,
    criterion: str = "chip",
    ratios: Iterable[float] = RATIOS,
    ignored_layers: Iterable[nn.Module | str] = (),
    precision: Precision = FLOAT32,
    model_id: str | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = False,
) -> Pruned:
    """A pruned copy of `model` keeping at most `fraction` of its cost (`measure`: "macs", "params", or a function
    of a layer giving its cost at (output, input) channel counts, such as a latency table's), its widths those of
    least predicted `signal` damage by the sensitivity curves (measured, or read from the cache, as
    sensitivity_curves); allocation.BudgetError where the floor keeps more."""
    cost = MEASURES[measure] if isinstance(measure, str) else measure
    analysis = _analysis(model, example_inputs, importance, criterion, ignored_layers)
    curves = _curves(
        model, example_inputs, analysis, sample, criterion, tuple(ratios), precision, model_id, cache, progress
    )
    orders = _orders(analysis)
    fixed = _fixed(model, analysis, cost)
    terms = graph.cost_terms(analysis, orders, cost) + [Term(Channels(0, {}), Channels(0, {}), lambda out, inp: fixed)]
    chosen = allocation.allocate(
        [c.curve(curves.dense, signal) for c in curves.groups], terms, fraction, round_to=round_to, floor=floor
    )
    cut = removal(analysis.groups, [order[: len(order) - k] for order, k in zip(orders, chosen.kept, strict=True)])
    return Pruned(graph.checked_prune(model, example_inputs, analysis, cut), chosen, curves)


def _analysis(
    model: nn.Module,
    example_inputs: Tensor,
    importance: dict[str, Tensor],
    criterion: str,
    ignored_layers: Iterable[nn.Module | str],
) -> graph.Analysis:
    """The model's groups and costs, with the importance given (no scoring)."""
    names = {m: n for n, m in model.named_modules()}
    return graph.analyse(model, example_inputs, (), criterion, ignored_layers, names, importance)


def _orders(analysis: graph.Analysis) -> list[list[int]]:
    """Each group's units, the least important first (the order pruning removes them in)."""
    return [graph.ranking(analysis.importance[g.root], g)[0] for g in analysis.groups]


def _fixed(model: nn.Module, analysis: graph.Analysis, measure: Measure) -> float:
    """The cost outside the graph's layers, which pruning does not change: the multiply-accumulates of layers that
    are not in the graph; the parameters of every other module (BatchNorm's counted whole, an upper bound)."""
    if measure is macs:
        return float(analysis.fixed)
    if measure is params:
        layers = sum(measure(c)(c.out_channels, c.in_channels) for c in analysis.costs)
        return float(sum(p.numel() for p in model.parameters())) - layers
    return 0.0


def _curves(
    model: nn.Module,
    example_inputs: Tensor,
    analysis: graph.Analysis,
    sample: Sample,
    criterion: str,
    ratios: tuple[float, ...],
    precision: Precision,
    model_id: str | None,
    cache: str | os.PathLike | None,
    progress: bool,
) -> Curves:
    """The curves of every group: those in the cache read, the others measured (and cached after each group)."""
    if not sample.evaluation or (_has_batchnorm(model) and not sample.recalibration):
        raise ValueError("sample: the sensitivity measurement needs evaluation and recalibration batches")
    if not all(0 < r < 1 for r in ratios):
        raise ValueError(f"ratios are fractions of a group's units to remove, in (0, 1), got {ratios}")
    groups = analysis.groups
    expected = {g.root: measured_widths(len(g.units), ratios) for g in groups}
    key = {
        "model": model_id or _digest(model),
        "criterion": criterion,
        "importance": _importance_digest(analysis.importance),
        "sample": _sample_digest(sample),
        "ratios": list(ratios),
        "precision": precision.describe(),
        "groups": [[g.root, len(g.units)] for g in groups],
    }
    name = f"{key['model'][:16]}-{criterion}-{_hash(json.dumps(key, sort_keys=True))[:16]}.json"
    path = cache_root(cache) / "sensitivity" / name
    dense, stored = _read(path, key, expected)
    orders = _orders(analysis)
    todo = [g for g, group in enumerate(groups) if group.root not in stored]
    total = sum(len(expected[groups[g].root]) for g in todo) + (dense is None)
    begin, measured = time.perf_counter(), 0
    with tqdm(total=total, desc="sensitivity", unit="point", disable=not progress or not total) as bar:
        if dense is None:
            dense = _held_out(copy.deepcopy(model), sample, precision, 0)
            measured += 1
            bar.update()
            _write(path, key, dense, stored)
        for g in todo:
            points = []
            for kept in expected[groups[g].root]:
                chosen = [order[: len(order) - kept] if i == g else [] for i, order in enumerate(orders)]
                pruned = graph.checked_prune(model, example_inputs, analysis, removal(groups, chosen))
                points.append(_held_out(pruned, sample, precision, kept))
                measured += 1
                bar.update()
            stored[groups[g].root] = tuple(points)
            _write(path, key, dense, stored)
    curves = [GroupCurve(g.root, len(g.units), stored[g.root]) for g in groups]
    return Curves(dense, curves, path, measured, time.perf_counter() - begin)


def _has_batchnorm(model: nn.Module) -> bool:
    """Whether the model has a BatchNorm layer, whose statistics pruning changes."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def _held_out(model: nn.Module, sample: Sample, precision: Precision, kept: int) -> Point:
    """The loss and top-1 of `model` (changed: its BatchNorm statistics re-estimated) on the evaluation batches."""
    device = next(model.parameters()).device
    if _has_batchnorm(model):
        recalibrate_bn(model, sample.recalibration, device=device)
    model.eval()
    memory_format = torch.channels_last if precision.channels_last else torch.contiguous_format
    loss, correct, images = 0.0, 0, 0
    for x, y in sample.evaluation:
        with precision.autocast(device):
            logits = model(x.to(device).contiguous(memory_format=memory_format))
        y = y.to(device)
        loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        images += len(y)
    if not math.isfinite(loss):
        raise ValueError(f"non-finite loss on the sensitivity sample with {kept} units kept")
    return Point(kept, loss / images, 100.0 * correct / images)


def _read(path: Path, key: dict[str, Any], expected: dict[str, list[int]]) -> tuple[Point | None, dict[str, Any]]:
    """The dense point and the groups' points a cache file holds (none where there is no file); a file that is
    damaged or not of this measurement is warned about and not used."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, {}
    except (OSError, UnicodeDecodeError) as e:
        return _damaged(path, str(e))
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != key:
            return _damaged(path, "not a measurement of this model, importance and sample")
        dense = _point(data["dense"], None)
        stored = {}
        for root, points in data["groups"].items():
            if root not in expected or [p[0] for p in points] != expected[root]:
                return _damaged(path, f"group {root!r} is not one of this model's, at its widths")
            stored[root] = tuple(_point(p[1:], p[0]) for p in points)
        return dense, stored
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        return _damaged(path, str(e) or type(e).__name__)


def _point(values: Any, kept: int | None) -> Point:
    """A Point from its stored [loss, top1], checked: a finite loss >= 0 and a top-1 in [0, 100]."""
    loss, top1 = values
    if not all(isinstance(v, float | int) and not isinstance(v, bool) for v in (loss, top1)):
        raise TypeError(f"not numbers: {values}")
    if not (math.isfinite(loss) and loss >= 0 and 0 <= top1 <= 100):
        raise ValueError(f"a loss or top-1 out of range: {values}")
    return Point(0 if kept is None else kept, float(loss), float(top1))


def _damaged(path: Path, why: str) -> tuple[None, dict[str, Any]]:
    """Nothing from a cache file that cannot be used, with a warning saying why."""
    warnings.warn(f"sensitivity cache {path} is damaged ({why[:200]}): measuring again", stacklevel=4)
    return None, {}


def _write(path: Path, key: dict[str, Any], dense: Point, stored: dict[str, tuple[Point, ...]]) -> None:
    """Cache what is measured (a warning where it cannot be written: a cache, not a result)."""
    data = {
        "format": FORMAT,
        "key": key,
        "dense": [dense.loss, dense.top1],
        "groups": {root: [list(p) for p in points] for root, points in stored.items()},
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(data).encode())
    except OSError as e:
        warnings.warn(
            f"not caching the sensitivity curves ({e}); set CHIP_CACHE_DIR to a writable folder", stacklevel=3
        )


def _hash(text: str) -> str:
    """The SHA-256 of a text, hex."""
    return hashlib.sha256(text.encode()).hexdigest()


def _tensor_bytes(t: Tensor) -> bytes:
    """A tensor's bytes, whatever its dtype."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _digest(model: nn.Module) -> str:
    """A digest of a model's class and named tensors (a model without a file)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _importance_digest(importance: dict[str, Tensor]) -> str:
    """A digest of the groups' importances (they decide which channels each ratio removes)."""
    h = hashlib.sha256()
    for root in sorted(importance):
        h.update(root.encode())
        h.update(_tensor_bytes(importance[root].double()))
    return h.hexdigest()


def _sample_digest(sample: Sample) -> str:
    """A digest of the sample's batches, in order."""
    h = hashlib.sha256()
    for part in (sample.recalibration, sample.evaluation):
        h.update(f"{len(part)}".encode())
        for x, y in part:
            h.update(f"{tuple(x.shape)}{x.dtype}".encode())
            h.update(_tensor_bytes(x))
            h.update(_tensor_bytes(y))
    return h.hexdigest()
