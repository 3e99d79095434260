"""Top-1 and top-5 accuracy of a classifier over a stream of batches."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .precision import FLOAT32, Precision


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    device: str | torch.device = "cpu",
    precision: Precision = FLOAT32,
    progress: bool = False,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent, and the number of images."""
    device = torch.device(device)
    model.eval().to(device)
    memory_format = torch.channels_last if precision.channels_last else torch.contiguous_format
    correct1 = correct5 = images = 0
    for x, y in tqdm(batches, desc="evaluating", unit="batch", disable=not progress):
        with precision.autocast(device):
            logits = model(x.to(device).contiguous(memory_format=memory_format))
        y = y.to(device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(1).sum())
        images += len(y)
    if images == 0:
        raise ValueError("no images to evaluate")
    return {"top1": 100.0 * correct1 / images, "top5": 100.0 * correct5 / images, "images": images}
