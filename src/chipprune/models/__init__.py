"""The architecture registry: the paper's networks, by name, at full or pruned width. Each model's file declares
its own entries (ARCHS there); this module joins them."""

from __future__ import annotations

from typing import cast

from torch import nn

from . import resnet50, resnet_cifar, vgg
from .common import Arch, ChannelLayer, RegistryModel

ARCHS: dict[str, Arch] = {**resnet_cifar.ARCHS, **vgg.ARCHS, **resnet50.ARCHS}


def get_arch(name: str) -> Arch:
    """The registry entry for `name`, or a ValueError listing the known ones."""
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}")
    return ARCHS[name]


def create_model(name: str, widths: dict[str, int] | None = None, num_classes: int | None = None) -> RegistryModel:
    """A registry model at full width, or at the given per-conv output widths."""
    arch = get_arch(name)
    return arch.build(widths, num_classes or arch.num_classes)


def rewidth(model: RegistryModel, name: str, num_classes: int) -> RegistryModel:
    """A registry model pruned through the dependency graph, its widths read back from its convs; ValueError where
    it no longer fits its registry description (its file would not load)."""
    model.widths = {conv: cast(nn.Conv2d, model.get_submodule(conv)).out_channels for conv in model.widths}
    rebuilt = dict(create_model(name, model.widths, num_classes).named_parameters())
    if any(v.shape != rebuilt[k].shape for k, v in model.named_parameters()):
        raise ValueError(f"the pruned {name} does not fit its registry description; prune it with --sparsity")
    return model


__all__ = ["ARCHS", "Arch", "ChannelLayer", "RegistryModel", "create_model", "get_arch", "rewidth"]
