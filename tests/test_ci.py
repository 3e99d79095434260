import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chipprune.ci import channel_independence, reference_ci

TOL = 1e-6  # the accuracy target: max |error| ≤ TOL·max |CI|, per image


def assert_matches_reference(a: torch.Tensor) -> None:
    """Checks the fast CI [N, C] of a against the paper's procedure on the same values in float64."""
    ref = reference_ci(a.double())
    out = channel_independence(a, reduction="none")
    assert out.dtype == torch.float64 and out.shape == ref.shape and out.device == a.device
    assert torch.isfinite(out).all()
    err = (out.cpu() - ref).abs().amax(1)
    assert (err <= TOL * ref.abs().amax(1)).all(), (err / ref.abs().amax(1)).max().item()


def maps(kind: str, n: int, c: int, length: int, seed: int = 0) -> torch.Tensor:
    """Float64 test maps [n, c, length] of one kind."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, c, length, generator=gen, dtype=torch.float64)
    if kind == "gauss":
        return g
    if kind == "relu":
        return g.relu()
    if kind == "sparse":  # ~7% non-zeros
        return (g - 1.5).relu()
    if kind == "lowrank":  # rank 3, plus its ReLU (full rank but far from well conditioned)
        low = torch.randn(n, c, 3, generator=gen, dtype=torch.float64) @ torch.randn(
            n, 3, length, generator=gen, dtype=torch.float64
        )
        return torch.cat([low, low.relu()])
    if kind == "correlated":  # a strong common map plus a small rank-2 part: CI ≈ σ_max/2C, low rank below
        low = torch.randn(n, c, 2, generator=gen, dtype=torch.float64) @ torch.randn(
            n, 2, length, generator=gen, dtype=torch.float64
        )
        return g[:, :1].abs() + 0.01 * low
    if kind == "duplicated":  # exact copies and a multiple: rank-deficient with tied CIs
        g = g.relu()
        g[:, 1] = g[:, 0]
        g[:, -1] = 3 * g[:, 2]
        return g
    if kind == "dead":
        g = g.relu()
        g[:, ::3] = 0
        return g
    if kind == "scales":  # channels over six orders of magnitude
        return g.relu() * torch.logspace(-3, 3, c, dtype=torch.float64)[:, None]
    raise AssertionError(kind)


KINDS = ["gauss", "relu", "sparse", "lowrank", "correlated", "duplicated", "dead", "scales"]
# C < L, C == L (Gram path, square U), C > L (SVD path, δ > 0), extremes.
SHAPES = [(3, 8, 40), (3, 16, 16), (3, 24, 6), (2, 40, 3), (2, 6, 64)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(kind, shape):
    assert_matches_reference(maps(kind, *shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["gauss", "relu", "lowrank", "dead"])
@pytest.mark.parametrize("shape", [(2, 12, 30), (2, 30, 12)], ids=["c<L", "c>L"])
def test_narrow_dtypes_match_reference_on_their_values(dtype, kind, shape):
    assert_matches_reference(maps(kind, *shape).to(dtype))


def test_larger_layer_shapes():
    # ResNet-56 stage-3 images and a VGG-like C >> L one: reference checked on a few channels only.
    for a in (maps("relu", 2, 64, 64), maps("correlated", 1, 64, 64), maps("relu", 1, 128, 4)):
        out = channel_independence(a, reduction="none")
        channels = [0, 5, 17, int(out[0].argmax()), int(out[0].argmin())]
        ref = reference_ci(a, channels)
        assert ((out[:, channels] - ref).abs().amax(1) <= TOL * out.amax(1)).all()


def test_dead_channels_are_exactly_zero_and_duplicates_tie():
    a = maps("duplicated", 3, 10, 20)
    a[:, 4] = 0
    out = channel_independence(a, reduction="none")
    assert (out[:, 4] == 0).all() and (out[:, [0, 1, 2, 3, 5]] > 0).all()
    torch.testing.assert_close(out[:, 0], out[:, 1], rtol=1e-9, atol=0)
    for c in (30, 3):  # both paths: a single non-zero row has CI = its norm, all others exactly 0
        b = torch.zeros(2, c, 5)
        b[:, 1] = 1.0
        out = channel_independence(b, reduction="none")
        torch.testing.assert_close(out[:, 1], torch.full((2,), 5**0.5, dtype=torch.float64), rtol=1e-8, atol=0)
        assert (out[:, [0, 2]] == 0).all()


def test_ranking_matches_reference_except_ties():
    a = maps("duplicated", 8, 14, 30)
    a[:, [5, 9]] = 0
    fast = channel_independence(a)
    ref = reference_ci(a).mean(0)
    diff = ref[:, None] - ref[None, :]
    distinct = diff.abs() > TOL * ref.abs().max()
    assert (torch.sign(fast[:, None] - fast[None, :]) == torch.sign(diff))[distinct].all()
    assert distinct.sum() < distinct.numel() - len(ref)  # the input does have ties


def test_closed_forms():
    # One channel: CI is the nuclear (= Frobenius) norm. Orthogonal rows: the singular values are the row norms.
    a = torch.randn(3, 1, 7, dtype=torch.float64)
    torch.testing.assert_close(channel_independence(a, "none")[:, 0], a.norm(dim=(1, 2)), rtol=1e-8, atol=0)
    q = torch.linalg.qr(torch.randn(2, 9, 9, dtype=torch.float64)).Q[:, :, :5].mT  # 5 orthonormal rows
    rows = q * torch.tensor([1e-3, 0.5, 1.0, 2.0, 7.0], dtype=torch.float64)[:, None]
    torch.testing.assert_close(channel_independence(rows, "none"), rows.norm(dim=-1), rtol=1e-8, atol=0)
    # L = 1: A is a column, ‖A‖* = ‖A‖, so CI_i = ‖a‖ − √(‖a‖² − a_i²).
    col = torch.randn(2, 6, 1, dtype=torch.float64)
    norm2 = col.square().sum((1, 2))[:, None]
    expected = norm2.sqrt() - (norm2 - col[:, :, 0].square()).sqrt()
    torch.testing.assert_close(channel_independence(col, "none"), expected, rtol=1e-8, atol=0)


def test_rows_whose_removal_drops_the_rank():
    # C > L with only 3 live rows: each removal drops a singular value entirely (δ_i = 0, e_i ∈ range A).
    a = maps("gauss", 4, 12, 5)
    a[:, 3:] = 0
    ref = reference_ci(a)
    torch.testing.assert_close(channel_independence(a, "none"), ref, rtol=1e-8, atol=0)


def test_degenerate_inputs_are_finite():
    for shape in [(2, 5, 3, 3), (1, 1, 1, 1), (2, 7, 1), (1, 1, 9), (3, 4, 4)]:
        out = channel_independence(torch.zeros(shape), reduction="none")
        assert out.shape == shape[:2] and (out == 0).all()
    a = maps("relu", 2, 6, 10)
    a[1] = 0  # one blank image among normal ones
    out = channel_independence(a, reduction="none")
    assert torch.isfinite(out).all() and (out[1] == 0).all() and (out[0] > 0).all()


@pytest.mark.parametrize("scale", [1e-200, 1e-30, 1e30, 1e200])
def test_homogeneous_and_finite_at_extreme_scales(scale):
    for shape in [(2, 6, 20), (2, 20, 6)]:
        a = maps("relu", *shape)
        scaled = a * scale
        out = channel_independence(scaled, reduction="none")
        assert torch.isfinite(out).all() and torch.equal(scaled, a * scale)  # the input is left alone
        torch.testing.assert_close(out / scale, channel_independence(a, reduction="none"), rtol=1e-9, atol=0)


def test_layouts_reductions_and_permutations():
    a = maps("relu", 3, 8, 12).float()
    none = channel_independence(a.reshape(3, 8, 3, 4), reduction="none")
    assert none.shape == (3, 8) and none.dtype == torch.float64
    torch.testing.assert_close(channel_independence(a, reduction="none"), none, rtol=0, atol=0)
    mean = channel_independence(a)
    assert mean.shape == (8,) and mean.dtype == torch.float64
    torch.testing.assert_close(mean, none.mean(0), rtol=1e-15, atol=0)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(channel_independence(a[:, perm], "none"), none[:, perm], rtol=1e-9, atol=0)
    # Images are independent: a batch is the concatenation of its parts.
    torch.testing.assert_close(channel_independence(a[1:], "none"), none[1:], rtol=1e-9, atol=0)
    # Strided (channels-last) and autograd-tracked maps give the same scores, with no graph attached.
    strided = a.reshape(3, 8, 3, 4).to(memory_format=torch.channels_last).requires_grad_()
    out = channel_independence(strided, reduction="none")
    assert not out.requires_grad
    torch.testing.assert_close(out, none, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(5, 8, 40), (5, 40, 3), (2, 8, 40), (1, 8, 40)], ids=str)
def test_threads_share_the_batch_and_give_the_same_scores(shape):
    a = maps("relu", *shape)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = channel_independence(a, "none")
        torch.set_num_threads(3)
        shared = channel_independence(a, "none")
        assert torch.get_num_threads() == 3  # the caller's setting survives the workers' single-threading
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(shared, serial, rtol=1e-12, atol=0)


def test_a_failing_worker_raises_and_restores_the_thread_count(monkeypatch):
    def broken(_: torch.Tensor) -> None:
        raise RuntimeError("LAPACK failed")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(RuntimeError, match="LAPACK failed"):
            channel_independence(maps("relu", 4, 8, 40))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("arg", "reduction", "match"),
    [
        (torch.zeros(4, 5), "mean", "shape"),
        (torch.zeros(1, 2, 3, 4, 5), "mean", "shape"),
        (torch.zeros(0, 3, 4), "mean", "shape"),
        (torch.zeros(2, 0, 4), "none", "shape"),
        (torch.zeros(2, 3, 0), "none", "shape"),
        (torch.zeros(2, 3, 4, dtype=torch.int64), "mean", "floating"),
        (torch.zeros(2, 3, 4), "sum", "reduction"),
    ],
)
def test_bad_arguments(arg, reduction, match):
    with pytest.raises(ValueError, match=match):
        channel_independence(arg, reduction=reduction)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 14),
    length=st.integers(1, 14),
    dead=st.integers(0, 2),
    copies=st.integers(0, 2),
    sign=st.booleans(),
    log_scale=st.floats(-8, 8),
    seed=st.integers(0, 2**31),
)
def test_property_matches_reference(n, c, length, dead, copies, sign, log_scale, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, c, length, generator=gen, dtype=torch.float64)
    a = a if sign else a.relu()
    a[:, torch.randint(c, (copies,), generator=gen)] = a[:, torch.randint(c, (copies,), generator=gen)]
    a[:, torch.randint(c, (dead,), generator=gen)] = 0
    a = a * 10.0**log_scale
    assert_matches_reference(a)
    # CI_i ≥ ‖a_i‖²/2σ_max: exactly the zero rows score 0.
    assert torch.equal(channel_independence(a, "none") > 0, a.ne(0).any(-1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    for shape in [(4, 16, 64), (2, 40, 4)]:
        a = maps("relu", *shape).float()
        out = channel_independence(a.cuda(), reduction="none")
        assert out.device.type == "cuda" and out.dtype == torch.float64
        torch.testing.assert_close(out.cpu(), channel_independence(a, reduction="none"), rtol=1e-8, atol=0)
