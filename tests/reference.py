"""Yardsticks kept plain: the paper's CI procedure (one float64 SVD per channel per image), and feature maps
captured whole, the slow way."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn


def reference_ci(a: Tensor, channels: Sequence[int] | None = None) -> Tensor:
    """CI [N, C] (or [N, len(channels)]) of maps [N, C, ...]: ‖A‖* − ‖A with row i zeroed‖*, in float64."""
    a = a.flatten(2).double()
    full = torch.linalg.matrix_norm(a, "nuc")
    out = []
    for i in range(a.shape[1]) if channels is None else channels:
        without = a.clone()
        without[:, i] = 0
        out.append(full - torch.linalg.matrix_norm(without, "nuc"))
    return torch.stack(out, 1)


def captured(model: nn.Module, modules: dict[str, str], side: str, batches: Iterable[tuple[Tensor, Tensor]]
             ) -> dict[str, Tensor]:
    """Every call's input or output map (`side`) of each module, keyed as in `modules` (key: module name), over all
    batches, concatenated."""
    maps: dict[str, list[Tensor]] = {key: [] for key in modules}
    handles = []
    for key, name in modules.items():
        module = model.get_submodule(name)
        if side == "input":
            handles.append(module.register_forward_pre_hook(lambda m, args, key=key: maps[key].append(args[0].clone())))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, key=key: maps[key].append(out.clone())))
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in handles:
        h.remove()
    return {key: torch.cat(m) for key, m in maps.items()}
