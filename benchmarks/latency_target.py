"""Latency-targeted pruning of ResNet-56 beside FLOPs-targeted and hand-set pruning, measured side by side.

    python benchmarks/latency_target.py --model r56.pt --data ../shared/data [--runtime onnxruntime] [--threads 2] \
        [--batch-sizes 1,64] [--targets 0.5,0.7] [--allocations uniform,sensitivity] [--no-finetune] [--json out.json]

Configurations, each made with the documented `chip prune`: paper-1 (`--sparsity paper-1`), `--flops-target 0.52
--round-to 8`, and `--latency-target T --allocate A --runtime RUNTIME --latency-batch-size B` for each target T,
allocation A and batch size B (a target the command refuses is listed with its one-line refusal). Each model is timed
on the runtime at every batch size in this one run, side by side (their runs alternate in blocks; median of
--repeats, with the spread), with its FLOPs and params, and its top-1 on the test split right after pruning, after
BatchNorm re-estimation (as `--recalibrate-bn 4`, on the same model) and after the same short distilled fine-tune
(`chip finetune --teacher parent --epochs 1 --train-subset 10000`). Ratios are against the dense model at the same
batch size."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chipprune.calibrate import recalibrate_bn
from chipprune.data import load_split
from chipprune.files.modelfile import load_model
from chipprune.profile import count_flops, count_params
from chipprune.pruning.latency import Runner


class Refused(Exception):
    """`chip` exited 2: the one line it printed."""


def chip(*args: str) -> dict:
    """`chip ARGS --json`'s result (Refused where it exits 2, exit on any other failure)."""
    proc = subprocess.run(["chip", *args, "--json"], capture_output=True, text=True)
    if proc.returncode == 2:
        raise Refused(proc.stderr.strip().splitlines()[-1])
    if proc.returncode:
        sys.exit(f"chip {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def recalibrated(model: Path, out: Path, data: str) -> None:
    """The pruned model with its BatchNorm statistics re-estimated as `chip prune --recalibrate-bn 4` does it (4
    batches of 128 training images, seed 1), on this very model: a latency search, run twice, need not choose the
    same channels twice."""
    mf = load_model(model)
    stream = mf.batches(load_split(data, "train"), 128, shuffle=True, seed=1, limit=4 * 128)
    recalibrate_bn(mf.model, stream)
    mf.save(out)


def finetuned_top1(model: Path, parent: str, data: str, folder: Path) -> float:
    """Test top-1 after one distilled epoch over 10,000 training images."""
    out = folder / f"ft-{model.stem}"
    cmd = ["chip", "finetune", str(model), "--data", data, "--teacher", parent, "--epochs", "1", "--warmup-epochs",
           "0", "--train-subset", "10000", "--out-dir", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return float(rows[-1]["test_top1"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the dense ResNet-56 model file (the parent and teacher)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--runtime", default="onnxruntime")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--targets", default="0.5,0.7")
    parser.add_argument("--allocations", default="uniform,sensitivity")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-finetune", action="store_true", help="skip the distilled fine-tune column")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    timing = ["--runtime", args.runtime, "--threads", str(args.threads), "--repeats", str(args.repeats)]
    folder = Path(tempfile.mkdtemp(prefix="latency-target-"))
    configs = {
        "paper-1": ["--sparsity", "paper-1"],
        "flops 0.52, round-to 8": ["--flops-target", "0.52", "--round-to", "8"],
        **{
            f"latency {t}, {a}, batch {b}": [
                "--latency-target",
                t,
                "--allocate",
                a,
                "--latency-batch-size",
                str(b),
                *timing,
            ]  # fmt: skip
            for t in args.targets.split(",")
            for b in batches
            for a in args.allocations.split(",")
        },
    }
    rows = [{"config": "dense", "file": Path(args.model), "pruned": {}}]
    refused = []
    for name, how in configs.items():
        out = folder / f"{len(rows)}.pt"
        begin = time.perf_counter()
        try:
            pruned = chip("prune", args.model, *how, "--data", args.data, "--out", str(out))
        except Refused as e:
            refused.append({"config": name, "refused": str(e), "seconds": time.perf_counter() - begin})
            print(json.dumps(refused[-1]), file=sys.stderr, flush=True)
            continue
        recalibrated(out, Path(str(out) + ".bn.pt"), args.data)
        rows.append({"config": name, "file": out, "pruned": pruned, "seconds": time.perf_counter() - begin})
    models = [load_model(row["file"]).model for row in rows]
    for b in batches:  # all configurations side by side, their runs alternating in blocks
        timings = Runner(args.runtime, b, args.threads, repeats=args.repeats).times(models, (3, 32, 32))
        for row, t in zip(rows, timings, strict=True):
            row.setdefault("latency_ms", {})[b] = t._asdict()
    for row, model in zip(rows, models, strict=True):
        row["params"], row["flops"] = count_params(model), count_flops(model, 32)
        row["top1"] = chip("eval", str(row["file"]), "--data", args.data)["top1"]
        if row["config"] != "dense":
            row["top1_bn"] = chip("eval", str(row["file"]) + ".bn.pt", "--data", args.data)["top1"]
            if not args.no_finetune:
                row["top1_ft"] = finetuned_top1(Path(str(row["file"]) + ".bn.pt"), args.model, args.data, folder)
        print(json.dumps({k: v for k, v in row.items() if k not in ("file", "pruned")}), file=sys.stderr, flush=True)
    dense = rows[0]["latency_ms"]
    head = " | ".join(f"batch {b} ms (x dense)" for b in batches)
    print(f"| config | params | FLOPs | {head} | top-1 pruned | + BN | + 1 distilled epoch |")
    print("|---|---|---|" + "---|" * len(batches) + "---|---|---|")
    for r in rows:
        times = " | ".join(
            f"{r['latency_ms'][b]['median_ms']:.2f} ({r['latency_ms'][b]['median_ms'] / dense[b]['median_ms']:.3f})"
            for b in batches
        )
        print(f"| {r['config']} | {r['params']:,} | {r['flops'] / 1e6:.1f} M | {times} | {r['top1']:.2f} | "
              f"{r.get('top1_bn', float('nan')):.2f} | {r.get('top1_ft', float('nan')):.2f} |")  # fmt: skip
    for r in refused:
        print(f"| {r['config']} | refused: {r['refused']} |")
    if args.json:
        kept = [{k: v for k, v in r.items() if k != "file"} for r in rows]
        Path(args.json).write_text(json.dumps(kept + refused, indent=1))


if __name__ == "__main__":
    main()
