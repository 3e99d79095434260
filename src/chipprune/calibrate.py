"""One pass over calibration images that scores every prunable layer at once, through forward hooks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .criteria import ActivationCriterion, Criterion
from .models import ChannelLayer


class CalibrationError(RuntimeError):
    """Calibration that cannot give meaningful scores (no images, non-finite activations)."""


@torch.no_grad()
def score_layers(model: nn.Module, layers: list[ChannelLayer], criterion: Criterion,
                 batches: Iterable[tuple[Tensor, Tensor]] = (), *, device: str | torch.device = "cpu",
                 progress: bool = False) -> tuple[dict[str, Tensor], int]:
    """Mean per-channel scores of every layer's conv (keyed by conv name), and the images they came from."""
    if not isinstance(criterion, ActivationCriterion):
        convs = {layer.conv: cast(nn.Conv2d, model.get_submodule(layer.conv)) for layer in layers}
        return {name: criterion.weight_scores(conv) for name, conv in convs.items()}, 0
    sums: dict[str, Tensor] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def accumulate(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            # Scored inside the hook: only this batch's map of this layer is ever held.
            if not torch.isfinite(output).all():
                raise CalibrationError(f"non-finite activations in {name} during scoring")
            batch = criterion.batch_sum(output)
            sums[name] = sums[name] + batch if name in sums else batch
        return accumulate

    model.eval().to(device)
    acts = {layer.act: layer.conv for layer in layers}
    handles = [model.get_submodule(act).register_forward_hook(hook(conv)) for act, conv in acts.items()]
    images = 0
    try:
        for x, _ in tqdm(batches, desc=f"scoring ({criterion.name})", unit="batch", disable=not progress):
            model(x.to(device))
            images += len(x)
    finally:
        for h in handles:
            h.remove()
    if images == 0:
        raise CalibrationError("no calibration images")
    return {conv: s / images for conv, s in sums.items()}, images
