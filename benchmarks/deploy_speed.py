"""Deployment speed: dense and pruned models, float and int8, in eager PyTorch, TorchScript and onnxruntime.

    python benchmarks/deploy_speed.py --data ../shared/data [--threads 2] [--repeats 20] [--out results/deploy-speed]

ResNet-56: the recovery study's parent (results/recovery/parent.safetensors, JPEG CIFAR-10) dense, pruned by CHIP to
paper-1, to paper-1 `--round-to 8`, and to half its onnxruntime latency at batch 64 (`--latency-target 0.5`), each
with BatchNorm re-estimated (`--recalibrate-bn 4`) and not fine-tuned; their int8 models are `chip export --int8`'s
(512 calibration images), and the top-1 of both is measured by its check on all 10,000 test images.
torchvision's resnet50 and mobilenet_v2 at 224 px: random weights (latency only), dense and pruned to half the
FLOPs (L1), int8 calibrated on 32 random images.

Every model and runtime of a family is timed in one run, side by side at each batch size (blocks of runs alternate:
chipprune.pruning.latency.Runner), median of --repeats with the spread. Speed-ups are against the dense float model
on the same runtime at the same batch size. --profile adds onnxruntime's per-operator time for each ResNet-56 at
batch 64. Writes OUT/deploy_speed.json (machine, command, every row), OUT/speedup.png, and prints Markdown tables."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import torch

import chipprune
from chipprune import Flops, Int8Options, Latency, Sparsity
from chipprune.deploy.export import export
from chipprune.deploy.quantize import quantize_onnx
from chipprune.files.modelfile import ModelFile
from chipprune.pruning.latency import Runner

PARENT = "results/recovery/parent.safetensors"
BATCHES = (1, 64)
RUNTIMES = ("eager", "torchscript", "onnxruntime", "onnxruntime int8")


class Variant(NamedTuple):
    """One model of a family: its file, its float and int8 ONNX files, and the top-1 of both where measured."""

    family: str
    name: str
    mf: ModelFile
    onnx: Path
    int8: Path
    float_top1: float | None = None
    int8_top1: float | None = None

    @property
    def macs(self) -> int:
        return chipprune.profile(self.mf).sizes.macs


def resnet56(data: str, folder: Path) -> list[Variant]:
    """The parent and its three pruned models, exported float and int8, with their test top-1."""
    parent = chipprune.load_model(PARENT)
    scores = chipprune.score(parent, data, of="convs")
    models = {
        "dense": parent,
        "paper-1": chipprune.prune(parent, Sparsity("paper-1"), scores=scores, calibration=data, recalibrate_bn=4),
        "paper-1 r8": chipprune.prune(
            parent, Sparsity("paper-1", round_to=8), scores=scores, calibration=data, recalibrate_bn=4
        ),
        "latency 0.5": chipprune.prune(
            parent, Latency(0.5, runtime="onnxruntime", threads=2, batch_size=64), calibration=data, recalibrate_bn=4
        ),
    }
    variants = []
    for name, made in models.items():
        mf = made if isinstance(made, ModelFile) else made.model_file
        stem = folder / name.replace(" ", "-")
        export(mf, stem.with_suffix(".onnx"), "onnx", dynamic_batch=True)
        report = chipprune.export_int8(mf, stem.with_suffix(".int8.onnx"), data, Int8Options(check_images=10_000))
        print(f"resnet56 {name}: top-1 float {report.float_top1:.2f}, int8 {report.int8_top1:.2f}", file=sys.stderr)
        variants.append(
            Variant("resnet56", name, mf, stem.with_suffix(".onnx"), stem.with_suffix(".int8.onnx"),
                    report.float_top1, report.int8_top1)
        )  # fmt: skip
    return variants


def library(arch: str, folder: Path) -> list[Variant]:
    """A torchvision model at 224 px with random weights, dense and at half the FLOPs, exported float and int8."""
    torch.manual_seed(0)
    dense = chipprune.import_model(arch, input_size=224)
    half = chipprune.prune(dense, Flops(0.5), criterion="l1").model_file
    calibration = [torch.rand(8, 3, 224, 224) for _ in range(4)]
    variants = []
    for name, mf in (("dense", dense), ("half FLOPs", half)):
        stem = folder / f"{arch.split(':')[1]}-{name.replace(' ', '-')}"
        export(mf, stem.with_suffix(".onnx"), "onnx", dynamic_batch=True)
        quantize_onnx(stem.with_suffix(".onnx"), stem.with_suffix(".int8.onnx"), calibration)
        variants.append(
            Variant(arch.split(":")[1], name, mf, stem.with_suffix(".onnx"), stem.with_suffix(".int8.onnx"))
        )
    return variants


def timed(variants: list[Variant], batch: int, threads: int, repeats: int, block: int) -> list[dict[str, Any]]:
    """Every variant on every runtime at one batch size, side by side: one row each."""
    size = variants[0].mf.input_size or 32
    x = torch.randn(batch, 3, size, size)
    images = {"images": torch.rand(batch, 3, size, size).numpy()}
    runners = {r: Runner(r, batch, threads, repeats=repeats, warmup=1, block=block) for r in RUNTIMES[:2]}
    onnx = Runner("onnxruntime", batch, threads, repeats=repeats, warmup=1, block=block)
    sessions, keys = [], []
    for v in variants:
        model = v.mf.model.eval()
        sessions += [runners["eager"].session(model, x), runners["torchscript"].session(model, x)]
        sessions += [onnx.onnx_session(str(v.onnx), images), onnx.onnx_session(str(v.int8), images)]
        keys += [(v, r) for r in RUNTIMES]
    timings = onnx.alternate(sessions)
    dense = {r: t.median_ms for (v, r), t in zip(keys, timings, strict=True) if v.name == "dense"}
    dense_float = {**dense, "onnxruntime int8": dense["onnxruntime"]}
    return [
        {"family": v.family, "model": v.name, "runtime": r, "batch": batch, "macs": v.macs, "median_ms": t.median_ms,
         "min_ms": t.min_ms, "max_ms": t.max_ms, "speedup": dense_float[r] / t.median_ms,
         "top1": v.int8_top1 if r.endswith("int8") else v.float_top1}
        for (v, r), t in zip(keys, timings, strict=True)
    ]  # fmt: skip


def operator_ms(path: Path, batch: int, threads: int, runs: int = 10) -> dict[str, float]:
    """onnxruntime's profiler: milliseconds per run spent in each operator type, at `batch`."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"images": torch.rand(batch, 3, 32, 32).numpy()}
        for _ in range(3 + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_run = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    spent: dict[str, float] = defaultdict(float)
    for e in per_run[-len(per_run) * runs // (3 + runs) :]:  # the timed runs, after warm-up
        spent[e["args"]["op_name"]] += e["dur"] / 1000 / runs
    return dict(sorted(spent.items(), key=lambda kv: -kv[1]))


def machine() -> dict[str, Any]:
    """The processor, torch's CPU capability and the versions this ran on."""
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [s.split(":", 1)[1].strip() for s in lines if s.startswith("model name")]
    import onnxruntime

    return {"cpu": names[0] if names else platform.processor(), "capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per model and runtime, both batch sizes side by side."""
    columns = " | ".join(f"b{b} ms (min–max) | speed-up" for b in BATCHES)
    lines = [f"| family | model | MACs | runtime | top-1 | {columns} |", "|---" * (5 + 2 * len(BATCHES)) + "|"]
    keyed = {(r["family"], r["model"], r["runtime"], r["batch"]): r for r in rows}
    for family, model, runtime, _ in [k for k in keyed if k[3] == BATCHES[0]]:
        first = keyed[(family, model, runtime, BATCHES[0])]
        top1 = "" if first["top1"] is None else f"{first['top1']:.2f}"
        cells = [f"{family} | {model} | {first['macs'] / 1e6:.1f} M | {runtime} | {top1}"]
        for b in BATCHES:
            r = keyed[(family, model, runtime, b)]
            cells.append(f"{r['median_ms']:.2f} ({r['min_ms']:.2f}–{r['max_ms']:.2f}) | {r['speedup']:.2f}×")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Speed-up against the fraction of the dense model's MACs kept: one point per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = {(r["family"], r["batch"]): r["macs"] for r in rows if r["model"] == "dense"}
    fig, axes = plt.subplots(1, len(BATCHES), figsize=(6 * len(BATCHES), 4.5), sharey=True)
    for ax, batch in zip(axes, BATCHES, strict=True):
        kept = [k / 100 for k in range(20, 101)]
        ax.plot(kept, [1 / k for k in kept], "k--", lw=1, label="speed-up = 1 / MACs kept")
        for (family, runtime), marker in zip(
            sorted({(r["family"], r["runtime"]) for r in rows}), "os^vD<>ph*P+x1234", strict=False
        ):
            points = [r for r in rows if r["batch"] == batch and (r["family"], r["runtime"]) == (family, runtime)]
            ax.scatter([r["macs"] / dense[(family, batch)] for r in points], [r["speedup"] for r in points],
                       marker=marker, label=f"{family}, {runtime}")  # fmt: skip
        ax.set(title=f"batch {batch}", xlabel="MACs kept (of the dense model's)", ylabel="speed-up (dense float = 1)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="JPEG CIFAR-10, as chip's --data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs of each model (224 px at batch 64: /4)")
    parser.add_argument("--families", default="resnet56,resnet50,mobilenet_v2")
    parser.add_argument("--profile", action="store_true", help="onnxruntime's per-operator time, ResNet-56, batch 64")
    parser.add_argument("--out", type=Path, default=Path("results/deploy-speed"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Random weights shrink activations to denormal floats, which ran mobilenet_v2's eager forward at batch 1 for 3.1 s
    # instead of 40 ms here; trained weights do not, and onnxruntime flushes them anyway.
    torch.set_flush_denormal(True)
    families = args.families.split(",")
    rows: list[dict[str, Any]] = []
    operators: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            variants = (
                resnet56(args.data, Path(tmp)) if family == "resnet56" else library(f"torchvision:{family}", Path(tmp))
            )
            for batch in BATCHES:
                large = family != "resnet56" and batch > 1  # seconds a run: fewer runs, in smaller blocks
                repeats, block = (max(4, args.repeats // 4), 2) if large else (args.repeats, 10)
                rows += timed(variants, batch, args.threads, repeats, block)
                print(f"{family} batch {batch}: timed", file=sys.stderr)
            if args.profile and family == "resnet56":
                for v in variants:
                    operators[v.name] = operator_ms(v.onnx, 64, args.threads)
                    operators[f"{v.name} int8"] = operator_ms(v.int8, 64, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(["python", *sys.argv]), "machine": machine(), "threads": args.threads,
              "rows": rows, "operators_ms": operators}  # fmt: skip
    (args.out / "deploy_speed.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(rows, args.out / "speedup.png")
    print(f"{record['machine']}, {args.threads} threads\n\n{table(rows)}")
    for name, spent in operators.items():
        top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(spent.items())[:6])
        print(f"\nresnet56 {name}, onnxruntime b64, ms per run: total {sum(spent.values()):.2f}; {top}")


if __name__ == "__main__":
    main()
