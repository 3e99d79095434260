"""Top-1 right after pruning (no fine-tuning), per criterion and residual mode, through the `chip` CLI.

    python experiments/prune_no_finetune.py MODEL --data DATA [--out results/prune_no_finetune.json]

Scores each activation criterion once (`chip score`), prunes every configuration from those scores
(`chip prune --scores`), evaluates each model (`chip eval`), and prints a markdown table."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "inner only": "[0.]+[0.]*2+[0.4]*27",
    "paper-1": "[0.]+[0.15]*2+[0.4]*27",
}
RUNS = [("chip", 0), ("hrank", 0), ("l1", 0), ("random", 0), ("random", 1), ("random", 2)]


def chip(*args: str) -> dict:
    """Run one chip command with --json and return its result."""
    out = subprocess.run(["chip", *args, "--json"], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="results/prune_no_finetune.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dense = chip("eval", args.model, "--data", args.data)
        rows.append({"config": "dense", "criterion": "-", "seed": None, "residual": "-", **_pick(dense)})
        scores = {}
        for criterion in ("chip", "hrank"):
            path = f"{tmp}/{criterion}.json"
            t = time.time()
            subprocess.run(["chip", "score", args.model, "--data", args.data, "--criterion", criterion,
                            "--out", path], check=True, capture_output=True)
            scores[criterion] = path
            print(f"scored {criterion} in {time.time() - t:.1f}s", file=sys.stderr)
        for config, rates in CONFIGS.items():
            # with the stage outputs unpruned the two residual modes select the same channels
            for residual in ("coupled",) if config == "inner only" else ("coupled", "paper"):
                for criterion, seed in RUNS:
                    out = f"{tmp}/{criterion}-{seed}-{residual}.pt"
                    source = (["--scores", scores[criterion]] if criterion in scores
                              else ["--criterion", criterion, "--seed", str(seed)])
                    pruned = chip("prune", args.model, "--sparsity", rates, "--residual", residual, *source,
                                  "--out", out)
                    result = chip("eval", out, "--data", args.data)
                    rows.append({"config": config, "criterion": criterion, "seed": seed, "residual": residual,
                                 "params": pruned["params"], "flops": pruned["flops"], **_pick(result)})
                    print(rows[-1], file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print("| configuration | residual | criterion | seed | top-1 % | top-5 % |\n|---|---|---|---|---|---|")
    for r in rows:
        seed = "" if r["seed"] is None or r["criterion"] != "random" else r["seed"]
        print(f"| {r['config']} | {r['residual']} | {r['criterion']} | {seed} | {r['top1']:.2f} | {r['top5']:.2f} |")


def _pick(result: dict) -> dict:
    return {k: result[k] for k in ("top1", "top5", "images")}


if __name__ == "__main__":
    main()
