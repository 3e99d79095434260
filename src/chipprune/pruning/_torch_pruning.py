"""Every use of Torch-Pruning's and autograd's private parts, in one place, checked against the tested versions.

Torch-Pruning's dependency graph is a library we use and extend: its index mappings (`_HybridIndex`,
`_ConcatIndexMapping`, `_SplitIndexMapping`) and its parameter names (`graph._param_to_name`) are private, and so
are the values autograd saves on its nodes (`grad_fn._saved_*`), which tell a split's sizes and a concatenation's
dim. A Torch-Pruning release outside TESTED may change any of them: building a graph or touching them then fails
with one line (UntestedVersionError, which `chip` reports as it reports bad input; at import it would be a
traceback)."""

from __future__ import annotations

import functools
from importlib import metadata
from typing import TYPE_CHECKING, Any

import torch_pruning as tp
from torch import nn

if TYPE_CHECKING:
    from torch_pruning._helpers import _HybridIndex as HybridIndex

TESTED = ((1, 6),)  # the (major, minor) releases the tests ran on: 1.6.1


class UntestedVersionError(ImportError):
    """A Torch-Pruning release whose private parts chipprune has not been tested with."""


def check_version(version: str) -> None:
    """Refuse a Torch-Pruning `version` outside TESTED, in one line."""
    release = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if release not in TESTED:
        tested = ", ".join(".".join(map(str, t)) + ".x" for t in TESTED)
        raise UntestedVersionError(
            f"torch-pruning {version} is not a version chipprune is tested with ({tested}): "
            f"pip install 'torch-pruning>=1.6,<1.7'"
        )


@functools.cache
def require_tested() -> None:
    """The installed Torch-Pruning checked, once: before its graph is built (graph.analyse) or its private parts are
    touched."""
    check_version(metadata.version("torch-pruning"))


def hybrid_index(idx: int, root_idx: int) -> HybridIndex:
    """A channel index with the root channel it maps back to, as Torch-Pruning's index mappings pass them."""
    require_tested()
    from torch_pruning._helpers import _HybridIndex

    return _HybridIndex(idx=idx, root_idx=root_idx)


def concat_mapping(offsets: list[int], reverse: bool) -> Any:
    """Torch-Pruning's index mapping of one input of a concatenation at `offsets` (its start and end)."""
    require_tested()
    return tp.dependency.index_mapping._ConcatIndexMapping(offset=offsets, reverse=reverse)


def split_mapping(offsets: list[int], reverse: bool) -> Any:
    """Torch-Pruning's index mapping of one piece of a split at `offsets` (its start and end)."""
    require_tested()
    return tp.dependency.index_mapping._SplitIndexMapping(offset=offsets, reverse=reverse)


def parameter_name(graph: tp.DependencyGraph, parameter: nn.Parameter) -> str:
    """The dotted name of a bare parameter (not a module's weight) in the graph's model."""
    require_tested()
    return str(graph._param_to_name[parameter])


def saved(grad_fn: Any, name: str) -> Any:
    """A value autograd saved on a node (`dim`, `self_sym_sizes`, `split_sizes`, `dim0`, …); None where it has none."""
    require_tested()
    return getattr(grad_fn, f"_saved_{name}", None)
