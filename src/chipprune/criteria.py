"""Channel importance criteria: CHIP, HRank, L1 and random, behind one small interface each.

A criterion scores the output channels of each prunable conv, higher meaning keep. Activation criteria
see the post-activation feature maps of the calibration images; weight criteria see the conv alone."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .ci import channel_independence


@runtime_checkable
class ActivationCriterion(Protocol):
    """Scores channels from calibration feature maps."""

    name: str

    def batch_sum(self, fmap: Tensor) -> Tensor:
        """Per-channel float64 score summed over the images of one batch of maps [N, C, H, W]."""
        ...


@runtime_checkable
class WeightCriterion(Protocol):
    """Scores channels from a conv's weights."""

    name: str

    def weight_scores(self, conv: nn.Conv2d) -> Tensor:
        """Per-output-channel float64 score."""
        ...


Criterion = ActivationCriterion | WeightCriterion


class CHIP:
    """Channel independence: the drop in the feature maps' nuclear norm when the channel is removed."""

    name = "chip"

    def batch_sum(self, fmap: Tensor) -> Tensor:
        """Summed CI over the batch."""
        return channel_independence(fmap, reduction="none").sum(0).cpu()


class HRank:
    """HRank (Lin et al. 2020): the rank of each channel's feature map."""

    name = "hrank"

    def batch_sum(self, fmap: Tensor) -> Tensor:
        """Summed matrix rank over the batch."""
        return torch.linalg.matrix_rank(fmap.float()).sum(0).double().cpu()


class L1:
    """The L1 norm of each filter's weights (Li et al. 2017)."""

    name = "l1"

    def weight_scores(self, conv: nn.Conv2d) -> Tensor:
        """Per-filter L1 norm."""
        return conv.weight.detach().abs().flatten(1).sum(1).double().cpu()


class Random:
    """Uniform random scores, seeded: the baseline every criterion must beat."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def weight_scores(self, conv: nn.Conv2d) -> Tensor:
        """One uniform draw per filter."""
        return torch.rand(conv.out_channels, generator=self.generator, dtype=torch.float64)


CRITERIA = ("chip", "hrank", "l1", "random")


def get_criterion(name: str, seed: int = 0) -> Criterion:
    """A criterion by name; `seed` drives the random one."""
    if name == "random":
        return Random(seed)
    table: dict[str, type[CHIP | HRank | L1]] = {"chip": CHIP, "hrank": HRank, "l1": L1}
    if name not in table:
        raise ValueError(f"unknown criterion {name!r}; known: {', '.join(CRITERIA)}")
    return table[name]()
