"""Reproduce the CHIP paper's ResNet-56 claims on JPEG CIFAR-10, one subcommand per step.

    python experiments/reproduce.py baseline --arch resnet56   # adapt the public weights: 1 epoch of chip finetune
    python experiments/reproduce.py scores                     # chip score, CHIP and HRank, 640 images, seed 0
    python experiments/reproduce.py prune                      # stage a (right after pruning), b (--recalibrate-bn 4)
    python experiments/reproduce.py finetune                   # stage c: the same short fine-tuning for every model
    python experiments/reproduce.py stability                  # CI rankings on 4 disjoint calibration sets
    python experiments/reproduce.py calibration                # top-1 against the number of calibration images
    python experiments/reproduce.py baseline --arch resnet20
    python experiments/reproduce.py all [--deadline HH:MM]     # all of the above, in order of importance
    python experiments/reproduce.py latency [--threads 1,2]    # CPU latency, batch 1 and 64 (run on a quiet machine)
    python experiments/reproduce.py no-finetune                # stage a from the public weights, not the adapted base
    python experiments/reproduce.py knobs                      # distillation (A, T) and bf16 vs fp32, 1-epoch recovery

The recovery study (5 epochs over all training images, the matrix of issue 25) is experiments/recovery.py.

Every step calls the documented `chip` commands through subprocess (with OMP_NUM_THREADS=1 unless set), appends one
JSON line per result to results/reproduce/*.jsonl (with the command lines and wall seconds), and skips results
already logged, so a killed run continues where it stopped. Model files and run folders go to runs/reproduce/.
`no-finetune` instead runs in full each time and writes one JSON list, results/prune_no_finetune.json, and a
markdown table."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from chipprune.models import ARCHS

RUNS = Path("runs/reproduce")
OUT = Path("results/reproduce")
BASE = RUNS / "r56-base" / "best.pt"  # the ResNet-56 adapted to the JPEG images: the parent of every pruned model
WEIGHTS = {"resnet56": "resnet56-4bfd9763.th", "resnet20": "resnet20-12fca82f.th"}

# the paper's ResNet-56 configurations (the registry's presets), and one that prunes only the blocks' inner convs
CONFIGS = {**ARCHS["resnet56"].presets, "inner-only": "[0.]+[0.]*2+[0.4]*27"}
CRITERIA = [("chip", 0), ("hrank", 0), ("l1", 0), ("random", 0), ("random", 1), ("random", 2)]
ACTIVATION = ("chip", "hrank")  # scored once on the calibration images, then reused with --scores
# (config, residual mode) in order of importance. With the stage outputs unpruned (inner-only) both modes keep the
# same channels and build the same network, so it runs once.
GROUPS = [
    ("paper-1", "coupled"),
    ("inner-only", "coupled"),
    ("paper-2", "coupled"),
    ("paper-1", "paper"),
    ("paper-2", "paper"),
]
RECAL_BATCHES = 4  # stage b: --recalibrate-bn 4 (x 128 training images)
# Stage c and the baseline ran in float32, before `--amp auto` made bf16 the default on this CPU.
FT_ARGS = ["--preset", "paper-cifar", "--epochs", "1", "--warmup-epochs", "0", "--train-subset", "5000", "--seed", "0"]
FT_ARGS += ["--amp", "off"]
BASE_FT_ARGS = ["--preset", "paper-cifar", "--epochs", "1", "--warmup-epochs", "0", "--lr", "0.01", "--seed", "0"]
BASE_FT_ARGS += ["--amp", "off"]
RECOVERY = Path("results/recovery")
# The knobs of a short recovery of the CHIP paper-1 ResNet-56: one epoch over 10,000 training images each.
KNOB_ARGS = ["--preset", "paper-cifar", "--epochs", "1", "--warmup-epochs", "0", "--train-subset", "10000"]
KD_GRID = [(0.5, 2.0), (0.5, 4.0), (0.9, 2.0), (0.9, 4.0)]  # (--kd-weight, --kd-temperature)
SEEDS = (0, 1, 2)
CALIB_SIZES = {16: (1, 16), 64: (1, 64), 128: (1, 128), 640: (5, 128), 2560: (20, 128)}  # N: (batches, batch size)
CALIB_SEEDS = (0, 1)
CALIB_CONFIGS = ("paper-1", "inner-only")
NO_FT_GROUPS = [("inner-only", "coupled"), ("paper-1", "coupled"), ("paper-1", "paper")]
NO_FT_OUT = Path("results/prune_no_finetune.json")


class Deadline(Exception):
    """The --deadline has passed: stop before the next unit of work."""


class Ctx:
    """Command-line settings shared by the steps."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.data = args.data
        self.shared = Path(args.data).parent
        self.deadline: float | None = None
        if getattr(args, "deadline", None):
            hh, mm = (int(v) for v in args.deadline.split(":"))
            now = datetime.now(timezone.utc)
            end = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
            self.deadline = end.timestamp() if end > now else end.timestamp() + 86400

    def check(self) -> None:
        """Raise Deadline once the --deadline has passed."""
        if self.deadline is not None and time.time() > self.deadline:
            raise Deadline


# --------------------------------------------------------------------------- helpers


def chip(*args: str, env: dict[str, str] | None = None) -> tuple[dict[str, Any] | None, float, str]:
    """Run one `chip` command; its --json result (if asked for), wall seconds and command line."""
    cmd = ["chip", *args]
    line = shlex.join(cmd)
    print(f"$ {line}", file=sys.stderr, flush=True)
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {line}\n{proc.stderr[-3000:]}")
    return (json.loads(proc.stdout) if "--json" in args else None), wall, line


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines log; none if it does not exist."""
    return [json.loads(s) for s in path.read_text().splitlines() if s.strip()] if path.exists() else []


def append(path: Path, row: dict[str, Any]) -> None:
    """Log one result with its finishing time, and show it without the command lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {**row, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    shown = {k: v for k, v in row.items() if k not in ("commands", "command")}
    print(json.dumps(shown), file=sys.stderr, flush=True)


def find(path: Path, **key: Any) -> dict[str, Any] | None:
    """The first logged row with these values, or None."""
    return next((r for r in read_jsonl(path) if all(r.get(k) == v for k, v in key.items())), None)


def logged(path: Path, **key: Any) -> bool:
    """Whether a row with these values is logged."""
    return find(path, **key) is not None


def sizes(pruned: dict[str, Any]) -> dict[str, Any]:
    """Params, FLOPs and FLOPs reduction of a `chip prune --json` or `chip profile --json` result."""
    return {k: pruned[k] for k in ("params", "flops", "flops_reduction")}


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch metrics of a `chip finetune` run."""
    return read_jsonl(run_dir / "metrics.jsonl")


def finetune(model: Path, run_dir: Path, ctx: Ctx, extra: list[str]) -> tuple[dict[str, Any], float, str]:
    """A fresh `chip finetune` run: its last epoch's metrics, wall seconds and command line."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished run of a killed job: start it again
    _, wall, line = chip("finetune", str(model), "--data", ctx.data, "--out-dir", str(run_dir), *extra)
    return metrics(run_dir)[-1], wall, line


def evaluate(model: Path, ctx: Ctx) -> tuple[dict[str, Any], float, str]:
    """`chip eval --json` on the test split: its result, wall seconds and command line."""
    result, wall, line = chip("eval", str(model), "--data", ctx.data, "--json")
    assert result is not None
    return result, wall, line


def imported(arch: str, ctx: Ctx) -> Path:
    """The public weights of `arch` as a model file, imported on first use."""
    path = RUNS / f"{arch}.pt"
    if not path.exists():
        chip("import", "--arch", arch, "--weights", str(ctx.shared / "weights" / WEIGHTS[arch]), "--out", str(path))
    return path


def score(model: Path, out: Path, ctx: Ctx, *args: str) -> tuple[float, str]:
    """`chip score` of `model` into `out` (options in `args`): wall seconds and command line."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _, wall, line = chip("score", str(model), "--data", ctx.data, *args, "--out", str(out))
    return wall, line


def score_file(criterion: str, folder: Path = RUNS / "scores") -> Path:
    """Where the scores of an activation criterion go."""
    return folder / f"{criterion}.json"


def source_args(criterion: str, seed: int, scores: Path = RUNS / "scores") -> list[str]:
    """`--scores` of an activation criterion (scored once, in the folder `scores`), else `--criterion --seed`."""
    if criterion in ACTIVATION:
        return ["--scores", str(score_file(criterion, scores))]
    return ["--criterion", criterion, "--seed", str(seed)]


def model_path(config: str, mode: str, criterion: str, seed: int, stage: str) -> Path:
    """The pruned model file of one configuration, mode, criterion, seed and stage."""
    return RUNS / "models" / f"{config}-{mode}-{criterion}-{seed}-{stage}.pt"


def prune_from(
    model: Path, config: str, mode: str, source: list[str], out: Path, *extra: str
) -> tuple[dict[str, Any], float, str]:
    """`chip prune --json` of `model` to a configuration and residual mode: its result, wall seconds, command line."""
    out.parent.mkdir(parents=True, exist_ok=True)
    result, wall, line = chip(
        "prune",
        str(model),
        "--sparsity",
        CONFIGS[config],
        "--residual",
        mode,
        *source,
        *extra,
        "--out",
        str(out),
        "--json",
    )
    assert result is not None
    return result, wall, line


def prune(config: str, mode: str, criterion: str, seed: int, stage: str, ctx: Ctx) -> tuple[dict[str, Any], float, str]:
    """chip prune from the adapted baseline; stage b re-estimates BatchNorm on RECAL_BATCHES training batches."""
    recal = ["--recalibrate-bn", str(RECAL_BATCHES), "--data", ctx.data] if stage == "b" else []
    return prune_from(
        BASE, config, mode, source_args(criterion, seed), model_path(config, mode, criterion, seed, stage), *recal
    )


def need(path: Path, what: str) -> None:
    """Stop with the step to run first if `path` is missing."""
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `python experiments/reproduce.py {what}` first")


# --------------------------------------------------------------------------- steps


def step_baseline(ctx: Ctx, arch: str) -> None:
    """Import the public weights, evaluate them, and adapt them to the JPEG images with one epoch of fine-tuning."""
    log = OUT / "baselines.jsonl"
    public = imported(arch, ctx)
    if not logged(log, arch=arch, stage="imported"):
        ctx.check()
        r, wall, line = evaluate(public, ctx)
        append(
            log,
            {
                "arch": arch,
                "stage": "imported",
                "top1": r["top1"],
                "top5": r["top5"],
                "wall_s": wall,
                "commands": [line],
            },
        )
    run_dir = RUNS / ("r56-base" if arch == "resnet56" else f"{arch}-base")
    if not (run_dir / "best.pt").exists() and logged(log, arch=arch, stage="adapted"):  # logged by an earlier machine
        ctx.check()
        finetune(public, run_dir, ctx, BASE_FT_ARGS)  # the same seeded command remakes the model the logs describe
    if not logged(log, arch=arch, stage="adapted"):
        ctx.check()
        wall_file = run_dir / "wall_s.json"
        line = shlex.join(
            ["chip", "finetune", str(public), "--data", ctx.data, "--out-dir", str(run_dir), *BASE_FT_ARGS]
        )
        if wall_file.exists() and (run_dir / "best.pt").exists():  # finished, but not logged (started by hand)
            m, wall = metrics(run_dir)[-1], json.loads(wall_file.read_text())["wall_s"]
        else:
            m, wall, line = finetune(public, run_dir, ctx, BASE_FT_ARGS)
            wall_file.write_text(json.dumps({"wall_s": wall}) + "\n")
        dest = OUT / f"baseline-{arch}"
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "config.json"):
            shutil.copy(run_dir / name, dest / name)
        append(
            log,
            {
                "arch": arch,
                "stage": "adapted",
                "epochs": m["epoch"],
                "top1": m["test_top1"],
                "top5": m["test_top5"],
                "train_loss": m["train_loss"],
                "images_per_s": m["images_per_s"],
                "wall_s": wall,
                "model": str(run_dir / "best.pt"),
                "commands": [line],
            },
        )


def step_scores(ctx: Ctx) -> None:
    """Score the adapted baseline once per activation criterion (640 images: 5 batches of 128, seed 0)."""
    need(BASE, "baseline")
    log = OUT / "scores.jsonl"
    for criterion in ACTIVATION:
        if logged(log, criterion=criterion) and score_file(criterion).exists():
            continue
        ctx.check()
        wall, line = score(BASE, score_file(criterion), ctx, "--criterion", criterion, "--seed", "0")
        (OUT / "scores").mkdir(parents=True, exist_ok=True)
        shutil.copy(score_file(criterion), OUT / "scores" / f"{criterion}.json")
        append(log, {"criterion": criterion, "images": 640, "seed": 0, "wall_s": wall, "commands": [line]})


def write_configs() -> None:
    """Per-layer widths, params and FLOPs of every configuration (for the kept-channels plot and the tables)."""
    from chipprune.pruning import sparsity

    rows: dict[str, Any] = {}
    for name, rates in [("dense", None), *CONFIGS.items()]:
        args = ["profile", "--arch", "resnet56", "--json"] + (["--sparsity", rates] if rates else [])
        result, _, line = chip(*args)
        assert result is not None
        widths = sparsity.widths("resnet56", rates or "[0.]*30")
        rows[name] = {"sparsity": rates, "widths": widths, **result, "command": line}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "configs.json").write_text(json.dumps(rows, indent=1) + "\n")


def groups(selected: str | None) -> list[tuple[str, str]]:
    """The (config, mode) groups named in `selected` (config:mode,…), in GROUPS order; all if none."""
    if not selected:
        return GROUPS
    wanted = [tuple(g.split(":")) for g in selected.split(",")]
    return [g for g in GROUPS if g in wanted]


def step_prune(ctx: Ctx, selected: str | None = None) -> None:
    """Stages a and b for every configuration, residual mode, criterion and seed."""
    need(BASE, "baseline")
    for criterion in ACTIVATION:
        need(score_file(criterion), "scores")
    if not (OUT / "configs.json").exists():
        write_configs()
    log = OUT / "runs.jsonl"
    for config, mode in groups(selected):
        for criterion, seed in CRITERIA:
            for stage in ("a", "b"):
                key = {"config": config, "mode": mode, "criterion": criterion, "seed": seed, "stage": stage}
                if logged(log, **key):
                    continue
                ctx.check()
                pruned, wall_p, line_p = prune(config, mode, criterion, seed, stage, ctx)
                r, wall_e, line_e = evaluate(model_path(config, mode, criterion, seed, stage), ctx)
                append(
                    log,
                    {
                        **key,
                        "sparsity": CONFIGS[config],
                        "top1": r["top1"],
                        "top5": r["top5"],
                        **sizes(pruned),
                        "wall_s": wall_p + wall_e,
                        "recalibrated_bn_images": pruned.get("recalibrated_bn_images", 0),
                        "commands": [line_p, line_e],
                    },
                )


def step_finetune(ctx: Ctx, selected: str | None = None) -> None:
    """Stage c: the same fine-tuning budget for every pruned model (from the stage-a model, not the recalibrated)."""
    log = OUT / "runs.jsonl"
    for config, mode in groups(selected):
        for criterion, seed in CRITERIA:
            key = {"config": config, "mode": mode, "criterion": criterion, "seed": seed, "stage": "c"}
            if logged(log, **key):
                continue
            ctx.check()
            model = model_path(config, mode, criterion, seed, "a")
            lines = []
            if not model.exists():
                _, _, line = prune(config, mode, criterion, seed, "a", ctx)
                lines.append(line)
            pruned = find(log, **{**key, "stage": "a"})
            if pruned is None:  # stage a not logged: its sizes from chip profile
                pruned, _, _ = chip("profile", str(model), "--json")
                assert pruned is not None
            run_dir = RUNS / "ft" / model.stem[:-2]
            m, wall, line = finetune(model, run_dir, ctx, FT_ARGS)
            config_json = json.loads((run_dir / "config.json").read_text())
            append(
                log,
                {
                    **key,
                    "sparsity": CONFIGS[config],
                    "top1": m["test_top1"],
                    "top5": m["test_top5"],
                    **sizes(pruned),
                    "wall_s": wall,
                    "train_loss": m["train_loss"],
                    "images_per_s": m["images_per_s"],
                    "train_seconds": m["seconds"],
                    "steps": config_json.get("steps_per_epoch"),
                    "train_images": config_json.get("train_images"),
                    "commands": [*lines, line],
                },
            )


def step_knobs(ctx: Ctx) -> None:
    """Distillation weight and temperature against none, and bf16 against float32, on the CHIP paper-1 model."""
    step_baseline(ctx, "resnet56")
    step_scores(ctx)
    model = model_path("paper-1", "coupled", "chip", 0, "a")
    if not model.exists():
        prune("paper-1", "coupled", "chip", 0, "a", ctx)
    log = RECOVERY / "knobs.jsonl"
    teacher = ["--teacher", str(BASE)]
    # Without a teacher, bf16 against float32; the bf16 runs are also the "no distillation" row of the grid.
    runs = [({"knob": "precision", "amp": "bf16", "seed": s}, ["--amp", "bf16"]) for s in SEEDS]
    runs += [
        ({"knob": "kd", "kd_weight": a, "kd_temperature": t, "seed": s},
         ["--amp", "bf16", *teacher, "--kd-weight", str(a), "--kd-temperature", str(t)])
        for a, t in KD_GRID for s in SEEDS[:2]
    ]  # fmt: skip
    runs += [({"knob": "precision", "amp": "off", "seed": s}, ["--amp", "off"]) for s in SEEDS]
    for key, extra in runs:
        if logged(log, **key):
            continue
        ctx.check()
        run_dir = RUNS / "knobs" / "-".join(f"{k}{v}" for k, v in key.items())
        m, wall, line = finetune(model, run_dir, ctx, [*KNOB_ARGS, "--seed", str(key["seed"]), *extra])
        append(log, {**key, "top1": m["test_top1"], "top5": m["test_top5"], "train_loss": m["train_loss"],
                     "images_per_s": m["images_per_s"], "wall_s": wall, "commands": [line]})  # fmt: skip


def step_calibration(ctx: Ctx) -> None:
    """CHIP with N calibration images (seeds 0, 1): top-1 right after pruning and after --recalibrate-bn 4."""
    need(BASE, "baseline")
    log = OUT / "calibration_size.jsonl"
    for seed in CALIB_SEEDS:
        for n, (nb, bs) in CALIB_SIZES.items():
            scores = RUNS / "calib" / f"chip-n{n}-s{seed}.json"
            score_line, score_wall = "", 0.0
            for config in CALIB_CONFIGS:
                for stage in ("a", "b"):
                    key = {"config": config, "images": n, "seed": seed, "stage": stage}
                    if logged(log, **key):
                        continue
                    ctx.check()
                    if not scores.exists():
                        score_wall, score_line = score(
                            BASE, scores, ctx, "--batches", str(nb), "--batch-size", str(bs), "--seed", str(seed)
                        )
                    out = RUNS / "calib" / f"{config}-n{n}-s{seed}-{stage}.pt"
                    # --seed also picks the recalibration images (seed + 1); --batch-size 128 for them
                    recal = (
                        ["--recalibrate-bn", str(RECAL_BATCHES), "--batch-size", "128", "--data", ctx.data]
                        if stage == "b"
                        else []
                    )
                    pruned, wall_p, line_p = prune_from(
                        BASE, config, "coupled", ["--scores", str(scores), "--seed", str(seed)], out, *recal
                    )
                    r, wall_e, line_e = evaluate(out, ctx)
                    append(
                        log,
                        {
                            **key,
                            "batches": nb,
                            "batch_size": bs,
                            "top1": r["top1"],
                            "top5": r["top5"],
                            "flops": pruned["flops"],
                            "wall_s": wall_p + wall_e,
                            "score_wall_s": score_wall,
                            "commands": [c for c in (score_line, line_p, line_e) if c],
                        },
                    )
                    score_line, score_wall = "", 0.0


def step_stability(ctx: Ctx, criteria: list[str], sets: int = 4, per_set: int = 640) -> None:
    """Scores on `sets` disjoint calibration sets (one seeded permutation cut in chunks), Spearman per layer."""
    import numpy as np
    import torch
    from scipy.stats import spearmanr

    from chipprune.calibrate import score_layers
    from chipprune.criteria import get_criterion
    from chipprune.data import batches, load_split
    from chipprune.files.modelfile import load_model

    need(BASE, "baseline")
    path = OUT / "stability.json"
    done = json.loads(path.read_text()) if path.exists() else {"criteria": {}}
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    mf = load_model(BASE)
    train = load_split(ctx.data, "train")
    bs = 128
    # images [k * per_set, (k + 1) * per_set) of the seed-0 permutation of the train split form set k
    stream = list(batches(train, bs, mean=mf.mean, std=mf.std, shuffle=True, seed=0, limit=sets * per_set))
    chunks = [stream[k * per_set // bs : (k + 1) * per_set // bs] for k in range(sets)]
    for name in criteria:
        if name in done["criteria"]:
            continue
        ctx.check()
        t = time.time()
        per_set_scores = [
            score_layers(mf.model, mf.model.channel_layers(), get_criterion(name, 0), chunk)[0] for chunk in chunks
        ]
        wall = time.time() - t
        layers = {}
        for conv in per_set_scores[0]:
            values = [s[conv].numpy() for s in per_set_scores]
            rhos = [float(spearmanr(values[i], values[j]).statistic) for i in range(sets) for j in range(i + 1, sets)]
            finite = [r for r in rhos if np.isfinite(r)]
            layers[conv] = {
                "mean": float(np.mean(finite)) if finite else None,
                "min": float(np.min(finite)) if finite else None,
                "pairs": rhos,
                "zero_channels": int(sum((v == 0).sum() for v in values) // sets),
            }
        done["criteria"][name] = {
            "layers": layers,
            "wall_s": wall,
            "set0": {conv: s.tolist() for conv, s in per_set_scores[0].items()},
        }
        done.update(
            {
                "sets": sets,
                "images_per_set": per_set,
                "permutation_seed": 0,
                "batch_size": bs,
                "model": str(BASE),
                "method": "chipprune.calibrate.score_layers on disjoint chunks of "
                "chipprune.data.batches(train, 128, shuffle=True, seed=0, limit=sets*per_set); "
                "scipy.stats.spearmanr per layer and pair of sets",
            }
        )
        OUT.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(done, indent=1) + "\n")
        print(f"stability {name}: {wall:.0f}s", file=sys.stderr, flush=True)


def step_latency(ctx: Ctx, threads: list[int], repeats: int) -> None:
    """CPU latency (batch 1 and 64) of the dense ResNet-56 and one pruned model per configuration and mode."""
    dense = BASE if BASE.exists() else imported("resnet56", ctx)
    models: list[tuple[str, str, Path]] = [("dense", "-", dense)]
    for config, mode in GROUPS:
        path = model_path(config, mode, "chip", 0, "a")
        if not path.exists():  # the widths are the criterion's to choose, not the weights: L1 needs no data
            path = RUNS / "latency-models" / f"{config}-{mode}.pt"
            prune_from(dense, config, mode, ["--criterion", "l1"], path)
        models.append((config, mode, path))
    rows = []
    for n in threads:
        env = {**os.environ, "OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}
        for config, mode, path in models:
            result, wall, line = chip(
                "profile",
                str(path),
                "--latency",
                "--batch-sizes",
                "1,64",
                "--threads",
                str(n),
                "--repeats",
                str(repeats),
                "--json",
                env=env,
            )
            assert result is not None
            rows.append({"config": config, "mode": mode, "threads": n, **result, "wall_s": wall, "command": line})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "latency.json").write_text(
        json.dumps({"environment": environment(), "repeats": repeats, "rows": rows}, indent=1) + "\n"
    )


def step_no_finetune(ctx: Ctx) -> None:
    """Stage a from the imported public ResNet-56 for NO_FT_GROUPS: NO_FT_OUT and a markdown table."""
    model = imported("resnet56", ctx)
    dense, _, _ = evaluate(model, ctx)
    rows = [{"config": "dense", "criterion": "-", "seed": None, "residual": "-", **accuracy(dense)}]
    with tempfile.TemporaryDirectory() as tmp:
        for criterion in ACTIVATION:
            wall, _ = score(model, score_file(criterion, Path(tmp)), ctx, "--criterion", criterion)
            print(f"scored {criterion} in {wall:.1f}s", file=sys.stderr)
        for config, mode in NO_FT_GROUPS:
            for criterion, seed in CRITERIA:
                out = Path(tmp) / f"{criterion}-{seed}-{mode}.pt"
                pruned, _, _ = prune_from(model, config, mode, source_args(criterion, seed, Path(tmp)), out)
                r, _, _ = evaluate(out, ctx)
                rows.append(
                    {
                        "config": config,
                        "criterion": criterion,
                        "seed": seed,
                        "residual": mode,
                        "params": pruned["params"],
                        "flops": pruned["flops"],
                        **accuracy(r),
                    }
                )
                print(rows[-1], file=sys.stderr)
    NO_FT_OUT.parent.mkdir(parents=True, exist_ok=True)
    NO_FT_OUT.write_text(json.dumps(rows, indent=1) + "\n")
    print(no_finetune_table(rows))


def accuracy(result: dict[str, Any]) -> dict[str, Any]:
    """Top-1, top-5 and image count of a `chip eval --json` result."""
    return {k: result[k] for k in ("top1", "top5", "images")}


def no_finetune_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of step_no_finetune's rows (seeds shown for random only)."""
    lines = ["| configuration | residual | criterion | seed | top-1 % | top-5 % |", "|---|---|---|---|---|---|"]
    for r in rows:
        seed = "" if r["seed"] is None or r["criterion"] != "random" else r["seed"]
        lines.append(
            f"| {r['config']} | {r['residual']} | {r['criterion']} | {seed} | {r['top1']:.2f} | {r['top5']:.2f} |"
        )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """The machine and software a run used."""
    cpu = (
        next(
            (
                s.split(":", 1)[1].strip()
                for s in Path("/proc/cpuinfo").read_text().splitlines()
                if s.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    torch_version = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch_version,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "host": platform.node(),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def step_all(ctx: Ctx, args: argparse.Namespace) -> None:
    """Every step but latency, the most important first; stops cleanly at --deadline."""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "environment.json").write_text(json.dumps(environment(), indent=1) + "\n")
    plan: list[tuple[str, Callable[[], None]]] = [
        ("baseline resnet56", lambda: step_baseline(ctx, "resnet56")),
        ("scores", lambda: step_scores(ctx)),
        ("prune", lambda: step_prune(ctx)),
        ("finetune paper-1 coupled, inner-only", lambda: step_finetune(ctx, "paper-1:coupled,inner-only:coupled")),
        ("stability", lambda: step_stability(ctx, args.criteria.split(","))),
        ("calibration", lambda: step_calibration(ctx)),
        ("finetune paper-2 coupled", lambda: step_finetune(ctx, "paper-2:coupled")),
        ("finetune paper-1 paper", lambda: step_finetune(ctx, "paper-1:paper")),
        ("finetune paper-2 paper", lambda: step_finetune(ctx, "paper-2:paper")),
        ("baseline resnet20", lambda: step_baseline(ctx, "resnet20")),
    ]
    for name, fn in plan:
        t = time.time()
        try:
            fn()
        except Deadline:
            print(f"deadline reached during: {name}; stopping", file=sys.stderr, flush=True)
            return
        print(f"== {name}: {time.time() - t:.0f}s", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "step",
        choices=[
            "baseline",
            "scores",
            "prune",
            "finetune",
            "stability",
            "calibration",
            "latency",
            "no-finetune",
            "knobs",
            "all",
        ],
    )
    parser.add_argument("--data", default="../shared/data", help="JPEG CIFAR-10 (its parent holds weights/)")
    parser.add_argument("--arch", default="resnet56", choices=sorted(WEIGHTS), help="baseline: which network")
    parser.add_argument("--groups", help="prune/finetune: config:mode pairs, e.g. paper-1:coupled,inner-only:coupled")
    parser.add_argument("--criteria", default="chip,hrank", help="stability: the activation criteria")
    parser.add_argument("--threads", default="1,2", help="latency: CPU thread counts")
    parser.add_argument("--repeats", type=int, default=30, help="latency: timed runs per batch size")
    parser.add_argument("--deadline", help="all (and the others): start no new unit of work after HH:MM UTC")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
    ctx = Ctx(args)
    steps: dict[str, Callable[[], None]] = {
        "baseline": lambda: step_baseline(ctx, args.arch),
        "scores": lambda: step_scores(ctx),
        "prune": lambda: step_prune(ctx, args.groups),
        "finetune": lambda: step_finetune(ctx, args.groups),
        "stability": lambda: step_stability(ctx, args.criteria.split(",")),
        "calibration": lambda: step_calibration(ctx),
        "latency": lambda: step_latency(ctx, [int(t) for t in args.threads.split(",")], args.repeats),
        "no-finetune": lambda: step_no_finetune(ctx),
        "knobs": lambda: step_knobs(ctx),
        "all": lambda: step_all(ctx, args),
    }
    try:
        steps[args.step]()
    except Deadline:
        print("deadline reached; stopping", file=sys.stderr)


if __name__ == "__main__":
    main()
