"""The paper's CI procedure, kept plain as the yardstick: one float64 SVD per channel per image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


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
