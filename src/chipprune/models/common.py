"""What every registry architecture shares: its description of prunable layers, weight slicing, and the entry it
has in the registry."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


class RegistryModel(nn.Module):
    """A registry architecture: per-conv output widths, its prunable layers, and its own surgery."""

    widths: dict[str, int]  # conv name -> output channels

    def channel_layers(self) -> list[ChannelLayer]:
        """Every prunable conv, in forward order."""
        raise NotImplementedError

    def prune(self, keep: dict[str, Tensor], positional_shortcuts: bool = False) -> RegistryModel:
        """A smaller dense copy keeping, per conv, the output channels `keep[conv]` (sorted; missing = all)."""
        raise NotImplementedError


@dataclass(frozen=True)
class ChannelLayer:
    """A prunable conv: its name, the module whose output is its post-activation map, its residual group."""

    conv: str
    act: str
    group: str | None = None  # layers of one group are added together through identity shortcuts


def with_all_kept(keep: dict[str, Tensor], widths: dict[str, int]) -> dict[str, Tensor]:
    """`keep`, completed with every conv it does not name keeping all its channels."""
    return {name: torch.arange(c) for name, c in widths.items()} | keep


def paper_width(channels: int, rate: float) -> int:
    """Channels kept at a pruning rate, with the paper's arithmetic (floor)."""
    return int(channels * (1 - rate))


@torch.no_grad()
def take(dst: nn.Module, src: nn.Module, out: Tensor | None = None, inp: Tensor | None = None) -> None:
    """Copy src's parameters and buffers into dst, keeping output channels `out` and input channels `inp`."""
    for (name, d), s in zip(dst.state_dict().items(), src.state_dict().values(), strict=True):
        if s.dim() == 0:  # BatchNorm's num_batches_tracked
            d.copy_(s)
            continue
        if out is not None:
            s = s.index_select(0, out)
        if inp is not None and s.dim() > 1 and name == "weight":
            s = s.index_select(1, inp)
        d.copy_(s)


@dataclass(frozen=True)
class Arch:
    """How to build one architecture and read the paper's sparsity lists for it."""

    build: Callable[..., RegistryModel]  # (widths: dict[str, int] | None, num_classes: int) -> model
    widths_for_rates: Callable[[list[float]], dict[str, int]]
    num_rates: int
    rate_layout: str  # what the rates mean, for error messages and docs
    input_size: int
    num_classes: int
    head: str  # the classifier's module name (its `.weight` in a state dict gives the class count)
    finetune_preset: str  # chip finetune's default hyperparameters (train.PRESETS)
    presets: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Modules:
    """What generic code (the dependency graph, the model-file reader) needs of a model module's custom layers."""

    pruners: dict[type[nn.Module], Any]  # Torch-Pruning's pruner of each custom layer type
    traceable: Callable[[nn.Module], AbstractContextManager[None]]  # the model as Torch-Pruning traces and prunes it
    state_problems: Callable[[nn.Module, dict[str, Tensor]], list[str]]  # what is wrong with a file's custom tensors
    is_structure: Callable[[nn.Module, str], bool]  # whether a state key holds structure (a map), not weights
