"""CPU (and GPU) latency of ResNet-56, dense and pruned, in eager PyTorch, TorchScript and onnxruntime.

    python benchmarks/latency.py [--repeats 30] [--threads N]

Every configuration is measured in one run, side by side; ratios are against the dense model in eager mode
at the same batch size. Weights are random: latency does not depend on their values. The configurations are
benchmarks/resnet56_configs.py's: paper-1 at the paper's floor widths and rounded to multiples of 8 and 16
(`chip prune --sparsity paper-1 --round-to N`), and hand-set widths near paper-1's FLOPs."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from chipprune.deploy.export import export
from chipprune.files.modelfile import ModelFile
from chipprune.models import create_model
from chipprune.profile import count_flops
from chipprune.pruning.latency import Runner
from resnet56_configs import CONFIGS, configs

BATCHES = (1, 64)


def eager_ms(model: torch.nn.Module, batch: int, repeats: int, device: str = "cpu") -> float:
    """Median milliseconds of one eager PyTorch forward pass (chipprune.pruning.latency.Runner)."""
    return Runner("eager", batch, device=device, repeats=repeats).time(model, (3, 32, 32)).median_ms


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
    parser.add_argument("--configs", default=",".join(CONFIGS), help="configurations of resnet56_configs.py")
    parser.add_argument("--json", help="also write every measurement to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} runs after warm-up\n")
    print("| model | FLOPs | runtime | " + " | ".join(f"batch {b} ms | speed-up" for b in BATCHES) + " |")
    print("|---|---|---|" + "---|---|" * len(BATCHES))
    dense_ms: dict[int, float] = {}
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in configs(args.configs):
            model = create_model("resnet56", CONFIGS[name].widths()).eval()
            mf = ModelFile("resnet56", model, (0.5,) * 3, (0.25,) * 3, [str(i) for i in range(10)])
            flops = count_flops(model, 32)
            onnx_path, ts_path = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}.pt"
            export(mf, onnx_path, "onnx", dynamic_batch=True)
            export(mf, ts_path, "torchscript")
            with torch.no_grad():
                runtimes = {
                    "eager": lambda b, m=model: eager_ms(m, b, args.repeats),
                    "torchscript": lambda b, p=ts_path: eager_ms(torch.jit.load(str(p)), b, args.repeats),
                    "onnxruntime": lambda b, p=onnx_path: onnx_latency(p, b, args.repeats, args.threads),
                }
                for runtime, measure in runtimes.items():
                    cells = []
                    for b in BATCHES:
                        ms = measure(b)
                        if name == "dense" and runtime == "eager":
                            dense_ms[b] = ms
                        rows.append({"config": name, "device": "cpu", "runtime": runtime, "batch": b, "median_ms": ms})
                        cells.append(f"{ms:.2f} | {dense_ms[b] / ms:.2f}×")
                    print(f"| {name} | {flops / 1e6:.1f} M | {runtime} | " + " | ".join(cells) + " |", flush=True)
    if torch.cuda.is_available():
        print(f"\nCUDA ({torch.cuda.get_device_name()}), eager:")
        for name in configs(args.configs):
            model = create_model("resnet56", CONFIGS[name].widths()).cuda()
            ms = {b: eager_ms(model, b, args.repeats, "cuda") for b in (*BATCHES, 256)}
            rows += [
                {"config": name, "device": "cuda", "runtime": "eager", "batch": b, "median_ms": m}
                for b, m in ms.items()
            ]
            print(f"  {name}: " + ", ".join(f"batch {b}: {m:.2f} ms" for b, m in ms.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
