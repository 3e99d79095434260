"""CHIP for Torch-Pruning users: an importance that Torch-Pruning's own pruners (MetaPruner) take.

    imp = chipprune.CHIPImportance(calibration, model, example_inputs)
    pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp, pruning_ratio=0.3, ignored_layers=[fc])
    pruner.step()

The first group asked for runs the calibration pass (one streaming pass for every group, as prune_model's) and
every group's importance comes from it, by the group's root layer: the same maps and rule as prune_model."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch_pruning as tp
from torch import Tensor, nn

from ..criteria import Criterion
from .graph import group_importance


class CHIPImportance(tp.importance.Importance):
    """A criterion's importance (CHIP by default) of the channels of each Torch-Pruning group, keyed by its root."""

    def __init__(
        self,
        calibration: Iterable[Any],
        model: nn.Module,
        example_inputs: Tensor,
        *,
        criterion: str | Criterion = "chip",
        ignored_layers: Iterable[nn.Module] = (),
    ) -> None:
        self.calibration, self.model, self.example_inputs = calibration, model, example_inputs
        self.criterion, self.ignored_layers = criterion, list(ignored_layers)
        self.names = {m: n for n, m in model.named_modules()}
        self.scores: dict[str, Tensor] | None = None

    def __call__(self, group: tp.dependency.Group) -> Tensor | None:
        """The importance of the root channels of `group`; None (skipped) for a group chipprune does not prune."""
        if self.scores is None:  # before the pruner changes the model: it asks for every group first
            self.scores = group_importance(
                self.model,
                self.example_inputs,
                self.calibration,
                criterion=self.criterion,
                ignored_layers=self.ignored_layers,
            )
        root = self.names.get(group[0].dep.target.module)
        scores = self.scores.get(root) if root is not None else None
        if scores is None:
            return None
        return scores[group[0].idxs].float()
