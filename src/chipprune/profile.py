"""Model cost: trainable parameters and multiply-accumulates of conv and linear layers (latency: pruning/latency.py)."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

LAYERS = (nn.modules.conv._ConvNd, nn.Linear)  # the layers whose multiply-accumulates are counted


def call_macs(layer: nn.Module, output: Tensor) -> int:
    """Multiply-accumulates of one call of a conv or linear layer that gave `output`."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        return output.numel() * layer.weight[0].numel()  # weight[0]: in_channels / groups × kernel
    return output.numel() * cast(nn.Linear, layer).in_features


def count_params(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(model: nn.Module, input_size: int) -> int:
    """Multiply-accumulates of every conv and linear layer for one input_size×input_size RGB image."""
    return count_macs(model, torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device))


def count_macs(model: nn.Module, example_inputs: Tensor) -> int:
    """Multiply-accumulates of every conv and linear layer in one eval-mode forward pass of `example_inputs`."""
    return sum(layer_macs(model, example_inputs).values())


@torch.no_grad()
def layer_macs(model: nn.Module, example_inputs: Tensor) -> dict[nn.Module, int]:
    """Multiply-accumulates of each conv and linear layer (all its calls) in one eval-mode forward pass."""
    totals: dict[nn.Module, int] = {}

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        totals[module] = totals.get(module, 0) + call_macs(module, output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, LAYERS)]
    was_training = model.training
    try:
        model.eval()
        model(example_inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return totals
