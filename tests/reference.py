"""A yardstick kept plain: feature maps captured whole, the slow way (the CI yardstick is chipprune.ci.reference_ci)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


def captured(
    model: nn.Module, modules: dict[str, str], side: str, batches: Iterable[tuple[Tensor, Tensor]]
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
