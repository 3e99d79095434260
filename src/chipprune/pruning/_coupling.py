"""Which channels must go together: every channel of the model sorted into classes and groups in one pass over
Torch-Pruning's dependency graph, and the physical removal of chosen classes.

Torch-Pruning's `get_all_groups` walks the graph once per root layer, and checks every step against all the entries
its group has so far. Where its channel counts are wrong the walk does not end: on timm's RexNet the concatenation
after a partial residual (`cat([x[:, :C] + shortcut, x[:, C:]])`) is sized through the slice, as if it passed every
channel, so indices shift by hundreds at each block and the walk chases index sets far outside the layers (22,000
entries after 40 s for one group). chipprune sizes concatenations from the traced shapes (tracing.Record), and walks
each dependency once for all channels at the same time, joining coupled channels in a union-find:

- a *class* is a set of channels that are one channel of the network (a conv's filter, its BatchNorm entry, the input
  slices that read it, through residual sums, concatenations and splits): removing one removes all;
- a *unit* joins classes that must go in the same step: the same position in every group of a grouped conv (ResNeXt)
  or GroupNorm, and the positions a channel-splitting reshape ties;
- a *group* holds the units of the classes that one conv or linear layer's outputs touch, as Torch-Pruning's group
  of that root layer; it is ranked and budgeted as one.

A unit is never removed where it holds a channel of the model's output, or an index outside a layer's channels (a
dependency Torch-Pruning could not map)."""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, cast

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency.node import Node

from ._torch_pruning import hybrid_index, parameter_name

LAYERS = (nn.modules.conv._ConvNd, nn.Linear)  # what scores are taken at, and what groups are rooted at


class Space(NamedTuple):
    """The channels of a node as one of its pruning functions numbers them (a conv's inputs and outputs are two)."""

    node: Node
    fn: Callable[..., Any]


Element = tuple[Space, int]


class Group(NamedTuple):
    """The classes one root layer's outputs touch, its root's channels first, and its removable units."""

    root: str
    classes: list[list[Element]]
    units: list[list[int]]  # each a list of class positions


class _UnionFind:
    """Disjoint sets of ints (a channel: its space's number << SHIFT | its index)."""

    def __init__(self, parent: dict[int, int] | None = None) -> None:
        self.parent = dict(parent or {})

    def find(self, x: int) -> int:
        """The representative of x's set."""
        parent, root = self.parent, x
        while (up := parent.get(root, root)) != root:
            root = up
        while x != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        """Join the sets of a and b."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def roots(self, keys: Iterable[int]) -> dict[int, int]:
        """The representative of each key: find's loop inlined, for the million channels of the largest models."""
        parent, found = self.parent, {}
        for x in keys:
            root = x
            while (up := parent.get(root, root)) != root:
                root = up
            found[x] = root
            while x != root:
                parent[x], x = root, parent[x]
        return found

    def join(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Join the sets of each pair: union's loop with find inlined (regnet_y_128gf joins 2.6 million pairs, and
        the calls took 11 of its 83 s)."""
        parent = self.parent
        for a, b in pairs:
            roots = []
            for x in (a, b):
                root = x
                while (up := parent.get(root, root)) != root:
                    root = up
                while x != root:
                    parent[x], x = root, parent[x]
                roots.append(root)
            if roots[0] != roots[1]:
                parent[roots[1]] = roots[0]


SHIFT = 24  # bits of a channel index in a channel's number


def _counts(graph: tp.DependencyGraph, node: Node) -> list[tuple[Callable[..., Any], int | None]]:
    """The node's pruning functions with the channels each numbers (None: unknown, as for operations)."""
    pruner = graph.get_pruner_of_module(node.module)
    if pruner is None:
        return []
    return [
        (pruner.prune_out_channels, graph.get_out_channels(node)),
        (pruner.prune_in_channels, graph.get_in_channels(node)),
    ]


class _Classes(NamedTuple):
    """The channels reached in every space, numbered, and joined into classes."""

    union: _UnionFind
    known: dict[Space, set[int]]
    ids: dict[Space, int]  # a space's number
    limit: int  # more channels than any layer has

    def key(self, element: Element) -> int:
        """The number of a channel."""
        return self.ids[element[0]] << SHIFT | element[1]


def _classes(graph: tp.DependencyGraph) -> _Classes:
    """Every channel of every space reached from a layer's channels, joined along the graph's dependencies."""
    queue: deque[tuple[Space, list[int]]] = deque()

    counts = [(Space(node, fn), count) for node in graph.module2node.values() for fn, count in _counts(graph, node)]
    # A mapping Torch-Pruning got wrong can send indices past every layer's channels, and on through cycles ever
    # further (ResNeSt's radix softmax: 44 million joins); such an index is kept, spoiling its class, not followed.
    limit = max((c for _, c in counts if c is not None), default=0)
    found = _Classes(_UnionFind(), defaultdict(set), {}, limit)

    def reach(space: Space, idxs: Iterable[int]) -> None:
        found.ids.setdefault(space, len(found.ids))
        new = [i for i in idxs if i not in found.known[space]]
        found.known[space].update(new)
        new = [i for i in new if 0 <= i < limit]
        if new:
            queue.append((space, new))

    for space, count in counts:
        if count is not None:
            reach(space, range(count))
    while queue:
        space, idxs = queue.popleft()
        source = found.ids[space] << SHIFT
        for dep in space.node.dependencies:
            if dep.trigger != space.fn:
                continue
            target = Space(dep.target, dep.handler)
            mappings = [m for m in dep.index_mapping if m is not None]
            pairs = list(zip(idxs, idxs, strict=True))  # most dependencies map channel i to channel i
            if mappings:
                mapped = [hybrid_index(i, i) for i in idxs]
                for mapping in mappings:
                    mapped = mapping(mapped)
                pairs = [(h.root_idx, h.idx) for h in mapped]
            reach(target, (i for _, i in pairs))
            into = found.ids[target] << SHIFT
            found.union.join((source | a, into | b) for a, b in pairs)
    return found


def _positional(graph: tp.DependencyGraph, known: dict[Space, set[int]]) -> list[list[Element]]:
    """The positions that grouped convs (not depthwise) and GroupNorms keep alike in each of their groups."""
    ties = []
    for space in known:
        module = space.node.module
        if isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups < module.out_channels:
            groups, count = (
                module.groups,
                (module.out_channels if graph.is_out_channel_pruning_fn(space.fn) else module.in_channels),
            )
        elif isinstance(module, nn.GroupNorm) and module.num_groups > 1:
            groups, count = module.num_groups, module.num_channels
        else:
            continue
        size = count // groups
        ties += [[(space, g * size + b) for g in range(groups)] for b in range(size)]
    return ties


def couple(
    graph: tp.DependencyGraph, names: dict[nn.Module, str], ignored: set[nn.Module], ties: Iterable[list[Element]] = ()
) -> list[Group]:
    """The prunable groups of the graph, in Torch-Pruning's order of root layers; groups holding the outputs of an
    ignored module are left out. `ties`: more positions that must go in one step (tracing rules)."""
    found = _classes(graph)
    fine, known, key = found.union, found.known, found.key
    coarse = _UnionFind(fine.parent)
    for tie in [*_positional(graph, known), *ties]:
        for element in tie[1:]:
            coarse.union(key(tie[0]), key(element))
    spoiled = {key(e) for e in _spoiled(graph, known, found.limit)}
    rep = fine.roots(found.ids[space] << SHIFT | i for space, idxs in known.items() for i in idxs)
    members = defaultdict[int, list[Element]](list)
    for space, idxs in known.items():
        base = found.ids[space] << SHIFT
        for i in sorted(idxs):
            if base | i not in spoiled:
                members[rep[base | i]].append((space, i))
    spoiled = {coarse.find(e) for e in spoiled}

    together = _UnionFind()  # coarse classes joined through the outputs of each conv or linear layer
    layer_outputs = [
        Space(n, graph.get_pruner_of_module(m).prune_out_channels)
        for m, n in graph.module2node.items()
        if isinstance(m, LAYERS) and m in names and known[Space(n, graph.get_pruner_of_module(m).prune_out_channels)]
    ]
    for space in layer_outputs:
        base = found.ids[space] << SHIFT
        for i in known[space]:
            together.union(coarse.find(base), coarse.find(base | i))
    roots: dict[int, list[Space]] = defaultdict(list)  # a group's representative -> its layers' output spaces
    for space in layer_outputs:
        roots[together.find(coarse.find(found.ids[space] << SHIFT))].append(space)
    kept = {
        together.find(coarse.find(found.ids[s] << SHIFT | i))
        for s in known
        if s.node.module in ignored and graph.is_out_channel_pruning_fn(s.fn)
        for i in known[s]
    }
    return [_group(names, spaces, found, rep, coarse, members, spoiled) for r, spaces in roots.items() if r not in kept]


def _spoiled(graph: tp.DependencyGraph, known: dict[Space, set[int]], limit: int) -> Iterator[Element]:
    """Channels that must stay: the model's outputs, and indices outside a layer's channels (or outside every
    layer's, `limit`)."""
    for space, idxs in known.items():
        if space.node.type == tp.ops.OPTYPE.OUTPUT:
            yield from ((space, i) for i in idxs)
            continue
        count = dict(_counts(graph, space.node)).get(space.fn)
        yield from ((space, i) for i in idxs if not 0 <= i < (limit if count is None else count))


def _group(
    names: dict[nn.Module, str],
    spaces: list[Space],
    found: _Classes,
    rep: dict[int, int],
    coarse: _UnionFind,
    members: dict[int, list[Element]],
    spoiled: set[int],
) -> Group:
    """One group from its root layers' output spaces (the first is its root); `rep`: each channel's class."""
    order: dict[int, int] = {}
    for space in spaces:
        base = found.ids[space] << SHIFT
        for i in sorted(found.known[space]):
            order.setdefault(rep[base | i], len(order))
    units = defaultdict[int, list[int]](list)
    for cls, position in order.items():
        units[coarse.find(cls)].append(position)
    return Group(
        names[spaces[0].node.module],
        [members[cls] for cls in order],
        [u for unit, u in units.items() if unit not in spoiled],
    )


def removal(groups: list[Group], chosen: Iterable[Iterable[int]]) -> dict[Space, list[int]]:
    """The channels of each space that removing the chosen units of each group removes."""
    cut = defaultdict[Space, set[int]](set)
    for group, units in zip(groups, chosen, strict=True):
        for u in units:
            for position in group.units[u]:
                for space, i in group.classes[position]:
                    cut[space].add(i)
    return {space: sorted(idxs) for space, idxs in cut.items()}


def removable(group: Group, order: list[int]) -> int:
    """How many of the group's units can go, in `order`, while every space holding its channels keeps one of them
    and the group keeps a unit: a group can span several layers' channels (the channel-shuffled stages of ShuffleNet,
    MixNet's split convs, RexNet's partial residuals), and its last units can be one layer's whole width."""
    left = Counter(space for cls in group.classes for space, _ in cls)
    for n, unit in enumerate(order[: len(order) - 1]):
        for position in group.units[unit]:
            for space, _ in group.classes[position]:
                left[space] -= 1
                if not left[space]:
                    return n
    return max(len(order) - 1, 0)


def remove(
    model: nn.Module, graph: tp.DependencyGraph, names: dict[nn.Module, str], cut: dict[Space, list[int]]
) -> None:
    """Remove the channels `cut` from `model`, a copy of the graph's model (found by module and parameter name)."""
    modules = dict(model.named_modules())
    for space, idxs in cut.items():
        original = space.node.module
        pruner = cast(tp.pruner.BasePruningFunc, cast(Any, space.fn).__self__)
        pruner.pruning_dim = space.node.pruning_dim
        if isinstance(original, nn.Parameter):
            owner, _, attr = parameter_name(graph, original).rpartition(".")
            parent = model.get_submodule(owner)
            setattr(parent, attr, space.fn(getattr(parent, attr), idxs))
        elif original in names:
            module = modules[names[original]]
            extra = _per_output(module) if graph.is_out_channel_pruning_fn(space.fn) else {}
            space.fn(module, idxs)
            _prune_extra(module, extra, idxs)


def _per_output(module: nn.Module) -> dict[str, int]:
    """A conv or linear layer's tensors other than weight and bias with one entry per output channel (the gain of
    timm's ScaledStdConv2d), which Torch-Pruning's pruners leave alone."""
    if not isinstance(module, LAYERS):
        return {}
    out = module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features
    tensors = {**module._parameters, **module._buffers}
    return {
        n: out
        for n, t in tensors.items()
        if n not in ("weight", "bias") and t is not None and t.dim() and t.shape[0] == out
    }


def _prune_extra(module: nn.Module, extra: dict[str, int], idxs: list[int]) -> None:
    """Drop the entries `idxs` from each tensor named in `extra` (name -> its old length)."""
    for name, length in extra.items():
        keep = torch.tensor(sorted(set(range(length)) - set(idxs)))
        tensor = getattr(module, name)
        kept = tensor.detach()[keep].clone()
        if name in module._parameters:
            setattr(module, name, nn.Parameter(kept, requires_grad=tensor.requires_grad))
        else:
            setattr(module, name, kept)


class Cost(NamedTuple):
    """A conv or linear layer's multiply-accumulates: `unit` per output channel per input channel of one of its
    groups, for the channels its spaces keep."""

    out: Space
    inp: Space
    unit: int
    out_channels: int
    in_channels: int
    groups: int  # 0: depthwise (one group per channel)


def costs(graph: tp.DependencyGraph, macs: dict[nn.Module, int]) -> list[Cost]:
    """The cost of every layer of the graph that ran, from its measured multiply-accumulates."""
    result = []
    for module, node in graph.module2node.items():
        if not isinstance(module, LAYERS) or not macs.get(module):
            continue
        pruner = graph.get_pruner_of_module(module)
        out, inp = graph.get_out_channels(module), graph.get_in_channels(module)
        groups = module.groups if isinstance(module, nn.modules.conv._ConvNd) else 1
        depthwise = pruner.prune_out_channels == pruner.prune_in_channels
        result.append(
            Cost(
                Space(node, pruner.prune_out_channels),
                Space(node, pruner.prune_in_channels),
                macs[module] // (out * inp // groups),
                out,
                inp,
                0 if depthwise else groups,
            )
        )
    return result


def macs_after(layers: list[Cost], cut: dict[Space, list[int]]) -> int:
    """The multiply-accumulates of the layers once the channels `cut` are gone."""
    total = 0
    for c in layers:
        out = c.out_channels - len(cut.get(c.out, ()))
        if c.groups == 0:
            total += c.unit * out
        else:
            total += c.unit * out * ((c.in_channels - len(cut.get(c.inp, ()))) // c.groups)
    return total
