"""Budgets at one FLOPs count: the paper's hand-set configuration against dependency-graph pruning to the same
FLOPs, local and global scope, with and without round_to 8. Top-1 right after pruning and after re-estimating the
BatchNorm statistics (4 training batches of 128, as `chip prune --recalibrate-bn 4`), and CPU latency.

    python experiments/budgets.py [--model runs/issue2/resnet56.pt] [--data ../shared/data] [--no-latency]

The model file comes from `chip import --arch resnet56 --weights ../shared/weights/resnet56-4bfd9763.th --out X`.
Calibration: the CLI's default 640 training images (5 seeded batches of 128), scored once for all the graph configs.
Writes results/budgets.json and prints a markdown table."""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from torch import nn

from chipprune import sparsity
from chipprune.calibrate import recalibrate_bn, score_layers
from chipprune.criteria import CHIP
from chipprune.data import batches, load_split
from chipprune.evaluate import evaluate
from chipprune.fileio import save_json
from chipprune.graph import group_importance, prune_model
from chipprune.modelfile import load_model
from chipprune.profile import count_flops, count_params, measure_latency
from chipprune.surgery import prune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/issue2/resnet56.pt")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--preset", default="paper-1", help="the hand-set configuration whose FLOPs all configs match")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the latency runs")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per batch size")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--out", default="results/budgets.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    mf = load_model(args.model)
    model, size = mf.model.eval(), 32
    train, test = load_split(args.data, "train"), load_split(args.data, "test")

    def stream(split, batch_size=256, **kwargs):
        return batches(split, batch_size, mean=mf.mean, std=mf.std, image_size=size, **kwargs)

    calibration = list(stream(train, 128, shuffle=True, seed=0, limit=640))

    t = time.time()
    scores, _ = score_layers(model, model.channel_layers(), CHIP(), calibration)
    configs: dict[str, nn.Module] = {
        "dense": model, args.preset: prune(model, scores, sparsity.widths(mf.arch, args.preset), "coupled")}
    print(f"registry scoring and pruning: {time.time() - t:.0f}s")
    target = count_flops(configs[args.preset], size) / count_flops(model, size)
    example = torch.zeros(1, 3, size, size)
    t = time.time()
    with warnings.catch_warnings(record=True) as caught:  # the classifier-only last stage: reported below
        warnings.simplefilter("always")
        importance = group_importance(model, example, calibration)
    print(f"graph scoring: {time.time() - t:.0f}s; " + "; ".join(str(w.message) for w in caught))
    for scope in ("local", "global"):
        for round_to in (None, 8):
            t = time.time()
            name = f"{scope}" + (f", round_to {round_to}" if round_to else "")
            configs[name] = prune_model(model, example, [], flops_target=target, scope=scope, round_to=round_to,
                                        importance=importance)
            print(f"{name}: pruned in {time.time() - t:.0f}s")

    rows = []
    for name, m in configs.items():
        row = {"config": name, "params": count_params(m), "flops": count_flops(m, size), **evaluate(m, stream(test))}
        if name != "dense":
            recalibrated = copy.deepcopy(m)
            recalibrate_bn(recalibrated, stream(train, 128, shuffle=True, seed=1, limit=512))
            row["top1_bn"] = evaluate(recalibrated, stream(test))["top1"]
        if not args.no_latency:
            torch.set_num_threads(args.threads)
            row["latency_ms"] = {b: measure_latency(m, size, b, repeats=args.repeats)["median_ms"] for b in (1, 64)}
            row["threads"] = args.threads
            torch.set_num_threads(1)
        rows.append(row)
        print(row)
    save_json({"model": args.model, "flops_target": target, "rows": rows}, args.out)
    print("| configuration | params | FLOPs | top-1 % | top-1 % after BN re-estimation | latency b=1 (ms) | "
          "latency b=64 (ms) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lat = r.get("latency_ms", {})
        nan = float("nan")
        print(f"| {r['config']} | {r['params']:,} | {r['flops'] / 1e6:.1f} M | {r['top1']:.2f} | "
              f"{r.get('top1_bn', nan):.2f} | {lat.get(1, nan):.2f} | {lat.get(64, nan):.1f} |")


if __name__ == "__main__":
    main()
