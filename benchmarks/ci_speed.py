"""Speed and accuracy of chipprune.ci.channel_independence against the paper's procedure (one SVD per channel).

    python benchmarks/ci_speed.py [--quick]

For each layer shape, on post-ReLU-like float32 maps relu(N(0, 1)), the reference and the fast path are timed
side by side, interleaved round by round so that both see the same load, and the best time of each is kept.
The reference is timed with 1 thread and with all of them, and its faster setting is kept (column "thr"): MKL's
threaded SVD of some small matrices is several times slower than its single-threaded one.
Where the reference over the whole batch would take too long it runs on a subset of images and channels and its
time is scaled linearly in the number of SVDs it does (one per channel per image, plus one per image for ‖A‖*);
such times are marked "scaled". Accuracy is max |fast − reference| / max_i CI_i per image over that subset.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from chipprune.ci import channel_independence, reference_ci

# name, shape [N, C, H, W], reference subset (images, channels) for the full run and for --quick
SHAPES = [
    ("ResNet-56 stage 1", (128, 16, 32, 32), (128, 16), (32, 16)),
    ("ResNet-56 stage 2", (128, 32, 16, 16), (128, 32), (16, 32)),
    ("ResNet-56 stage 3", (128, 64, 8, 8), (128, 64), (32, 64)),
    ("ResNet-50 layer1", (8, 256, 56, 56), (2, 32), (1, 6)),
    ("ResNet-50 layer2", (8, 512, 28, 28), (2, 48), (1, 8)),
    ("ResNet-50 layer4", (8, 2048, 7, 7), (8, 256), (1, 64)),
]


def timed(fn: Callable[[], torch.Tensor], sync: Callable[[], None] = lambda: None) -> tuple[float, torch.Tensor]:
    """Wall time and result of one call."""
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def with_threads(threads: int, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """fn() run with torch (and so MKL) limited to `threads` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def fast(a: torch.Tensor) -> torch.Tensor:
    """The fast path, called the way calibration calls it: per-image CI summed over the batch."""
    return channel_independence(a, reduction="none").sum(0)


def main() -> None:
    """Prints one line per shape for CPU, then for CUDA when there is one."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller reference subsets, fewer rounds")
    parser.add_argument("--cuda-only", action="store_true", help="skip the CPU tables (the GPU run of gpu.sh)")
    parser.add_argument("--toy", action="store_true", help="one small shape and network (gpu.sh --dry-run)")
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)  # ARCH,IMAGES,BATCH,forward|scoring: one memory figure
    args = parser.parse_args()
    if args.peak_of:
        return _print_peak(args.peak_of)
    rounds = 1 if args.toy else 2 if args.quick else 3
    shapes = [(n, (8, *s[1:]), (4, 8), (4, 8)) for n, s, _, _ in SHAPES[:1]] if args.toy else SHAPES
    networks = {device: [("resnet20", 32, 16)] for device in NETWORKS} if args.toy else NETWORKS
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, load average "
        f"{os.getloadavg()[0]:.1f} at start; times are the best of {rounds} interleaved rounds"
    )
    if not args.cuda_only:
        subsets = cpu_table(shapes, args.quick, rounds)
        network_table("cpu", networks, rounds)
    if not torch.cuda.is_available():
        print("\nCUDA: not available, skipped")
        return
    print(f"\nCUDA ({torch.cuda.get_device_name()}): fast path only; error against the same reference subset")
    print(f"{'layer':18} {'maps [N, C, H, W]':18} {'fast':>10} {'max rel err':>12} {'images/s':>9}")
    gen = torch.Generator().manual_seed(0)
    for name, shape, _, quick_subset in shapes:
        a = torch.randn(shape, generator=gen).relu()
        if args.cuda_only:  # no CPU table ran: the reference on the quick subset, for the error column
            n_img, n_ch = quick_subset
            channels = torch.linspace(0, shape[1] - 1, n_ch).round().long().unique().tolist()
            ref = reference_ci(a[:n_img], channels)
        else:
            n_img, channels, ref = subsets[name]
        ci = channel_independence(a.cuda(), reduction="none").cpu()
        t_fast = min(timed(partial(fast, a.cuda()), torch.cuda.synchronize)[0] for _ in range(rounds + 2))
        err = ((ci[:n_img, channels] - ref).abs().amax(1) / ci[:n_img].amax(1)).max().item()
        dims = "x".join(map(str, shape))
        print(f"{name:18} {dims:18} {t_fast * 1e3:7.1f} ms {err:12.1e} {shape[0] / t_fast:9.0f}")
    network_table("cuda", networks, rounds)


def cpu_table(shapes: list, quick: bool, rounds: int) -> dict[str, tuple[int, list[int], torch.Tensor]]:
    """The CPU table: reference and fast path per shape; the reference subset and values of each, by name."""
    header = f"{'layer':18} {'maps [N, C, H, W]':18} {'path':>4} {'reference':>17} {'thr':>3} {'fast':>10} "
    print(f"\nCPU\n{header}{'speed-up':>9} {'max rel err':>12} {'images/s':>9}")
    gen = torch.Generator().manual_seed(0)
    subsets = {}
    for name, shape, full_subset, quick_subset in shapes:
        a = torch.randn(shape, generator=gen).relu()
        n_img, n_ch = quick_subset if quick else full_subset
        ci = channel_independence(a, reduction="none")
        # Evenly spread channels, always including the image's highest CI (the accuracy yardstick).
        channels = sorted(set(torch.linspace(0, shape[1] - 1, n_ch).round().long().tolist()) | {int(ci[0].argmax())})
        t_ref, ref_threads, t_fast = float("inf"), 0, float("inf")
        for _ in range(rounds):
            t_fast = min(t_fast, *(timed(partial(fast, a))[0] for _ in range(3)))  # cheap: best of 3 calls
            for threads in sorted({1, torch.get_num_threads()}):
                t, ref = timed(partial(with_threads, threads, partial(reference_ci, a[:n_img], channels)))
                if t < t_ref:
                    t_ref, ref_threads = t, threads
        scale = shape[0] / n_img * (shape[1] + 1) / (len(channels) + 1)
        err = ((ci[:n_img, channels] - ref).abs().amax(1) / ci[:n_img].amax(1)).max().item()
        mark = "scaled" if scale > 1 else "measured"
        dims = "x".join(map(str, shape))
        path = "eigh" if shape[1] <= shape[2] * shape[3] else "svd"
        print(
            f"{name:18} {dims:18} {path:>4} {t_ref * scale:8.3f} s {mark:>8} {ref_threads:3} {t_fast * 1e3:7.1f} ms "
            f"{t_ref * scale / t_fast:8.0f}x {err:12.1e} {shape[0] / t_fast:9.0f}"
        )
        subsets[name] = (n_img, channels, ref)
    print("reference subsets: " + "; ".join(f"{n} images x {len(c)} channels" for n, c, _ in subsets.values()))
    return subsets


# whole network: arch, calibration images, batch size, on CPU / on CUDA
NETWORKS = {
    "cpu": [("resnet56", 640, 128), ("resnet50", 64, 16)],
    "cuda": [("resnet56", 640, 128), ("resnet50", 640, 64)],
}


def peak_mib(device: str, run: Callable[[], object]) -> tuple[float, float]:
    """Wall time of run() and the memory it adds at its peak: process RSS on CPU, allocator on CUDA."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t, _ = timed(run, torch.cuda.synchronize)
        return t, (torch.cuda.max_memory_allocated() - base) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
    base = _status_kib("VmRSS")
    t, _ = timed(run)
    return t, (_status_kib("VmHWM") - base) / 1024


def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def _pass(device: str, arch: str, images: int, batch: int, scored: bool) -> Callable[[], None]:
    """The plain forward pass or the scoring pass of `arch` over random images."""
    from chipprune.calibrate import score_layers
    from chipprune.criteria import CHIP
    from chipprune.models import ARCHS, create_model

    model = create_model(arch).eval().to(device)
    size = ARCHS[arch].input_size
    data = [(torch.randn(batch, 3, size, size, device=device), torch.zeros(batch)) for _ in range(images // batch)]

    def forward() -> None:
        with torch.no_grad():
            for x, _ in data:
                model(x)

    def scoring() -> None:
        score_layers(model, model.channel_layers(), CHIP(), data, device=device)

    return scoring if scored else forward


def _fresh_peak_mib(arch: str, images: int, batch: int, scored: bool) -> float:
    """The CPU memory one pass adds at its peak, measured in a new process (this script with --peak-of): a process
    that has run either pass before keeps that memory in its allocator, and would show no growth."""
    spec = f"{arch},{images},{batch},{'scoring' if scored else 'forward'}"
    out = subprocess.run([sys.executable, __file__, "--peak-of", spec], check=True, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def _print_peak(spec: str) -> None:
    """For --peak-of: after a one-image warm-up (thread pools, LAPACK), the MiB the pass adds at its peak."""
    arch, images, batch, kind = spec.split(",")
    _pass("cpu", arch, 1, 1, kind == "scoring")()
    print(peak_mib("cpu", _pass("cpu", arch, int(images), int(batch), kind == "scoring"))[1])


def network_table(device: str, networks: dict[str, list[tuple[str, int, int]]], rounds: int) -> None:
    """Whole-network CHIP scoring (forward + CI of every scored layer) against the plain forward pass."""
    print(f"\nWhole network on {device}: scoring (one pass, hooks, CI of every layer) vs the plain forward pass")
    print(
        f"{'model':9} {'images':>6} {'forward':>9} {'scoring':>9} {'time':>6} {'fwd MiB':>8} {'score MiB':>9} "
        f"{'mem':>6}"
    )
    for arch, images, batch in networks[device]:
        forward, scoring = (_pass(device, arch, images, batch, scored) for scored in (False, True))
        forward()  # warm-up: allocator pools and one-time initialisation count for neither side
        fwd = min(peak_mib(device, forward) for _ in range(rounds))
        sc = min(peak_mib(device, scoring) for _ in range(rounds))
        if device == "cpu":  # memory from fresh processes (see _fresh_peak_mib)
            fwd = fwd[0], _fresh_peak_mib(arch, images, batch, scored=False)
            sc = sc[0], _fresh_peak_mib(arch, images, batch, scored=True)
        print(
            f"{arch:9} {images:6} {fwd[0]:8.2f}s {sc[0]:8.2f}s {sc[0] / fwd[0]:5.2f}x {fwd[1]:8.0f} {sc[1]:9.0f} "
            f"{sc[1] / max(fwd[1], 1):5.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
