"""The architecture registry: the paper's networks, by name, at full or pruned width. Each model's file declares
its own entries (ARCHS there); this module joins them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, cast

from torch import Tensor, nn

from . import resnet50, resnet_cifar, vgg
from .common import Arch, ChannelLayer, Modules, RegistryModel

ARCHS: dict[str, Arch] = {**resnet_cifar.ARCHS, **vgg.ARCHS, **resnet50.ARCHS}
MODULES: list[Modules] = [resnet_cifar.MODULES]  # the model modules with custom layers
PRUNERS: dict[type[nn.Module], Any] = {t: p for m in MODULES for t, p in m.pruners.items()}


@contextmanager
def traceable(model: nn.Module) -> Iterator[None]:
    """Within, `model` as Torch-Pruning can trace and prune it (each model module's custom layers made so)."""
    with ExitStack() as stack:
        for m in MODULES:
            stack.enter_context(m.traceable(model))
        yield


def state_problems(model: nn.Module, state: dict[str, Tensor]) -> list[str]:
    """What is wrong with the tensors of a file's custom layers (their maps), for `model`."""
    return [problem for m in MODULES for problem in m.state_problems(model, state)]


def is_structure(model: nn.Module, key: str) -> bool:
    """Whether a state key of `model` holds structure (a custom layer's map), which older files lack."""
    return any(m.is_structure(model, key) for m in MODULES)


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


__all__ = [
    "ARCHS", "Arch", "ChannelLayer", "Modules", "PRUNERS", "RegistryModel", "create_model", "get_arch",
    "is_structure", "rewidth", "state_problems", "traceable",
]  # fmt: skip
