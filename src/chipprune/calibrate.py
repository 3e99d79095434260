"""Calibration passes: one pass that scores every prunable layer at once, through forward hooks, and the
re-estimation of BatchNorm statistics after pruning.

Under torchrun (a process group initialized), each process scores its share of every batch and the sums are
all-reduced: every process ends with the scores of all the images."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Sized
from typing import NamedTuple, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from tqdm import tqdm

from ._memory import out_of_memory
from .criteria import ActivationCriterion, Criterion
from .data.batching import Batches, share
from .models import ChannelLayer
from .training.distributed import all_reduce, current


class CalibrationError(RuntimeError):
    """Calibration that cannot give meaningful scores (no images, non-finite activations)."""


class Tap(NamedTuple):
    """Where scores are taken: the input or the output feature map of a module, of `channels` channels."""

    module: str
    side: str  # "input" (every call's first argument) or "output"
    channels: int
    channel_dim: int = 1  # -1: channels last, as a linear layer reads them


class LayerScores(NamedTuple):
    """Mean per-channel scores of each prunable conv, and the images they came from (0 for weight criteria)."""

    scores: dict[str, Tensor]
    images: int


class MapScores(NamedTuple):
    """Mean per-channel scores of each tap's map, the images they came from, and the taps that saw the very same
    tensor as an earlier tap of the pass, each mapped to that tap (which alone scored it)."""

    scores: dict[str, Tensor]
    images: int
    same: dict[str, str]


@torch.no_grad()
def score_layers(
    model: nn.Module,
    layers: list[ChannelLayer],
    criterion: Criterion,
    batches: Iterable[tuple[Tensor, Tensor]] = (),
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> LayerScores:
    """Mean per-channel scores of every layer's conv (keyed by conv name), and the images they came from."""
    convs = {layer.conv: cast(nn.Conv2d, model.get_submodule(layer.conv)) for layer in layers}
    if not isinstance(criterion, ActivationCriterion):
        return LayerScores({name: criterion.weight_scores(conv) for name, conv in convs.items()}, 0)
    taps = {layer.conv: Tap(layer.act, "output", convs[layer.conv].out_channels) for layer in layers}
    images = (x for x, _ in batches)
    inputs = Batches(images, len(batches)) if isinstance(batches, Sized) else images  # a progress bar's total
    maps = score_maps(model, taps, criterion, inputs, device=device, progress=progress)
    return LayerScores(maps.scores | {name: maps.scores[first] for name, first in maps.same.items()}, maps.images)


@torch.no_grad()
def score_maps(
    model: nn.Module,
    taps: dict[str, Tap],
    criterion: ActivationCriterion,
    inputs: Iterable[Tensor],
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> MapScores:
    """Mean per-channel scores of the feature map at every tap, in one eval-mode forward pass per batch. A map read
    by several layers (the very same tensor at several taps) is scored once: the later taps keep zeros, and `same`
    maps each to the first.

    2-D maps [N, C] (a Linear's input) are scored as [N, C, 1, 1]: one position per image; channels-last maps
    [N, ..., C] (a Linear's input inside a block, as in ConvNeXt) as [N, C, ...]. A module called several times per
    pass adds every call's map."""
    sums = _MapSums(model, taps, criterion, device)
    model.eval().to(device)
    handles = [sums.attach(name, tap) for name, tap in taps.items()]
    place = current(device)
    count = torch.zeros((), dtype=torch.float64)
    try:
        total = len(inputs) if isinstance(inputs, Sized) else None
        shown = progress and place.is_main
        for x in tqdm(inputs, desc=f"scoring ({criterion.name})", total=total, unit="batch", disable=not shown):
            part = x[share(len(x), place.rank, place.world)]
            if len(part):
                sums.forward(part)
                count += len(part)
    finally:
        for h in handles:
            h.remove()
    for t in (count, *sums.sums.values()):
        all_reduce(t, place)
    images = int(count)
    if images == 0:
        raise CalibrationError("no calibration images")
    return MapScores({name: s / images for name, s in sums.sums.items()}, images, sums.same)


class _MapSums:
    """The running per-channel sums of every tap's scores over a calibration pass, taken inside forward hooks so
    that only one batch's map of one tap is ever held."""

    def __init__(
        self, model: nn.Module, taps: dict[str, Tap], criterion: ActivationCriterion, device: str | torch.device
    ):
        self.model, self.taps, self.criterion, self.device = model, taps, criterion, device
        self.sums = {name: torch.zeros(tap.channels, dtype=torch.float64) for name, tap in taps.items()}
        self.same: dict[str, str] = {}
        self.seen: list[tuple[weakref.ref[Tensor], int, str]] = []  # this pass's maps: the same tensor scored once
        self.chunk = 0  # images per forward pass once memory ran out (0: whole batches)

    def score(self, name: str, fmap: Tensor) -> None:
        """Add one map's scores to its tap's sums, unless an earlier tap of this pass saw the very same tensor."""
        for ref, version, first in self.seen:
            if ref() is fmap and fmap._version == version:  # not modified in place since
                self.same[name] = first
                return
        self.seen.append((weakref.ref(fmap), fmap._version, name))
        if not torch.isfinite(fmap).all():
            raise CalibrationError(f"non-finite activations in {name} during scoring")
        self.sums[name] += self.criterion.batch_sum(_four_d(fmap, self.taps[name].channel_dim))

    def attach(self, name: str, tap: Tap) -> RemovableHandle:
        """The hook that scores the tap's map."""
        module = self.model.get_submodule(tap.module)
        if tap.side == "input":
            return module.register_forward_pre_hook(lambda m, args: self.score(name, args[0]))
        return module.register_forward_hook(lambda m, args, out: self.score(name, out))

    def forward(self, part: Tensor) -> None:
        """One pass over `part`, in smaller pieces if memory runs out: the failed pass's partial sums are undone."""
        if self.chunk and len(part) > self.chunk:
            for piece in part.split(self.chunk):
                self.forward(piece)
            return
        saved = {name: s.clone() for name, s in self.sums.items()}
        try:
            self.model(part.to(self.device))
            return
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            for name, s in saved.items():
                self.sums[name].copy_(s)
        finally:
            self.seen.clear()
        # Out of memory. Retried here, out of the handler: its error (and the maps its traceback holds) is gone, and
        # a failing retry does not chain onto it (nor every halving onto the one before).
        self._halve(len(part))
        self.forward(part)

    def _halve(self, images: int) -> None:
        """Score `images` at once no more: half of them, with a warning; refused at one image."""
        if images == 1:
            raise CalibrationError(
                f"out of memory scoring a single image on {self.device}: free memory, or score on another device"
            )
        self.chunk = (images + 1) // 2
        warnings.warn(
            f"out of memory scoring {images} images at once on {self.device}: going on with {self.chunk} "
            "(the scores are the same; a smaller --batch-size avoids the retry)",
            stacklevel=1,
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _four_d(fmap: Tensor, channel_dim: int) -> Tensor:
    """A map as [N, C, H, W]: channels moved to dim 1, a 2-D map given one position, a 3-D one a trailing dim."""
    if fmap.dim() == 2:
        return fmap[:, :, None, None]
    fmap = fmap.movedim(channel_dim, 1)
    return fmap.unsqueeze(-1) if fmap.dim() == 3 else fmap.flatten(3)


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> int:
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
