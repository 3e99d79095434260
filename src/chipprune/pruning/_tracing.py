"""What Torch-Pruning's trace does not keep, recorded while it traces: the shape of every tensor (by its autograd node)
and every call that takes channel counts as Python numbers (split, chunk, slicing, view/reshape), with the module
whose forward made it; and, on a pruned model, those calls replaced by ones with the pruned counts.

Models keep channel counts in their code: timm's MixedConv2d splits by `self.splits`, CSPNet by
`self.expand_chs // 2`, Res2Net by `self.width`, RexNet and DPN slice by `self.in_channels` / `self.num_1x1_c`. After
pruning those numbers are stale, and no Torch-Pruning pruner can reach them. chipprune finds each such call again
at run time (the n-th tracked call of the same module's forward) and substitutes the pruned sizes, through a forward
pre-hook and a forward hook on that module that hold a torch function mode while it runs."""

from __future__ import annotations

import math
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle
from torch_pruning.dependency import index_mapping
from torch_pruning.dependency.node import Node

from ..profile import LAYERS, call_macs
from ._coupling import Space
from ._torch_pruning import concat_mapping, hybrid_index, saved, split_mapping

if TYPE_CHECKING:
    from ._torch_pruning import HybridIndex

# The calls whose arguments may hold channel counts. One is found again at run time by the line of the model's code
# that made it and its number among the calls of that line in the same forward of the same module.
TRACKED = frozenset(
    {
        torch.split,
        Tensor.split,
        Tensor.split_with_sizes,
        torch.chunk,
        Tensor.chunk,
        Tensor.__getitem__,
        Tensor.view,
        Tensor.reshape,
        torch.reshape,
    }
)


Site = tuple[str, int, int]  # file, line, and the number of the call among those of that line in one forward
_LIBRARIES = (os.path.dirname(torch.__file__) + os.sep, __file__)  # frames skipped looking for the model's line


def _line() -> tuple[str, int]:
    """The file and line of the model's code that made the current torch call."""
    frame = sys._getframe(2)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARIES):
        frame = frame.f_back
    return frame.f_code.co_filename, frame.f_lineno


class Call(NamedTuple):
    """One tracked call during the trace."""

    module: str  # the innermost module whose forward made it
    site: Site  # where in the code
    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    source: Any  # the autograd node of the tensor it was called on (None: not traced)
    output: Any  # the autograd node of (the first of) its outputs
    in_shape: tuple[int, ...]
    out_shapes: tuple[tuple[int, ...], ...]


@dataclass
class Record:
    """What one traced forward pass showed."""

    shapes: dict[Any, tuple[int, ...]] = field(default_factory=dict)  # autograd node -> shape of the tensor it made
    calls: list[Call] = field(default_factory=list)
    input_dims: dict[str, int] = field(default_factory=dict)  # module name -> dimensions of its first input
    macs: dict[nn.Module, int] = field(default_factory=dict)  # conv or linear layer -> its multiply-accumulates


class _Frame(NamedTuple):
    name: str
    calls: Counter[tuple[str, int]]  # tracked calls made while this module's forward runs, by source line


class _Recorder(TorchFunctionMode):
    """Fills a Record during one forward pass of `model`."""

    def __init__(self, model: nn.Module, record: Record) -> None:
        super().__init__()
        self.names = {m: n for n, m in model.named_modules()}
        self.record, self.stack = record, list[_Frame]()

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outputs = [o for o in (out if isinstance(out, tuple | list) else [out]) if isinstance(o, Tensor)]
        for o in outputs:
            if o.grad_fn is not None:
                self.record.shapes.setdefault(o.grad_fn, tuple(o.shape))
        if func in TRACKED and self.stack and outputs and isinstance(args[0], Tensor):
            line = _line()
            for frame in self.stack:
                frame.calls[line] += 1
            top = self.stack[-1]
            self.record.calls.append(
                Call(
                    top.name,
                    (*line, top.calls[line]),
                    func,
                    tuple(args),
                    kwargs,
                    args[0].grad_fn,
                    outputs[0].grad_fn,
                    tuple(args[0].shape),
                    tuple(tuple(o.shape) for o in outputs),
                )
            )
        return out

    def enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook of every module: push it; note its input's dimensions."""
        name = self.names.get(module)
        if name is None:
            return
        self.stack.append(_Frame(name, Counter()))
        if args and isinstance(args[0], Tensor):
            self.record.input_dims.setdefault(name, args[0].dim())

    def leave(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Forward hook of every module: pop it; count a layer's multiply-accumulates."""
        if self.stack and self.stack[-1].name == self.names.get(module):
            self.stack.pop()
        if isinstance(module, LAYERS) and isinstance(output, Tensor):
            self.record.macs[module] = self.record.macs.get(module, 0) + call_macs(module, output)


@contextmanager
def recording(model: nn.Module, record: Record) -> Iterator[None]:
    """Record every forward pass of `model` run inside."""
    recorder = _Recorder(model, record)
    handles = [
        nn.modules.module.register_module_forward_pre_hook(recorder.enter),
        nn.modules.module.register_module_forward_hook(recorder.leave, always_call=True),
    ]
    try:
        with recorder:
            yield
    finally:
        for h in handles:
            h.remove()


def channel_dim_args(call: Call) -> int | None:
    """The dim a split/chunk call splits (None for other calls)."""
    if call.func not in (torch.split, Tensor.split, Tensor.split_with_sizes, torch.chunk, Tensor.chunk):
        return None
    dim = call.kwargs.get("dim", call.args[2] if len(call.args) > 2 else 0)
    return int(dim) % len(call.in_shape)


class Split(NamedTuple):
    """A split or chunk along channels, by the pruned sizes."""

    sizes: tuple[int, ...]

    def __call__(self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        """The pieces of the input."""
        return torch.split(args[0], list(self.sizes), dim=1)


class Index(NamedTuple):
    """A slice of the channels, by the pruned bounds."""

    key: tuple[Any, ...]

    def __call__(self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        """The sliced input."""
        return args[0][self.key]


class Shape(NamedTuple):
    """A view or reshape whose channel entry (dim 1) becomes the pruned count; the other entries stay as the code
    computes them."""

    channels: int

    def __call__(self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        """The reshaped input (a view where the original call was one)."""
        shape = list(_shape_args(args))
        shape[1] = self.channels
        return func(args[0], shape)


def _shape_args(args: Sequence[Any]) -> Sequence[int]:
    """The shape of a view or reshape call, given as one sequence or as numbers."""
    return args[1] if len(args) == 2 and isinstance(args[1], tuple | list | torch.Size) else args[1:]


class Gather(NamedTuple):
    """The first view of a channel shuffle, replaced so that the shuffle's transpose and flattening leave the pruned
    channels in the order the masked model has them: a gather, then a view with one group of all the channels."""

    order: tuple[int, ...]

    def __call__(self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        """The gathered input, shaped [N, 1, C, ...]."""
        x = args[0]
        return x.index_select(1, torch.tensor(self.order, device=x.device)).unsqueeze(1)


Replacement = Split | Index | Shape | Gather


class _Substitution(TorchFunctionMode):
    """Counts the tracked calls of one forward and replaces the chosen ones."""

    def __init__(self, replacements: dict[Site, Replacement]) -> None:
        super().__init__()
        self.replacements, self.calls = replacements, Counter[tuple[str, int]]()

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in TRACKED and args and isinstance(args[0], Tensor):
            line = _line()
            self.calls[line] += 1
            replacement = self.replacements.get((*line, self.calls[line]))
            if replacement is not None:
                return replacement(func, args, kwargs)
        return func(*args, **kwargs)


class Override:
    """The pruned calls of one module: a forward pre-hook that starts substituting them, a forward hook that stops."""

    def __init__(self, replacements: dict[Site, Replacement]) -> None:
        self.replacements = replacements
        self.modes: list[_Substitution] = []  # a stack: the module may run inside itself

    def start(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Substitute from here on."""
        self.modes.append(_Substitution(self.replacements))
        self.modes[-1].__enter__()

    def stop(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Stop substituting."""
        self.modes.pop().__exit__(None, None, None)

    def __getstate__(self) -> dict[str, Any]:
        return {"replacements": self.replacements, "modes": []}


def install(model: nn.Module, replacements: dict[str, dict[Site, Replacement]]) -> list[RemovableHandle]:
    """Hook each module named in `replacements` so that its forward makes the replaced calls."""
    handles = []
    for name, chosen in replacements.items():
        module, override = model.get_submodule(name), Override(chosen)
        handles += [
            module.register_forward_pre_hook(override.start),
            module.register_forward_hook(override.stop, always_call=True),
        ]
    return handles


def _nodes(graph: tp.DependencyGraph) -> dict[Any, Node]:
    """The graph's nodes by the autograd node that made their output."""
    return {node.grad_fn: node for node in graph.module2node.values() if node.grad_fn is not None}


def _space(graph: tp.DependencyGraph, node: Node) -> Space:
    """The numbering of a node's output channels."""
    return Space(node, graph.get_pruner_of_module(node.module).prune_out_channels)


def map_indices(graph: tp.DependencyGraph, record: Record) -> None:
    """Torch-Pruning's index mappings, from the trace: every channel concatenation sized by its traced inputs
    (Torch-Pruning infers the sizes through the graph, which passes a slice as if it kept every channel, and fails
    where it cannot), and the pieces of every split matched to their readers by the piece each reads (Torch-Pruning
    takes them in the order its trace reached the readers, and maps back from a concatenation of a piece through
    the split before the concatenation: CSPNet's cross-stage concatenation)."""
    for node in graph.module2node.values():
        shape = record.shapes.get(node.grad_fn)
        if node.type == tp.ops.OPTYPE.SPLIT and _split_dim(node.grad_fn) == 1:
            _size_pieces(node)
    for node in graph.module2node.values():
        shape = record.shapes.get(node.grad_fn)
        if node.type == tp.ops.OPTYPE.CONCAT and shape is not None and saved(node.grad_fn, "dim") % len(shape) == 1:
            sizes = _sizes(graph, node, record)
            if len(sizes) == len(node.inputs) and None not in sizes and sum(cast(list[int], sizes)) == shape[1]:
                _map_concatenation(node, cast(list[int], sizes))
    for node in graph.module2node.values():
        update = _UPDATES.get(node.type)
        try:
            if update is not None and not (node.type == tp.ops.OPTYPE.CONCAT and node.module.offsets):
                update(graph, node)
        except (TypeError, ZeroDivisionError):  # a size Torch-Pruning could not infer: the channels stay unmapped
            continue
    for node in graph.module2node.values():
        if node.type == tp.ops.OPTYPE.SPLIT and node.module.offsets is not None:
            _map_pieces(node)


_UPDATES = {
    tp.ops.OPTYPE.CONCAT: index_mapping.update_concat_index_mapping,
    tp.ops.OPTYPE.SPLIT: index_mapping.update_split_index_mapping,
    tp.ops.OPTYPE.RESHAPE: index_mapping.update_reshape_index_mapping,
    tp.ops.OPTYPE.UNBIND: index_mapping.update_unbind_index_mapping,
    tp.ops.OPTYPE.EXPAND: index_mapping.update_expand_index_mapping,
    tp.ops.OPTYPE.SLICE: index_mapping.update_slice_index_mapping,
}


def _map_concatenation(cat: Node, sizes: list[int]) -> None:
    """Map indices between a concatenation and its inputs (the i-th input at the i-th offset)."""
    offsets = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
    cat.module.concat_sizes, cat.module.offsets = sizes, offsets
    done: set[int] = set()
    for i, source in enumerate(cat.inputs):
        for deps, to, reverse in ((cat.dependencies, source, True), (source.dependencies, cat, False)):
            dep = next((d for d in deps if d.target is to and id(d) not in done), None)
            if dep is not None:
                done.add(id(dep))
                dep.index_mapping[1] = concat_mapping(offsets[i : i + 2], reverse)


def _sizes(graph: tp.DependencyGraph, cat: Node, record: Record) -> list[int | None]:
    """The channels of each input of a concatenation, in the order of its inputs in the graph."""
    nodes, sizes = _nodes(graph), []
    for fn, nr in cat.grad_fn.next_functions:
        node = nodes.get(fn)
        if node is None:
            continue
        if node.type == tp.ops.OPTYPE.SPLIT and node.module.split_sizes:
            sizes.append(node.module.split_sizes[nr])
        else:
            sizes.append(record.shapes.get(fn, (None, None))[1])
    return sizes


def _split_dim(grad_fn: Any) -> int:
    """The dim a split's autograd node split."""
    return int(saved(grad_fn, "dim")) % len(saved(grad_fn, "self_sym_sizes"))


def _size_pieces(split: Node) -> None:
    """A split's pieces sized from its autograd node (Torch-Pruning counts one piece per reader)."""
    channels = saved(split.grad_fn, "self_sym_sizes")[1]
    if saved(split.grad_fn, "split_sizes") is not None:
        sizes = list(saved(split.grad_fn, "split_sizes"))
    else:
        size = saved(split.grad_fn, "split_size")
        sizes = [size] * (channels // size) + ([channels % size] if channels % size else [])
    split.module.split_sizes = sizes
    split.module.offsets = [sum(sizes[:k]) for k in range(len(sizes) + 1)]


def _map_pieces(split: Node) -> None:
    """Map each reader of a split to the piece it reads."""
    offsets = split.module.offsets
    for reader in split.outputs:
        pieces = {nr for fn, nr in reader.grad_fn.next_functions if fn is split.grad_fn}
        if len(pieces) != 1 or not split.enable_index_mapping:
            continue
        k = pieces.pop()
        for dep in split.dependencies:
            if dep.target is reader:
                dep.index_mapping[0] = split_mapping(offsets[k : k + 2], False)
        for dep in reader.dependencies:
            if dep.target is split:  # after the reader's own mapping (a concatenation's), which Torch-Pruning swaps
                dep.index_mapping = [
                    dep.index_mapping[1],
                    split_mapping(offsets[k : k + 2], True),
                ]


class _Permutation(NamedTuple):
    """Torch-Pruning index mapping through a fixed permutation of channels: index i goes to perm[i]."""

    perm: tuple[int, ...]

    def __call__(self, idxs: list[HybridIndex]) -> list[HybridIndex]:
        """The mapped indices, each with its root index."""
        return [hybrid_index(self.perm[i.idx], i.root_idx) for i in idxs]


class Shuffle(NamedTuple):
    """A channel shuffle: `view` to [N, g, C/g, ...], transpose of dims 1 and 2, `view` back to [N, C, ...]."""

    split: Call  # the first view
    node: Node  # its graph node
    before: Node  # the graph node before the last view (the transpose, or a copy of it)
    merge: Node  # the graph node of the last view
    groups: int
    channels: int

    def source(self, j: int) -> int:
        """The input channel that output channel j holds."""
        return (j % self.groups) * (self.channels // self.groups) + j // self.groups


def reshapes(graph: tp.DependencyGraph, record: Record) -> list[Shuffle]:
    """Map indices through every reshape that splits the channels into (blocks, positions) or merges them back: a
    channel shuffle (a split, a transpose of the two, a merge) as the permutation it is, returned; any other
    (ResNeSt's radix, SKNet's paths) by position, all blocks' entries of a position together. Torch-Pruning maps
    such a reshape as the identity or a flattening, or divides by zero sizing it."""
    nodes, found = _nodes(graph), list[Shuffle]()
    for call in record.calls:
        node = nodes.get(call.output)
        if call.func not in (Tensor.view, Tensor.reshape, torch.reshape) or node is None:
            continue
        if any(node in (s.node, s.merge) for s in found):
            continue
        split = _factor(call.in_shape, call.out_shapes[0])
        merge = _factor(call.out_shapes[0], call.in_shape)
        shuffle = _shuffle(call, node, record) if split else None
        if shuffle is not None:
            found.append(shuffle)
            _permute(shuffle)
        elif split is not None:
            _positions(node, *split, merge=False)
        elif merge is not None:
            _positions(node, *merge, merge=True)
    return found


def _factor(flat: tuple[int, ...], split: tuple[int, ...]) -> tuple[int, int] | None:
    """(blocks, positions) where `split` is `flat` with its channels (dim 1) split into two or more dims, the last
    being the positions; else None."""
    if len(split) < 3 or len(flat) < 2 or split[0] != flat[0]:
        return None
    for k in range(2, len(split)):
        if math.prod(split[1 : k + 1]) == flat[1] and math.prod(split[k + 1 :]) == math.prod(flat[2:]):
            return (flat[1] // split[k], split[k]) if 1 < split[k] < flat[1] else None
    return None


def _shuffle(call: Call, node: Node, record: Record) -> Shuffle | None:
    """The channel shuffle a channel-splitting reshape starts, if it is one."""
    after = node.outputs[0] if len(node.outputs) == 1 else None
    if after is None or "Transpose" not in type(after.grad_fn).__name__:
        return None
    dims = len(call.out_shapes[0])
    if {saved(after.grad_fn, "dim0") % dims, saved(after.grad_fn, "dim1") % dims} != {1, 2}:
        return None
    while len(after.outputs) == 1 and after.outputs[0].type == tp.ops.OPTYPE.ELEMENTWISE:
        after = after.outputs[0]  # contiguous()
    merge = after.outputs[0] if len(after.outputs) == 1 else None
    if merge is None or record.shapes.get(merge.grad_fn) != tuple(call.in_shape):
        return None
    out = call.out_shapes[0]
    return Shuffle(call, node, after, merge, out[1], out[2] * out[1])


class _Positions(NamedTuple):
    """Torch-Pruning index mapping between channels split into `blocks` of `size` and their positions."""

    blocks: int
    size: int
    reverse: bool  # from positions to channels

    def __call__(self, idxs: list[HybridIndex]) -> list[HybridIndex]:
        """The mapped indices, each with its root index."""
        if self.reverse:
            return [hybrid_index(a * self.size + i.idx, i.root_idx) for i in idxs for a in range(self.blocks)]
        return [hybrid_index(i.idx % self.size, i.root_idx) for i in idxs]


def _positions(node: Node, blocks: int, size: int, merge: bool) -> None:
    """Number a channel-splitting reshape's output by position (its input's channel a·size + b is position b); a
    merging one's input likewise."""
    _unmap(node)
    for other in node.outputs if merge else node.inputs:
        for dep in node.dependencies:
            if dep.target is other:
                dep.index_mapping = [_Positions(blocks, size, reverse=True), None]
        for dep in other.dependencies:
            if dep.target is node:
                dep.index_mapping = [_Positions(blocks, size, reverse=False), None]


def _unmap(node: Node) -> None:
    """Identity index mappings on every dependency to and from the node."""
    for dep in node.dependencies:
        dep.index_mapping = [None, None]
    for other in node.inputs + node.outputs:
        for dep in other.dependencies:
            if dep.target is node:
                dep.index_mapping = [None, None]


def _permute(shuffle: Shuffle) -> None:
    """Map indices through a shuffle: identity into and along it, the permutation at its last view."""
    forward = [0] * shuffle.channels
    for j in range(shuffle.channels):
        forward[shuffle.source(j)] = j
    for node in (shuffle.node, shuffle.merge):
        _unmap(node)
    for dep in shuffle.before.dependencies:
        if dep.target is shuffle.merge:
            dep.index_mapping = [_Permutation(tuple(forward)), None]
    for dep in shuffle.merge.dependencies:
        if dep.target is shuffle.before:
            dep.index_mapping = [_Permutation(tuple(shuffle.source(j) for j in range(shuffle.channels))), None]


def replacements(
    graph: tp.DependencyGraph, record: Record, shuffled: list[Shuffle], cut: dict[Space, list[int]]
) -> dict[str, dict[Site, Replacement]]:
    """For each module, the calls of its forward whose channel counts the cut changes, with their replacements."""
    nodes, result = _nodes(graph), defaultdict[str, dict[Site, Replacement]](dict)
    gathers = {s.split.output: s for s in shuffled}
    merges = {s.merge.grad_fn for s in shuffled}
    for call in record.calls:
        source = nodes.get(call.source)
        if source is None or call.output in merges:
            continue
        removed = cut.get(_space(graph, source), [])
        if call.output in gathers:
            replacement: Replacement | None = _gather(gathers[call.output], removed) if removed else None
        elif channel_dim_args(call) == 1:
            split = nodes.get(call.output)
            replacement = None if split is None else _split(call, cut.get(_space(graph, split), []))
        elif call.func is Tensor.__getitem__:
            replacement = _index(call, removed)
        else:
            replacement = _shape(call, len(removed)) if removed else None
        if replacement is not None:
            result[call.module][call.site] = replacement
    return dict(result)


def _gather(shuffle: Shuffle, removed: list[int]) -> Gather:
    """The gather that puts the kept channels in the order the shuffle gives them in the masked model."""
    gone = set(removed)
    rank = {c: r for r, c in enumerate(c for c in range(shuffle.channels) if c not in gone)}
    return Gather(tuple(rank[shuffle.source(j)] for j in range(shuffle.channels) if shuffle.source(j) in rank))


def _split(call: Call, removed: list[int]) -> Split | None:
    """The split by the sizes its pieces keep."""
    sizes, gone, start, kept = [o[1] for o in call.out_shapes], set(removed), 0, []
    for size in sizes:
        kept.append(size - sum(1 for c in range(start, start + size) if c in gone))
        start += size
    return Split(tuple(kept)) if kept != sizes else None


def _index(call: Call, removed: list[int]) -> Index | None:
    """The slice of channels (a `[:, a:b]` index) with bounds that skip the removed channels."""
    index = call.args[1] if isinstance(call.args[1], tuple) else (call.args[1],)
    if len(call.in_shape) != 4 or len(index) < 2 or index[0] != slice(None) or not isinstance(index[1], slice):
        return None
    start, stop, step = index[1].indices(call.in_shape[1])
    if step != 1:
        return None
    new = slice(start - sum(1 for c in removed if c < start), stop - sum(1 for c in removed if c < stop))
    return Index((index[0], new, *index[2:]))


def _shape(call: Call, removed: int) -> Shape | None:
    """The view or reshape of a [N, C, H, W] or [N, C] map that keeps C in dim 1 (alone, or flattened with the
    spatial dims), with the kept channels there."""
    shape, channels, out = _shape_args(call.args), call.in_shape[1], call.out_shapes[0]
    if len(call.in_shape) not in (2, 4) or len(out) < 2 or out[0] != call.in_shape[0] or shape[1] == -1:
        return None
    if out[1] == channels:
        return Shape(channels - removed)
    spatial = out[1] // channels
    if len(out) == 2 and out[1] == channels * spatial and spatial == math.prod(call.in_shape[2:]):
        return Shape((channels - removed) * spatial)
    return None
