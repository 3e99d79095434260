"""Calibration passes: one pass that scores every prunable layer at once, through forward hooks, and the
re-estimation of BatchNorm statistics after pruning.

Under torchrun (a process group initialized), each process scores its share of every batch and the sums are
all-reduced: every process ends with the scores of all the images."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from .criteria import ActivationCriterion, Criterion
from .data.batching import share
from .models import ChannelLayer


class CalibrationError(RuntimeError):
    """Calibration that cannot give meaningful scores (no images, non-finite activations)."""


@torch.no_grad()
def score_layers(model: nn.Module, layers: list[ChannelLayer], criterion: Criterion,
                 batches: Iterable[tuple[Tensor, Tensor]] = (), *, device: str | torch.device = "cpu",
                 progress: bool = False) -> tuple[dict[str, Tensor], int]:
    """Mean per-channel scores of every layer's conv (keyed by conv name), and the images they came from."""
    convs = {layer.conv: cast(nn.Conv2d, model.get_submodule(layer.conv)) for layer in layers}
    if not isinstance(criterion, ActivationCriterion):
        return {name: criterion.weight_scores(conv) for name, conv in convs.items()}, 0
    sums = {name: torch.zeros(conv.out_channels, dtype=torch.float64) for name, conv in convs.items()}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def accumulate(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            # Scored inside the hook: only this batch's map of this layer is ever held.
            if not torch.isfinite(output).all():
                raise CalibrationError(f"non-finite activations in {name} during scoring")
            sums[name] += criterion.batch_sum(output)
        return accumulate

    model.eval().to(device)
    acts = {layer.act: layer.conv for layer in layers}
    handles = [model.get_submodule(act).register_forward_hook(hook(conv)) for act, conv in acts.items()]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    count = torch.zeros((), dtype=torch.float64)
    try:
        for x, _ in tqdm(batches, desc=f"scoring ({criterion.name})", unit="batch", disable=not progress or rank > 0):
            part = x[share(len(x), rank, world)]
            if len(part):
                model(part.to(device))
                count += len(part)
    finally:
        for h in handles:
            h.remove()
    if world > 1:
        for t in (count, *sums.values()):
            on_device = t.to(device)  # NCCL reduces GPU tensors only
            dist.all_reduce(on_device)
            t.copy_(on_device)
    images = int(count)
    if images == 0:
        raise CalibrationError("no calibration images")
    return {conv: s / images for conv, s in sums.items()}, images


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *,
                   device: str | torch.device = "cpu", progress: bool = False) -> int:
    """Re-estimate every BatchNorm's running statistics on `batches` (no weight update); the images used."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise CalibrationError("the model has no BatchNorm layer to recalibrate")
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all the batches, not an exponential one
    model.train().to(device)
    images = 0
    try:
        for x, _ in tqdm(batches, desc="recalibrating BatchNorm", unit="batch", disable=not progress):
            model(x.to(device))
            images += len(x)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    if images == 0:
        raise CalibrationError("no images to recalibrate BatchNorm with")
    return images
