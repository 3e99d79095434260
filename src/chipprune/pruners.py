"""Torch-Pruning pruners for the modules chipprune adds, and the state those modules are traced and pruned in."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import cast

import torch
import torch_pruning as tp
from torch import nn

from .models.resnet_cifar import ChannelShortcut


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


@contextmanager
def traceable(model: nn.Module) -> Iterator[None]:
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
