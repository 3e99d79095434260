"""Channel independence (CI): how much each channel adds to the nuclear norm of a layer's feature maps.

For one image with maps A (C channels × L positions), CI_i = ‖A‖* − ‖A with row i zeroed‖*. The paper takes one
SVD per channel; here one eigendecomposition per image gives every channel's CI exactly: to ~1e-9 of the largest
CI, ~1e-7 at worst when many singular values sit near √ε·σ_max (e.g. exactly low-rank maps rounded to float32).
Let G = AAᵀ have eigenvalues λ_k (the squared singular values of A) and eigenvectors V, w_ik = V_ik², and let μ_j
be the eigenvalues of G without row and column i, plus a 0. Then, because ∫_0^∞ λ/(s² + λ) ds = (π/2)√λ,

    CI_i = Σ_k √λ_k − Σ_j √μ_j = (2/π) ∫_0^∞ g_i(s) ds,   g_i(s) = t·(d/dt) log φ_i(t) at t = s²,

where φ_i(t) = Π_j (μ_j + t)/Π_k (λ_k + t) = t·[(G + t)⁻¹]_ii = t·Σ_k w_ik/(λ_k + t) (Cramer's rule). So

    g_i(s) = Σ_k w_ik λ_k/(λ_k + t)² / Σ_k w_ik/(λ_k + t):

the μ are never needed, and g is a ratio of sums of positive terms (no cancellation, no roots to find), two
matrix products over a grid of nodes s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial

import torch
from torch import Tensor

# Trapezoid step in log s. Each term of g is a sech in log s, so the rule converges geometrically: its error,
# at most 4·exp(−π²/h)·√(1 + (2π/h)²)·|√λ_k − √μ_k| per k, stays below 1.3e-9·CI_i for every channel.
_STEP = 0.4
# Nodes run from s = σ_max·_HIGH, above which g = ‖a_i‖²/s²·(1 + O(σ_max²/s²)), down to s = σ_max·_LOW/C, below
# which g is flat but for singular values smaller still: these may cost s·g ≤ s, while max_i CI_i ≥ σ_max/2C.
_LOW, _HIGH = 1e-9, 1e3
# Gram eigenvalues are accurate to ~ε·λ_max only, so those below this fraction of λ_max are recomputed from A.
_SMALL = 1e-4
# Rounding level of 1 − Σ_k U_ik² for orthonormal columns U.
_NOISE = 1e-14


@cache
def _pool(workers: int) -> ThreadPoolExecutor:
    """One long-lived pool per thread count; each worker runs torch (and so LAPACK) on one thread."""
    # A worker left at torch's default would open an OpenMP team of its own, whose threads keep spinning after
    # each call and slow every later LAPACK call and forward pass by up to 10x.
    return ThreadPoolExecutor(
        workers, thread_name_prefix="chipprune-ci", initializer=torch.set_num_threads, initargs=(1,)
    )


def _per_image(decompose: Callable[[Tensor], tuple[Tensor, ...]], x: Tensor) -> tuple[Tensor, ...]:
    """decompose(x) for a batch of matrices x, the batch shared among torch's CPU threads."""
    # torch runs a batched eigh/svd as one LAPACK call per matrix, in turn, and matrices this small gain little
    # from threads inside LAPACK: on CPU every thread decomposes its own share instead (1.3-2x on 2 cores).
    threads = torch.get_num_threads()
    workers = min(threads, len(x))
    if x.device.type != "cpu" or workers < 2:
        return decompose(x)
    torch.set_num_threads(1)  # while it waits, this thread's own OpenMP team would compete with the workers
    try:
        parts = list(_pool(workers).map(decompose, x.tensor_split(workers)))
    finally:
        torch.set_num_threads(threads)
    return tuple(torch.cat(t) for t in zip(*parts, strict=True))


def _spectrum(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eigenvalues λ [N, K] of AAᵀ, their weights w [N, C, K] and ‖a_i‖² [N, C], from float64 maps A [N, C, L]."""
    if x.shape[1] > x.shape[2]:
        # More channels than positions: AAᵀ has C − L zero eigenvalues, and only their total weight matters,
        # δ_i = 1 − Σ_k U_ik² over the thin SVD's U (from the L×L Gram AᵀA, δ would be lost to cancellation).
        u, s, _ = _per_image(partial(torch.linalg.svd, full_matrices=False), x)
        w = u.square()
        delta = 1 - w.sum(-1, keepdim=True)
        # δ_i = 0 when removing row i drops the rank; its rounding noise (~1e-16) would cost √δ ≈ 1e-8 of CI_i.
        w = torch.cat([w, torch.where(delta > _NOISE, delta, 0)], -1)
        return torch.cat([s.square(), s.new_zeros(len(s), 1)], -1), w, x.square().sum(-1)
    # Otherwise the C×C Gram is the small side, and one eigh of it is all the work there is.
    gram = x @ x.mT
    lam, v = _per_image(torch.linalg.eigh, gram)
    # A tiny Gram eigenvalue is off by ~ε·λ_max, i.e. its singular value by up to √ε·σ_max, which would swamp the
    # CI of low-rank maps; ‖v_kᵀA‖² computed from A itself is off by ~ε·σ_max only. eigh sorts λ ascending.
    n_small = int((lam < _SMALL * lam[:, -1:]).sum(-1).max())
    lam = torch.cat([(v[:, :, :n_small].mT @ x).square().sum(-1), lam[:, n_small:]], -1)
    return lam, v.square(), gram.diagonal(dim1=1, dim2=2)


def _integrate(lam: Tensor, w: Tensor, norm2: Tensor) -> Tensor:
    """CI [N, C] = (2/π) ∫ g ds by the trapezoid rule in log s, from the output of _spectrum."""
    n_nodes = math.ceil(math.log(_HIGH / _LOW * w.shape[1]) / _STEP) + 1
    steps = torch.arange(n_nodes, dtype=torch.float64, device=lam.device)
    s = lam.amax(-1, keepdim=True).sqrt() * torch.exp(math.log(_HIGH) - _STEP * steps)  # [N, M], decreasing
    t = s.square()
    r = (lam[:, :, None] + t[:, None]).reciprocal_()  # [N, K, M]
    sg = (w @ (lam[:, :, None] * r.square() * s[:, None])) / (w @ r)  # s_m·g(s_m), s_m in the small factor
    # Nodes beyond the grid, summed in closed form: above, g = ‖a_i‖²/s²; below, g is flat (its limit as s → 0).
    tails = (norm2 / s[:, :1] + sg[:, :, -1]) / math.expm1(_STEP)
    return (2 * _STEP / math.pi) * (sg.sum(-1) + tails)  # ds = s·d(log s)


def channel_independence(a: Tensor, reduction: str = "mean") -> Tensor:
    """CI of every channel of feature maps [N, C, H, W] or [N, C, L]: float64 [C] (mean) or [N, C] (none)."""
    if a.dim() not in (3, 4) or a.numel() == 0:
        raise ValueError(f"expected non-empty feature maps [N, C, H, W] or [N, C, L], got shape {tuple(a.shape)}")
    if not a.is_floating_point():
        raise ValueError(f"expected floating-point feature maps, got {a.dtype}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    # float64 throughout: a float32 Gram, even of ReLU maps, was off by up to 2e-4 of max CI once they are
    # ill-conditioned (square or low-rank), to save under a millisecond per batch.
    x = a.detach().flatten(2).double()  # a score, not a training signal: no graph through eigh/svd
    # CI is positively homogeneous. Squares of narrower dtypes always fit in float64; float64 maps are scaled
    # to max |a| = 1 so that theirs neither overflow nor underflow.
    scale = torch.ones(1, 1, 1, dtype=torch.float64, device=a.device)
    if a.dtype == torch.float64:
        scale = x.abs().amax((1, 2), keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        x = x / scale
    lam, w, norm2 = _spectrum(x)
    # A zero row leaves the spectrum unchanged: its CI is exactly 0, not rounding noise.
    ci = torch.where(norm2 > 0, _integrate(lam, w, norm2) * scale[:, 0], 0)
    return ci.mean(0) if reduction == "mean" else ci


def reference_ci(a: Tensor, channels: Sequence[int] | None = None) -> Tensor:
    """CI [N, C] (or [N, len(channels)]) of maps [N, C, ...] by the paper's procedure, one float64 SVD per channel
    per image: the yardstick the tests and benchmarks/ci_speed.py hold the fast path to."""
    a = a.flatten(2).double()
    full = torch.linalg.matrix_norm(a, "nuc")
    out = []
    for i in range(a.shape[1]) if channels is None else channels:
        without = a.clone()
        without[:, i] = 0
        out.append(full - torch.linalg.matrix_norm(without, "nuc"))
    return torch.stack(out, 1)
