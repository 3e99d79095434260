"""Budgets at one FLOPs count: the paper's hand-set configuration against dependency-graph pruning to the same
FLOPs, local and global scope, with and without round_to 8. Top-1 right after pruning and after re-estimating the
BatchNorm statistics (4 training batches of 128, as `chip prune --recalibrate-bn 4`), and CPU latency.

    python experiments/budgets.py --model MODEL [--data ../shared/data] [--no-latency]

MODEL: the public ResNet-56, from `chip import --arch resnet56 --weights ../shared/weights/resnet56-4bfd9763.th
--out MODEL`.
Calibration: the CLI's default 640 training images (5 seeded batches of 128), scored once for all the graph configs.
Writes results/budgets.json and prints a markdown table."""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from chipprune.calibrate import recalibrate_bn, score_layers
from chipprune.criteria import CHIP
from chipprune.data import ImageSplit, batches, load_split
from chipprune.files.fileio import save_json
from chipprune.files.modelfile import ModelFile, load_model
from chipprune.profile import count_flops, count_params
from chipprune.pruning import sparsity
from chipprune.pruning.graph import group_importance, prune_model
from chipprune.pruning.latency import Runner
from chipprune.pruning.registry import prune
from chipprune.training.evaluate import evaluate

SIZE = 32  # CIFAR images


def parse_args() -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the model file to prune (see above)")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--preset", default="paper-1", help="the hand-set configuration whose FLOPs all configs match")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the latency runs")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per batch size")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--out", default="results/budgets.json")
    return parser.parse_args()


def stream(mf: ModelFile, split: ImageSplit, batch_size: int = 256, **options: Any) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of `split` normalized for `mf`."""
    return batches(split, batch_size, mean=mf.mean, std=mf.std, image_size=SIZE, **options)


def budget_configs(
    mf: ModelFile, preset: str, calibration: list[tuple[Tensor, Tensor]]
) -> tuple[dict[str, nn.Module], float]:
    """The dense model, the preset, and the graph configs at the preset's FLOPs; that FLOPs fraction."""
    model = mf.model
    t = time.time()
    scores, _ = score_layers(model, model.channel_layers(), CHIP(), calibration)
    configs: dict[str, nn.Module] = {
        "dense": model,
        preset: prune(model, scores, sparsity.widths(mf.arch, preset), "coupled"),
    }
    print(f"registry scoring and pruning: {time.time() - t:.0f}s")
    target = count_flops(configs[preset], SIZE) / count_flops(model, SIZE)
    example = torch.zeros(1, 3, SIZE, SIZE)
    t = time.time()
    with warnings.catch_warnings(record=True) as caught:  # the classifier-only last stage: reported below
        warnings.simplefilter("always")
        importance = group_importance(model, example, calibration)
    print(f"graph scoring: {time.time() - t:.0f}s; " + "; ".join(str(w.message) for w in caught))
    for scope in ("local", "global"):
        for round_to in (None, 8):
            t = time.time()
            name = f"{scope}" + (f", round_to {round_to}" if round_to else "")
            configs[name] = prune_model(
                model, example, [], flops_target=target, scope=scope, round_to=round_to, importance=importance
            )
            print(f"{name}: pruned in {time.time() - t:.0f}s")
    return configs, target


def measure(
    name: str, m: nn.Module, mf: ModelFile, train: ImageSplit, test: ImageSplit, args: argparse.Namespace
) -> dict[str, Any]:
    """Size, top-1 (and after BatchNorm re-estimation, if pruned) and latency of one config."""
    row = {"config": name, "params": count_params(m), "flops": count_flops(m, SIZE), **evaluate(m, stream(mf, test))}
    if name != "dense":
        recalibrated = copy.deepcopy(m)
        recalibrate_bn(recalibrated, stream(mf, train, 128, shuffle=True, seed=1, limit=512))
        row["top1_bn"] = evaluate(recalibrated, stream(mf, test))["top1"]
    if not args.no_latency:
        row["latency_ms"] = {
            b: Runner("eager", b, args.threads, repeats=args.repeats).time(m, (3, SIZE, SIZE)).median_ms
            for b in (1, 64)
        }
        row["threads"] = args.threads
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    nan = float("nan")
    lines = [
        "| configuration | params | FLOPs | top-1 % | top-1 % after BN re-estimation | latency b=1 (ms) | "
        "latency b=64 (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lat = r.get("latency_ms", {})
        lines.append(
            f"| {r['config']} | {r['params']:,} | {r['flops'] / 1e6:.1f} M | {r['top1']:.2f} | "
            f"{r.get('top1_bn', nan):.2f} | {lat.get(1, nan):.2f} | {lat.get(64, nan):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Prune, measure, write --out and print the table."""
    args = parse_args()
    torch.set_num_threads(1)
    mf = load_model(args.model)
    mf.model.eval()
    train, test = load_split(args.data, "train"), load_split(args.data, "test")
    calibration = list(stream(mf, train, 128, shuffle=True, seed=0, limit=640))
    configs, target = budget_configs(mf, args.preset, calibration)
    rows = []
    for name, m in configs.items():
        rows.append(measure(name, m, mf, train, test, args))
        print(rows[-1])
    save_json({"model": args.model, "flops_target": target, "rows": rows}, args.out)
    print(table(rows))


if __name__ == "__main__":
    main()
