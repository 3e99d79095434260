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

import copy
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch_pruning as tp
from torch import Tensor, nn

from .calibrate import Tap, score_maps
from .criteria import L1, ActivationCriterion, Criterion, WeightCriterion, get_criterion
from .models.resnet_cifar import ChannelShortcut
from .profile import count_macs

SCOPES = ("local", "global")
FLOPS_TOLERANCE = 0.02  # flops_target is reached within this fraction of itself
LAYERS = (nn.modules.conv._ConvNd, nn.Linear)  # what scores are taken at, and what groups are rooted at


class ShortcutPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning surgery of a ChannelShortcut: input and output channels are independent dims, as a conv's."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Drop the routes to the pruned output channels and renumber the rest."""
        assert isinstance(layer, ChannelShortcut)
        keep = torch.tensor([c for c in range(layer.out_channels) if c not in set(idxs)], dtype=torch.long)
        src, dst = layer.restricted(torch.arange(len(layer.src) and int(layer.src.max().item()) + 1), keep)
        layer.out_channels = len(keep)
        layer.set_map(src, dst)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Drop the routes from the pruned input channels and renumber the rest."""
        assert isinstance(layer, ChannelShortcut)
        n = max([*layer.src.tolist(), *idxs], default=-1) + 1
        keep = torch.tensor([c for c in range(n) if c not in set(idxs)], dtype=torch.long)
        layer.set_map(*layer.restricted(keep, torch.arange(layer.out_channels)))
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        """Output channels."""
        return cast(ChannelShortcut, layer).out_channels

    def get_in_channels(self, layer: nn.Module) -> None:
        """Unknown to the module (it reads whatever it is given): no check on input indices."""
        return None


class IdentityShortcut(ChannelShortcut):
    """A ChannelShortcut whose map is the identity, as Torch-Pruning sees it while it traces and prunes: its input
    and output channels are the same channels, so the blocks it joins are pruned together (a residual group)."""


class IdentityShortcutPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning surgery of an IdentityShortcut: the same channels leave its input and its output."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """The identity map on the channels left."""
        assert isinstance(layer, ChannelShortcut)
        layer.out_channels -= len(set(idxs))
        everything = torch.arange(layer.out_channels)
        layer.set_map(everything, everything)
        return layer

    # One function for both sides: that is how Torch-Pruning knows that pruning one side prunes the other.
    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        """Output channels."""
        return cast(ChannelShortcut, layer).out_channels

    get_in_channels = get_out_channels


PRUNERS = {ChannelShortcut: ShortcutPruner(), IdentityShortcut: IdentityShortcutPruner()}


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
) -> nn.Module:
    """A physically pruned copy of `model` (which is left as it is), its channels ranked by `criterion`.

    calibration: batches of inputs, or (inputs, targets) pairs. Give exactly one of pruning_ratio (the fraction of
    channels removed from every group, or a dict from module name to the ratio of the groups holding it) and
    flops_target (the fraction of the FLOPs to keep, reached within 2 %). scope "global" ranks all groups' channels
    together. round_to: keep channel counts at multiples of it. importance: from group_importance on this model
    (calibration is then not read), to prune one model several ways from one scoring pass."""
    _check(pruning_ratio, flops_target, scope, round_to)
    named = {n for n, _ in model.named_modules()}
    unknown = sorted(set(pruning_ratio) - named) if isinstance(pruning_ratio, dict) else []
    if unknown:
        raise ValueError(f"pruning_ratio: no module named {', '.join(unknown)} in the model")
    scores, ignored = _analyse(model, example_inputs, calibration, criterion, ignored_layers, importance)

    def trial(ratio: float | dict[str, float]) -> nn.Module:
        return _pruned(model, example_inputs, scores, ratio, scope == "global", ignored, round_to)

    if flops_target is None:
        assert pruning_ratio is not None
        return trial(pruning_ratio)
    return _search(model, example_inputs, trial, flops_target)


def group_importance(
    model: nn.Module,
    example_inputs: Tensor,
    calibration: Iterable[Any],
    *,
    criterion: str | Criterion = "chip",
    ignored_layers: Iterable[nn.Module | str] = (),
) -> dict[str, Tensor]:
    """The importance of the channels of every prunable group, keyed by the name of the group's root layer."""
    return _analyse(model, example_inputs, calibration, criterion, ignored_layers)[0]


def _analyse(
    model: nn.Module,
    example_inputs: Tensor,
    calibration: Iterable[Any],
    criterion: str | Criterion,
    ignored_layers: Iterable[nn.Module | str],
    importance: dict[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], set[str]]:
    """Group importances (measured unless given), and the names of the layers whose outputs stay (the given ones and
    the output layers)."""
    judge = get_criterion(criterion) if isinstance(criterion, str) else criterion
    if not isinstance(judge, ActivationCriterion | WeightCriterion):
        raise ValueError(f"criterion must be a name or have batch_sum or weight_scores, got {criterion!r}")
    names = {m: n for n, m in model.named_modules()}
    ignored = {names.get(m, "?") if isinstance(m, nn.Module) else m for m in ignored_layers}
    unknown = sorted(ignored - set(names.values()))
    if unknown:
        raise ValueError(f"ignored_layers: no module named {', '.join(unknown)} in the model")
    training = model.training
    try:
        graph = _graph(model, example_inputs)
        ignored |= {names[m] for m in _output_layers(graph)}
        groups = list(
            graph.get_all_groups(ignored_layers=[model.get_submodule(n) for n in ignored], root_module_types=LAYERS)
        )
        roots = {names[group[0].dep.target.module] for group in groups}
        if importance is not None and set(importance) != roots:
            raise ValueError("importance: not from group_importance on this model with these ignored_layers")
        return importance or _importances(model, graph, groups, judge, calibration), ignored
    finally:
        model.train(training)


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


@contextmanager
def _traceable(model: nn.Module) -> Iterator[None]:
    """Every ChannelShortcut forwarded through its gather, and the identity ones seen as IdentityShortcut, while
    Torch-Pruning traces and prunes the model.

    An identity shortcut returns its input tensor itself, whose autograd node the tracer would then take for the
    shortcut's, hiding the layer that made it; on exit each shortcut is a ChannelShortcut again, its fast path
    recomputed from its map."""
    shortcuts = [m for m in model.modules() if isinstance(m, ChannelShortcut)]
    for m in shortcuts:
        if m.identity:
            m.__class__ = IdentityShortcut
        m.identity = False
    try:
        yield
    finally:
        for m in shortcuts:
            m.__class__ = ChannelShortcut
            m.set_map(m.src, m.dst)


def _graph(model: nn.Module, example_inputs: Tensor) -> tp.DependencyGraph:
    """The dependency graph of `model` (left in eval mode)."""
    with _traceable(model), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs, customized_pruners=PRUNERS, verbose=False)


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


Member = tuple[nn.Module, list[int], list[int]]  # a layer of a group, its channel indices, the group's indices


def _members(group: tp.Group, inputs: bool) -> list[Member]:
    """The conv/linear layers whose input (or output) channels the group prunes, with their own and root indices."""
    graph = group._DG  # the graph the group was made from
    is_side = graph.is_in_channel_pruning_fn if inputs else graph.is_out_channel_pruning_fn
    return [
        (item.dep.target.module, item.idxs, item.root_idxs)
        for item in group
        if isinstance(item.dep.target.module, LAYERS) and is_side(item.dep.handler)
    ]


def _importances(
    model: nn.Module, graph: tp.DependencyGraph, groups: list[tp.Group], judge: Criterion, calibration: Iterable[Any]
) -> dict[str, Tensor]:
    """The importance of every group's channels, keyed by the name of the group's root layer."""
    names = {m: n for n, m in model.named_modules()}
    roots = [names[group[0].dep.target.module] for group in groups]
    producers = [_members(group, inputs=False) for group in groups]
    if not isinstance(judge, ActivationCriterion):
        return {
            root: _combine([(_filter_scores(judge, m), i, r) for m, i, r in members], len(group[0].idxs))
            for root, group, members in zip(roots, groups, producers, strict=True)
        }
    consumers = [_members(group, inputs=True) for group in groups]
    taps = {names[m]: Tap(names[m], "input", graph.get_in_channels(m)) for members in consumers for m, _, _ in members}
    inputs = (batch[0] if isinstance(batch, tuple | list) else batch for batch in calibration)
    device = next(model.parameters()).device
    scores, _, same = score_maps(model, taps, judge, inputs, device=device)
    importance, flat, unseen = {}, [], []
    for root, group, made, read in zip(roots, groups, producers, consumers, strict=True):
        read = [(m, i, r) for m, i, r in read if names[m] not in same]  # a map read by several layers counts once
        spatial = [(m, i, r) for m, i, r in read if not isinstance(m, nn.Linear)]
        if spatial or read:
            flat += [] if spatial else [root]
            importance[root] = _combine([(scores[names[m]], i, r) for m, i, r in spatial or read], len(group[0].idxs))
        else:
            unseen.append(root)
            importance[root] = _combine([(_filter_scores(L1(), m), i, r) for m, i, r in made], len(group[0].idxs))
    if flat:
        warnings.warn(
            f"{judge.name}: no spatial feature map reads the channels of the groups rooted at "
            f"{', '.join(flat)}; scored on the 2-D input of the linear layers reading them (one position "
            "per image: a magnitude ranking)",
            stacklevel=4,
        )
    if unseen:
        warnings.warn(
            f"{judge.name}: no layer's input was observed holding the channels of the groups rooted at "
            f"{', '.join(unseen)}; scored by the L1 norm of their filters",
            stacklevel=4,
        )
    return importance


def _filter_scores(judge: WeightCriterion, layer: nn.Module) -> Tensor:
    """A weight criterion's scores of a conv's filters; the L1 norms of a linear layer's rows."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        return judge.weight_scores(cast(nn.Conv2d, layer))
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


def _pruned(
    model: nn.Module,
    example_inputs: Tensor,
    importance: dict[str, Tensor],
    ratio: float | dict[str, float],
    global_pruning: bool,
    ignored: set[str],
    round_to: int | None,
) -> nn.Module:
    """A pruned deep copy of `model` at a uniform ratio or at per-module ratios."""
    pruned = copy.deepcopy(model)
    names = {m: n for n, m in pruned.named_modules()}
    by_name = dict(pruned.named_modules())

    def score(group: tp.Group) -> Tensor:
        return importance[names[group[0].dep.target.module]].float()

    with _traceable(pruned), torch.enable_grad():
        pruner = tp.pruner.BasePruner(
            pruned,
            example_inputs,
            importance=score,
            global_pruning=global_pruning,
            pruning_ratio=0.0 if isinstance(ratio, dict) else ratio,
            pruning_ratio_dict={by_name[n]: r for n, r in ratio.items()} if isinstance(ratio, dict) else None,
            ignored_layers=[by_name[n] for n in ignored],
            round_to=round_to,
            customized_pruners=PRUNERS,
            root_module_types=list(LAYERS),
        )
        pruner.step()
    return pruned.train(model.training)


def _search(model: nn.Module, example_inputs: Tensor, trial: Callable[[float], nn.Module], target: float) -> nn.Module:
    """The pruned model whose FLOPs are within 2 % of `target` × the model's, bisecting on the pruning ratio."""
    if 1 - target <= FLOPS_TOLERANCE * target:  # keeping everything is within the tolerance
        return trial(0.0)
    base = count_macs(model, example_inputs)
    lo, hi, best_kept = 0.0, 1.0, 1.0
    for _ in range(30):
        ratio = (lo + hi) / 2
        pruned = trial(ratio)
        kept = count_macs(pruned, example_inputs) / base
        if abs(kept - target) < abs(best_kept - target):
            best_kept = kept
        if abs(kept - target) <= FLOPS_TOLERANCE * target:
            return pruned
        lo, hi = (ratio, hi) if kept > target else (lo, ratio)
    raise ValueError(f"no pruning ratio keeps {target:.4f} of the FLOPs within 2 %; the closest keeps {best_kept:.4f}")
