"""CPU (and GPU) latency of ResNet-56, dense and pruned, in eager PyTorch, TorchScript and onnxruntime.

    python benchmarks/latency.py [--repeats 30] [--threads N]

Every configuration is measured in one run, side by side; ratios are against the dense model in eager mode
at the same batch size. Weights are random: latency does not depend on their values. `paper-1 rounded`
is paper-1 with every width rounded to the nearest multiple of 8 (13 -> 16, 27 -> 24, 9 -> 8, 38 -> 40): about
the same FLOPs, in widths that vectorize well."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from chipprune.export import export
from chipprune.modelfile import ModelFile
from chipprune.models import create_model
from chipprune.models.resnet_cifar import full_widths
from chipprune.profile import count_flops, measure_latency
from chipprune.sparsity import widths

BATCHES = (1, 64)


def configurations() -> dict[str, dict[str, int] | None]:
    """Widths of each benchmarked ResNet-56."""
    paper1 = widths("resnet56", "paper-1")
    full = full_widths(56)
    rounded = {name: min(full[name], max(8, round(c / 8) * 8)) for name, c in paper1.items()}
    return {"dense": None, "paper-1": paper1, "paper-1 rounded": rounded, "paper-2": widths("resnet56", "paper-2")}


def onnx_latency(path: Path, batch: int, repeats: int, threads: int) -> float:
    """Median milliseconds of one onnxruntime run."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = torch.rand(batch, 3, 32, 32).numpy()
    for _ in range(3):
        session.run(None, {"images": x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"images": x})
        times.append(1000 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} runs after warm-up\n")
    print("| model | FLOPs | runtime | " + " | ".join(f"batch {b} ms | speed-up" for b in BATCHES) + " |")
    print("|---|---|---|" + "---|---|" * len(BATCHES))
    dense_ms: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, w in configurations().items():
            model = create_model("resnet56", w).eval()
            mf = ModelFile("resnet56", model, (0.5,) * 3, (0.25,) * 3, [str(i) for i in range(10)])
            flops = count_flops(model, 32)
            onnx_path, ts_path = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}.pt"
            export(mf, onnx_path, "onnx", dynamic_batch=True)
            export(mf, ts_path, "torchscript")
            with torch.no_grad():
                runtimes = {
                    "eager": lambda b, m=model: measure_latency(m, 32, b, repeats=args.repeats)["median_ms"],
                    "torchscript": lambda b, p=ts_path: measure_latency(
                        torch.jit.load(str(p)), 32, b, repeats=args.repeats
                    )["median_ms"],
                    "onnxruntime": lambda b, p=onnx_path: onnx_latency(p, b, args.repeats, args.threads),
                }
                for runtime, measure in runtimes.items():
                    cells = []
                    for b in BATCHES:
                        ms = measure(b)
                        if name == "dense" and runtime == "eager":
                            dense_ms[b] = ms
                        cells.append(f"{ms:.2f} | {dense_ms[b] / ms:.2f}×")
                    print(f"| {name} | {flops / 1e6:.1f} M | {runtime} | " + " | ".join(cells) + " |", flush=True)
    if torch.cuda.is_available():
        print(f"\nCUDA ({torch.cuda.get_device_name()}), eager:")
        for name, w in configurations().items():
            model = create_model("resnet56", w).cuda()
            cells = [
                f"batch {b}: {measure_latency(model, 32, b, repeats=args.repeats)['median_ms']:.2f} ms"
                for b in (*BATCHES, 256)
            ]
            print(f"  {name}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
