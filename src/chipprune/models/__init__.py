"""The architecture registry: the paper's networks, by name, at full or pruned width."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import cast

from torch import nn

from . import resnet50, resnet_cifar, vgg
from .common import ChannelLayer, RegistryModel


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


def _cifar_resnet(depth: int, presets: dict[str, str] | None = None) -> Arch:
    rates = resnet_cifar.num_rates(depth)
    return Arch(
        build=partial(resnet_cifar.ResNetCifar, depth),
        widths_for_rates=partial(resnet_cifar.widths_for_rates, depth),
        num_rates=rates,
        rate_layout=f"[stem] + [stage-1, stage-2 outputs] + [{rates - 3} block inner rates]",
        input_size=32,
        num_classes=10,
        head="fc",
        finetune_preset="paper-cifar",
        presets=presets or {},
    )


ARCHS: dict[str, Arch] = {
    "resnet20": _cifar_resnet(20),
    "resnet32": _cifar_resnet(32),
    "resnet44": _cifar_resnet(44),
    "resnet56": _cifar_resnet(
        56,
        {
            "paper-1": "[0.]+[0.15]*2+[0.4]*27",
            "paper-2": "[0.]+[0.4]*2+[0.5]*9+[0.6]*9+[0.7]*9",
        },
    ),
    "resnet110": _cifar_resnet(
        110,
        {
            "paper-1": "[0.]+[0.2]*2+[0.3]*18+[0.35]*36",
            "paper-2": "[0.]+[0.22]*2+[0.35]*18+[0.45]*36",
            "paper-3": "[0.]+[0.4]*2+[0.5]*18+[0.65]*36",
        },
    ),
    "vgg16_bn": Arch(
        build=vgg.VGG,
        widths_for_rates=vgg.widths_for_rates,
        num_rates=vgg.NUM_RATES,
        rate_layout="one rate for each of the first 12 convs",
        input_size=32,
        num_classes=10,
        head="classifier.linear2",
        finetune_preset="paper-cifar",
        presets={
            "paper-1": "[0.21]*7+[0.75]*5",
            "paper-2": "[0.3]*7+[0.75]*5",
            "paper-3": "[0.45]*7+[0.78]*5",
        },
    ),
    "resnet50": Arch(
        build=resnet50.ResNet50,
        widths_for_rates=resnet50.widths_for_rates,
        num_rates=resnet50.NUM_RATES,
        rate_layout="[stem] + [stage 1-3 outputs] + [16 block inner rates]",
        input_size=224,
        num_classes=1000,
        head="fc",
        finetune_preset="paper-imagenet",
        presets={
            "paper-1": "[0.]+[0.1]*3+[0.35]*16",
            "paper-2": "[0.]+[0.12]*3+[0.38]*16",
            "paper-3": "[0.]+[0.25]*3+[0.5]*16",
            "paper-4": "[0.]+[0.5]*3+[0.6]*16",
        },
    ),
}


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
