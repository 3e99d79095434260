"""Per-group budgets by measured sensitivity (issue 28), against the paper's hand-set rates, uniform and global.

    python experiments/sensitivity.py resnet56 [--part baselines|sensitivity|all]   # the ResNet-56 comparison
    python experiments/sensitivity.py library                                       # curve times of two library models
    python experiments/sensitivity.py table                                         # markdown tables of the log

ResNet-56 (the public weights, `chip import --normalize imagenet`) on the JPEG CIFAR-10, pruned to the FLOPs of
paper-1 four ways: paper-1's hand-set rates (`chip prune --sparsity paper-1`), one ratio for every group (`chip prune
--flops-target F`), one global ranking (`--global`), and the widths pruning/sensitivity.py allocates; plus ablations of
the allocation (its floor, its signal) right after BatchNorm re-estimation. Each is evaluated on the 10,000 test
images right after pruning, after BatchNorm re-estimation (4 x 128 training images, as `chip prune --recalibrate-bn
4`, two sample seeds), and after one distilled epoch of 10,000 images (`chip finetune --teacher parent --epochs 1
--train-subset 10000 --warmup-epochs 0 --seed S`, two seeds).

The scores are the CLI's (5 seeded batches of 128 training images, seed 0); the sensitivity sample is the next 256
images of the same seeded order for BatchNorm re-estimation and the 1,024 after them for the loss: disjoint from the
scoring images by construction.

Every result is one JSON line in results/sensitivity/runs.jsonl (the command line or API call, the machine, the load,
wall seconds, metrics), written as soon as it is measured; logged results are skipped, so a killed run goes on where
it stopped. Models and run folders go to runs/sensitivity/ (not committed)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from chipprune.calibrate import recalibrate_bn
from chipprune.data import load_split
from chipprune.files.fileio import sha256
from chipprune.files.modelfile import load_model
from chipprune.models import RegistryModel, rewidth
from chipprune.profile import count_flops, count_params
from chipprune.pruning.allocation import FLOOR, Curve
from chipprune.pruning.graph import group_importance
from chipprune.pruning.sensitivity import Curves, Sample, prune_by_sensitivity, sensitivity_curves, split_sample
from chipprune.training.evaluate import evaluate

OUT = Path("results/sensitivity")
LOG = OUT / "runs.jsonl"
RUNS = Path("runs/sensitivity")
CALIBRATION = (5, 128)  # the CLI's scoring default: batches x images, seed 0
SAMPLE = (256, 1024)  # images after the scoring ones: BatchNorm re-estimation, then the loss
RECAL_BATCHES = 4  # as `chip prune --recalibrate-bn 4`: 4 x 128 images of the seed+1 order
SEEDS = (0, 1)
FINETUNE = ["--teacher", "parent", "--epochs", "1", "--train-subset", "10000", "--warmup-epochs", "0"]
# name -> (signal, floor): the allocation and its ablations
ALLOCATIONS = {
    "sensitivity": ("loss", FLOOR),
    "sensitivity, floor 0.1": ("loss", 0.1),
    "sensitivity, floor 0.5": ("loss", 0.5),
    "sensitivity, top-1 signal": ("top1", FLOOR),
}
BASELINES = ("paper-1", "uniform", "global")
FINETUNED = (*BASELINES, "sensitivity")
LIBRARY = {"torchvision:resnet50": 224, "timm:efficientnet_b0": 224}


# --------------------------------------------------------------------------- log


def machine() -> dict[str, Any]:
    """The processor (from lscpu), the load, and the versions this process runs with."""
    fields = {}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache"):
                fields[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        fields["Model name"] = platform.processor()
    return {
        "lscpu": fields,
        "load_avg_1m": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def read_log() -> list[dict[str, Any]]:
    """The logged rows."""
    return [json.loads(s) for s in LOG.read_text().splitlines() if s.strip()] if LOG.exists() else []


def find(**key: Any) -> dict[str, Any] | None:
    """The first logged row with these values, or None."""
    return next((r for r in read_log() if all(r.get(k) == v for k, v in key.items())), None)


def append(row: dict[str, Any]) -> dict[str, Any]:
    """Log one result (one line, appended: two parts of the study may write at once) and show it."""
    row = {**row, "machine": machine(), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with LOG.open("a") as f:
        f.write(json.dumps(row) + "\n")
    shown = {k: v for k, v in row.items() if k not in ("machine", "curves", "kept")}
    print(json.dumps(shown), file=sys.stderr, flush=True)
    return row


def chip(*args: str, threads: int) -> tuple[dict[str, Any] | None, float, str]:
    """Run one `chip` command with `threads` CPU threads: its --json result, wall seconds and command line."""
    cmd = ["chip", *args]
    line = shlex.join(cmd)
    print(f"$ {line}", file=sys.stderr, flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    begin = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - begin
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {line}\n{proc.stderr[-3000:]}")
    return (json.loads(proc.stdout) if "--json" in args else None), wall, line


# --------------------------------------------------------------------------- ResNet-56


class Setup:
    """The imported model, its data, the scores and the sensitivity sample."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.data, self.threads = args.data, args.threads
        self.model = RUNS / "resnet56.pt"
        if not find(step="import"):
            _, wall, line = chip(
                "import", "--arch", "resnet56", "--weights", args.weights, "--normalize", "imagenet",
                "--out", str(self.model), threads=self.threads,
            )  # fmt: skip
            append({"step": "import", "command": line, "wall_s": wall, "sha256": sha256(self.model)})
        self.mf = load_model(self.model)
        self.heads = [m for m in self.mf.model.modules() if isinstance(m, nn.Linear)]
        self.example = torch.zeros(1, 3, 32, 32)
        self.train = load_split(self.data, "train", progress=False)
        self.test = load_split(self.data, "test", progress=False)
        count, size = CALIBRATION
        scored, sampled = count * size, sum(SAMPLE)
        # The CLI's scoring images (`chip prune --seed 0`: 5 x 128), then the sample's, in the same seeded order.
        self.calibration = [x for x, _ in self.mf.batches(self.train, size, shuffle=True, seed=0, limit=scored)]
        rest = self.mf.batches(self.train, size, shuffle=True, seed=0, limit=scored + sampled, start=count)
        self.sample = split_sample(rest, *SAMPLE)
        self._importance: dict[str, Tensor] | None = None

    @property
    def importance(self) -> dict[str, Tensor]:
        """CHIP's group importance on the calibration images (computed once)."""
        if self._importance is None:
            self._importance = group_importance(
                self.mf.model, self.example, self.calibration, ignored_layers=self.heads
            )
        return self._importance

    def target(self) -> float:
        """The fraction of the dense FLOPs paper-1 keeps."""
        row = find(step="target")
        if row is None:
            dense, _, line_d = chip("profile", str(self.model), "--json", threads=self.threads)
            paper, _, line_p = chip("profile", "--arch", "resnet56", "--sparsity", "paper-1", "--json", threads=1)
            assert dense is not None and paper is not None
            row = append(
                {"step": "target", "commands": [line_d, line_p], "flops_target": paper["flops"] / dense["flops"]}
            )
        return float(row["flops_target"])

    def path(self, config: str) -> Path:
        """The pruned model file of a config."""
        return RUNS / f"r56-{config.replace(', ', '-').replace(' ', '')}.pt"


def prune_baseline(setup: Setup, config: str) -> None:
    """paper-1, uniform or global, through `chip prune`."""
    if find(step="prune", config=config):
        return
    budget = {
        "paper-1": ["--sparsity", "paper-1"],
        "uniform": ["--flops-target", f"{setup.target():.6f}"],
        "global": ["--flops-target", f"{setup.target():.6f}", "--global"],
    }[config]
    out = setup.path(config)
    result, wall, line = chip(
        "prune", str(setup.model), "--data", setup.data, *budget, "--out", str(out), "--json", threads=setup.threads
    )
    assert result is not None
    append({"step": "prune", "config": config, "command": line, "wall_s": wall, **sizes(load_model(out).model)})


def curves(setup: Setup) -> Curves:
    """The sensitivity curves of the ResNet-56 (measured once, then read from the cache), logged once."""
    begin = time.time()
    importance = setup.importance
    scored = time.time() - begin
    found = sensitivity_curves(
        setup.mf.model, setup.example, importance, setup.sample, ignored_layers=setup.heads,
        model_id=sha256(setup.model), cache=RUNS / "cache", progress=True,
    )  # fmt: skip
    if not find(step="curves", model="resnet56"):
        append(
            {
                "step": "curves",
                "model": "resnet56",
                "api": "sensitivity_curves(model, example, group_importance(model, example, 5 x 128 train images, "
                "seed 0), split_sample(the next 256 + 1024), ignored_layers=[fc])",
                "scoring_s": scored,
                "wall_s": found.seconds,
                "points": found.measured,
                "dense": found.dense._asdict(),
                "curves": {g.root: [list(p) for p in g.points] for g in found.groups},
            }
        )
    return found


def prune_sensitivity(setup: Setup, config: str) -> None:
    """The allocation `config` of ALLOCATIONS, by the API, saved as `chip prune` saves a model."""
    if find(step="prune", config=config):
        return
    signal, floor = ALLOCATIONS[config]
    curves(setup)
    target = setup.target()
    begin = time.time()
    pruned = prune_by_sensitivity(
        setup.mf.model, setup.example, setup.importance, setup.sample, target, signal=signal, floor=floor,
        ignored_layers=setup.heads, model_id=sha256(setup.model), cache=RUNS / "cache",
    )  # fmt: skip
    wall = time.time() - begin
    model = rewidth(pruned.model, setup.mf.arch, len(setup.mf.classes))
    parent = {
        "parent": setup.model.name,
        "parent_path": str(setup.model.resolve()),
        "parent_sha256": sha256(setup.model),
    }
    how = {"allocate": "sensitivity", "flops_target": target, "signal": signal, "floor": floor, "criterion": "chip"}
    meta = {**setup.mf.meta, "pruned": {**how, "images": 640, "seed": 0, **parent}}
    dataclasses.replace(setup.mf, model=model, meta=meta).save(setup.path(config))
    append(
        {
            "step": "prune",
            "config": config,
            "api": f"prune_by_sensitivity(model, example, importance, sample, {target:.6f}, signal={signal!r}, "
            f"floor={floor}, ignored_layers=[fc])",
            "wall_s": wall,
            "predicted_damage": pruned.allocation.damage,
            "kept": dict(zip([g.root for g in pruned.curves.groups], pruned.allocation.kept, strict=True)),
            **sizes(model),
        }
    )


def sizes(model: nn.Module) -> dict[str, Any]:
    """Parameters, FLOPs and the widths of a pruned ResNet-56."""
    widths = model.widths if isinstance(model, RegistryModel) else {}
    return {"params": count_params(model), "flops": count_flops(model, 32), "widths": widths}


def evaluate_config(setup: Setup, config: str) -> None:
    """Top-1 on the test split right after pruning and after BatchNorm re-estimation (two sample seeds), and the
    loss on the sensitivity sample after re-estimation (what the allocation predicts)."""
    if find(step="bn", config=config):
        return
    begin = time.time()
    model = load_model(setup.path(config)).model
    row: dict[str, Any] = {"step": "bn", "config": config, "top1": evaluate(model, stream(setup, setup.test))["top1"]}
    for seed in SEEDS:
        recalibrated = copy.deepcopy(model)
        recal = setup.mf.batches(setup.train, 128, shuffle=True, seed=seed + 1, limit=RECAL_BATCHES * 128)
        recalibrate_bn(recalibrated, recal)
        row[f"top1_bn_s{seed}"] = evaluate(recalibrated, stream(setup, setup.test))["top1"]
    sampled = copy.deepcopy(model)
    recalibrate_bn(sampled, setup.sample.recalibration)
    row["sample_loss"] = sample_loss(sampled, setup.sample)
    row["api"] = (
        "evaluate(model, test); recalibrate_bn(copy, 4 x 128 train images of seed S+1) for S in 0, 1; "
        "the loss on the sensitivity sample after re-estimating on its own 2 x 128"
    )
    append({**row, "wall_s": time.time() - begin})


def stream(setup: Setup, split: Any) -> Any:
    """Evaluation batches of a split."""
    return setup.mf.batches(split, 256)


@torch.no_grad()
def sample_loss(model: nn.Module, sample: Sample) -> float:
    """The mean cross-entropy on the sample's evaluation batches."""
    model.eval()
    total = sum(float(nn.functional.cross_entropy(model(x), y, reduction="sum")) for x, y in sample.evaluation)
    return total / sum(len(y) for _, y in sample.evaluation)


def finetune(setup: Setup, config: str, seed: int) -> None:
    """One distilled epoch of 10,000 images."""
    if find(step="finetune", config=config, seed=seed):
        return
    run = RUNS / "ft" / f"{setup.path(config).stem}-s{seed}"
    if run.exists():
        shutil.rmtree(run)  # an unfinished run of a killed job: start it again
    _, wall, line = chip(
        "finetune", str(setup.path(config)), "--data", setup.data, "--out-dir", str(run), *FINETUNE,
        "--seed", str(seed), threads=setup.threads,
    )  # fmt: skip
    last = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()][-1]
    append({"step": "finetune", "config": config, "seed": seed, "command": line, "wall_s": wall, **last})


def resnet56(args: argparse.Namespace) -> None:
    """The parts of the ResNet-56 comparison asked for."""
    setup = Setup(args)
    steps: list[Callable[[], None]] = []
    if args.part in ("baselines", "all"):
        for config in BASELINES:
            steps += [lambda c=config: prune_baseline(setup, c), lambda c=config: evaluate_config(setup, c)]
        steps += [lambda c=c, s=s: finetune(setup, c, s) for s in SEEDS for c in BASELINES]
    if args.part in ("sensitivity", "all"):
        steps.append(lambda: prune_sensitivity(setup, "sensitivity"))
        steps.append(lambda: evaluate_config(setup, "sensitivity"))
        steps += [lambda s=s: finetune(setup, "sensitivity", s) for s in SEEDS]
        for config in ALLOCATIONS:
            steps += [lambda c=config: prune_sensitivity(setup, c), lambda c=config: evaluate_config(setup, c)]
    for step in steps:
        step()


# --------------------------------------------------------------------------- library models


def library(args: argparse.Namespace) -> None:
    """The time the curves take on library models with random weights and random images, at half the FLOPs."""
    for arch, size in LIBRARY.items():
        if find(step="library", arch=arch):
            continue
        path = RUNS / f"{arch.replace(':', '-')}.pt"
        _, _, line = chip("import", "--arch", arch, "--out", str(path), threads=args.threads)
        mf = load_model(path)
        g = torch.Generator().manual_seed(0)
        classes = len(mf.classes)

        def batch(n: int, gen: torch.Generator = g, k: int = classes, side: int = size) -> tuple[Tensor, Tensor]:
            return torch.randn(n, 3, side, side, generator=gen), torch.randint(0, k, (n,), generator=gen)

        example = torch.zeros(1, 3, size, size)
        begin = time.time()
        importance = group_importance(mf.model, example, [batch(8)[0]])
        scored = time.time() - begin
        sample = Sample([batch(8)], [batch(8)])
        begin = time.time()
        pruned = prune_by_sensitivity(
            mf.model, example, importance, sample, 0.5, model_id=sha256(path), cache=RUNS / "cache", progress=True
        )
        wall = time.time() - begin
        append(
            {
                "step": "library",
                "arch": arch,
                "command": line,
                "api": "prune_by_sensitivity(model, example, group_importance(model, example, [8 random images]), "
                "Sample([8 random images], [8 random images]), 0.5)",
                "image_size": size,
                "groups": len(pruned.curves.groups),
                "points": pruned.curves.measured,
                "scoring_s": scored,
                "curves_s": pruned.curves.seconds,
                "wall_s": wall,
                "allocation_s": wall - pruned.curves.seconds,
                "flops_kept": count_flops(pruned.model, size) / count_flops(mf.model, size),
                "predicted_flops_kept": pruned.allocation.fraction,
                "params_kept": count_params(pruned.model) / count_params(mf.model),
            }
        )


# --------------------------------------------------------------------------- tables


def predicted(widths: dict[str, int], found: dict[str, Any]) -> float:
    """The additive model's loss increment for a ResNet-56's widths: each group's curve at the width of its root
    conv (the stem's group at its blocks' width: paper-1 keeps 16 stem channels and 13 in the blocks)."""
    dense = found["dense"]["loss"]
    total = 0.0
    for root, points in found["curves"].items():
        width = widths["layer1.0.conv2" if root == "conv1" else root]
        units = widths_of_parent(root)
        curve = Curve((units, *(p[0] for p in points)), (0.0, *(p[1] - dense for p in points)))
        total += curve.at(width)
    return total


def widths_of_parent(root: str) -> int:
    """The dense width of a ResNet-56 group: 16, 32 or 64 channels by its stage."""
    return 16 if root == "conv1" or root.startswith("layer1") else 32 if root.startswith("layer2") else 64


def table(_: argparse.Namespace) -> None:
    """Markdown tables of the logged ResNet-56 results and library timings."""
    rows = read_log()
    found = next(r for r in rows if r["step"] == "curves")
    print(
        "| allocation | params | FLOPs | top-1 pruned | top-1 BN (s0 / s1) | sample loss BN (predicted) "
        "| top-1 1 epoch (s0 / s1) |"
    )
    print("|---|---|---|---|---|---|---|")
    dense = found["dense"]["loss"]
    for config in (*BASELINES, *ALLOCATIONS):
        pruned = next((r for r in rows if r["step"] == "prune" and r["config"] == config), None)
        bn = next((r for r in rows if r["step"] == "bn" and r["config"] == config), None)
        ft = {r["seed"]: r["test_top1"] for r in rows if r["step"] == "finetune" and r["config"] == config}
        if pruned is None or bn is None:
            continue
        guess = dense + predicted(pruned["widths"], found)
        print(
            f"| {config} | {pruned['params']:,} | {pruned['flops'] / 1e6:.2f} M | {bn['top1']:.2f} | "
            f"{bn['top1_bn_s0']:.2f} / {bn['top1_bn_s1']:.2f} | {bn['sample_loss']:.3f} ({guess:.3f}) | "
            + " / ".join(f"{ft[s]:.2f}" for s in SEEDS if s in ft)
            + " |"
        )
    print(f"\ndense: sample loss {dense:.3f}, top-1 {found['dense']['top1']:.2f} on the sample")
    print(f"curves: {found['points']} points in {found['wall_s']:.0f} s, scoring {found['scoring_s']:.0f} s")
    for r in rows:
        if r["step"] == "library":
            print(
                f"{r['arch']}: {r['groups']} groups, {r['points']} points, curves {r['curves_s']:.0f} s, "
                f"allocation {r['allocation_s']:.1f} s, FLOPs kept {r['flops_kept']:.3f}"
            )


def main() -> None:
    """Run the asked part."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("resnet56", "library", "table"))
    parser.add_argument("--part", choices=("baselines", "sensitivity", "all"), default="all")
    parser.add_argument("--data", default="/work/shared/data")
    parser.add_argument("--weights", default="/work/shared/weights/resnet56-4bfd9763.th")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (1: under a shared load, 2 threads ran ResNet-56 10x slower)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"resnet56": resnet56, "library": library, "table": table}[args.what](args)


if __name__ == "__main__":
    main()
