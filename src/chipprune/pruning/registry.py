"""From scores to a smaller dense model: choose the channels each conv keeps, then cut the weights."""

from __future__ import annotations

import torch
from torch import Tensor

from ..models import ChannelLayer, RegistryModel

RESIDUAL_MODES = ("coupled", "paper")


def top_channels(scores: Tensor, k: int) -> Tensor:
    """Sorted indices of the k highest scores (ties go to the lower index)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k].sort().values


def select_channels(
    layers: list[ChannelLayer], scores: dict[str, Tensor], widths: dict[str, int], residual: str = "coupled"
) -> dict[str, Tensor]:
    """The channels each conv keeps: its `widths[conv]` best by score.

    In `coupled` mode the layers of one residual group share one ranking (their summed scores), so every
    layer keeps a prefix of it and each residual sum adds matching channels. In `paper` mode each layer
    ranks its own scores, as the authors' code does."""
    if residual not in RESIDUAL_MODES:
        raise ValueError(f"residual mode must be one of {', '.join(RESIDUAL_MODES)}, got {residual!r}")
    ranking = {layer.conv: scores[layer.conv] for layer in layers}
    if residual == "coupled":
        groups: dict[str, list[str]] = {}
        for layer in layers:
            if layer.group:
                groups.setdefault(layer.group, []).append(layer.conv)
        for group, members in groups.items():
            if len({len(scores[m]) for m in members}) > 1:
                raise ValueError(f"the layers of {group} differ in width; prune this model with residual='paper'")
            total = torch.stack([scores[m] for m in members]).sum(0)
            ranking |= {m: total for m in members}
    return {conv: top_channels(s, widths[conv]) for conv, s in ranking.items()}


def prune(
    model: RegistryModel, scores: dict[str, Tensor], widths: dict[str, int], residual: str = "coupled"
) -> RegistryModel:
    """A registry model cut to `widths`, keeping the best-scored channels of each conv."""
    current = model.widths
    wider = [name for name, c in widths.items() if c > current[name]]
    if wider:
        raise ValueError(f"cannot prune {wider[0]} to {widths[wider[0]]} channels: it has {current[wider[0]]}")
    keep = select_channels(model.channel_layers(), scores, widths, residual)
    return model.prune(keep, positional_shortcuts=residual == "paper")
