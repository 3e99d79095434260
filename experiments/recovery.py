"""The recovery study: is a CHIP-pruned ResNet-56 as good as its parent after the same fine-tuning?

    python experiments/recovery.py run [--parallel auto|N] [--deadline HH:MM]   # the matrix, resumable
    python experiments/recovery.py run --device cuda --epochs 30 --parallel 5 --studies gpu --out results/recovery/gpu
    python experiments/recovery.py check                                        # the committed parent
    python experiments/recovery.py report                                       # README, tables and plots

The parent is the public ResNet-56 adapted once to the JPEG images (PARENT_ARGS) and committed as
results/recovery/parent.safetensors; its SHA-256 and top-1 are in the log, and every step checks the hash before it
reads the file. Each study prunes the parent to paper-1 (coupled) with fixed seeds, then fine-tunes it for
RECOVERY_ARGS (5 epochs over all 50,000 training images, distilled from the parent unless said otherwise).

Every result is one JSON line in results/recovery/runs.jsonl (command lines, machine, precision, wall seconds,
per-epoch metrics), written as soon as it finishes; logged results are skipped, so a killed run goes on where it
stopped. A fine-tune resumes from its last epoch's checkpoint (runs/recovery/, not committed) where this machine
still has it, else starts again. `--parallel auto` measures once per machine whether two runs at one thread each
train faster than one run at two threads (results/recovery/throughput.jsonl) and uses the faster. On a GPU
(benchmarks/gpu.sh) the long schedule runs the GPU studies side by side on the device, logged in their own folder."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from reproduce import CONFIGS, RECAL_BATCHES, Ctx, Deadline, append, chip, find, read_jsonl

OUT = Path("results/recovery")
LOG = OUT / "runs.jsonl"  # the CPU study's log, which also holds the parent's line
THROUGHPUT = OUT / "throughput.jsonl"
PARENT = OUT / "parent.safetensors"
WEIGHTS = "resnet56-4bfd9763.th"
PARENT_ARGS = ["--preset", "paper-cifar", "--epochs", "3", "--warmup-epochs", "0", "--lr", "0.01", "--seed", "0"]
RECOVERY_ARGS = ["--preset", "paper-cifar", "--warmup-epochs", "0"]
RECOVERY_EPOCHS = 5
CPU_RUNS = Path("runs/recovery")
ACTIVATION = ("chip", "hrank")  # criteria that read calibration images
# What `chip finetune --resume` says of a run folder this machine cannot continue (made with another precision, or
# damaged): start that run again. Any other failure stops the study.
NOT_RESUMABLE = ("--resume: the run in", "nothing to resume", "damaged")


class Study(NamedTuple):
    """One fine-tuning run of the matrix: a pruned model (or the parent itself, the control) and its recipe."""

    criterion: str  # chip, l1, hrank, random; "parent" for the control
    seed: int  # calibration images and selection (random) when pruning; data order when fine-tuning
    round_to: int | None = None
    distilled: bool = True

    @property
    def name(self) -> str:
        """A file name for the study's models and run folder."""
        return (
            f"{self.criterion}-s{self.seed}"
            + (f"-r{self.round_to}" if self.round_to else "")
            + ("" if self.distilled else "-ce")
        )


# The matrix, in order: a logged run is skipped, so a later session goes on with the next.
STUDY = [
    Study("chip", 0),
    Study("l1", 0),
    Study("parent", 0),
    Study("hrank", 0),
    Study("random", 0),
    *(Study(c, 1) for c in ("chip", "l1", "hrank", "random")),
    *(Study(c, 0, distilled=False) for c in ("chip", "l1")),
    *(Study(c, 0, round_to=8) for c in ("chip", "l1")),
    *(Study(c, 2) for c in ("chip", "l1")),
]
# The GPU's long schedule: the control and the two criteria the paper compares most, two seeds each.
GPU_STUDY = [Study("parent", 0), *(Study(c, s) for s in (0, 1) for c in ("chip", "l1"))]
STUDIES = {"cpu": STUDY, "gpu": GPU_STUDY}


class Plan(NamedTuple):
    """Where a run of the study logs, keeps its scratch files, and how it trains."""

    log: Path  # one JSON line per result
    runs: Path  # models and run folders, not committed
    device: str
    epochs: int
    studies: list[Study]
    finetune_args: list[str]  # beyond the recipe: a smaller batch or subset for a dry run


# --------------------------------------------------------------------------- machine and files


def machine(device: str = "cpu") -> dict[str, Any]:
    """The processor (and GPU, on one), torch's CPU capability and versions this process runs on."""
    import torch

    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [s.split(":", 1)[1].strip() for s in lines if s.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **({"gpu": torch.cuda.get_device_name()} if device.startswith("cuda") else {}),
    }


def sha256(path: Path) -> str:
    """The SHA-256 of a file, hex."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checked_parent() -> Path:
    """The committed parent, after its hash is compared with the log's; stops if either is missing or they differ."""
    row = find(LOG, stage="parent")
    if row is None or not PARENT.exists():
        raise SystemExit(f"no parent yet ({PARENT}, logged in {LOG}): run `python experiments/recovery.py run`")
    if sha256(PARENT) != row["sha256"]:
        raise SystemExit(f"{PARENT} does not match the SHA-256 in {LOG}: restore it from git, never re-adapt it")
    return PARENT


def epochs_of(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch metrics of a `chip finetune` run folder."""
    return read_jsonl(run_dir / "metrics.jsonl")


def precision(run_dir: Path) -> str:
    """The autocast a run used (bf16, fp16, off), as its config.json records it."""
    return str(json.loads((run_dir / "config.json").read_text())["config"]["amp"])


def env_threads(threads: int) -> dict[str, str]:
    """This process's environment with torch's CPU threads set to `threads`."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def finetune(model: Path, run_dir: Path, ctx: Ctx, args: list[str], threads: int) -> tuple[float, str]:
    """`chip finetune --resume`: continues from the run folder's last epoch where it holds one; wall seconds, line."""

    def run() -> tuple[float, str]:
        cmd = ["finetune", str(model), "--data", ctx.data, "--out-dir", str(run_dir), *args, "--resume"]
        _, wall, line = chip(*cmd, env=env_threads(threads))
        return wall, line

    try:
        return run()
    except SystemExit as e:
        if not any(why in str(e) for why in NOT_RESUMABLE):
            raise
        print(f"cannot resume {run_dir}, starting it again: {str(e)[-300:]}", file=sys.stderr, flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        return run()


def evaluate(model: Path, ctx: Ctx, device: str = "cpu") -> tuple[dict[str, Any], str]:
    """`chip eval --json` on the test split: the result and the command line."""
    result, _, line = chip("eval", str(model), "--data", ctx.data, "--device", device, "--json")
    assert result is not None
    return result, line


# --------------------------------------------------------------------------- steps


def adapt_parent(ctx: Ctx) -> None:
    """Adapt the public ResNet-56 once (PARENT_ARGS), save its last epoch as the committed safetensors file, log it."""
    if find(LOG, stage="parent"):
        checked_parent()
        return
    ctx.check()
    public = CPU_RUNS / "resnet56.pt"
    weights = str(ctx.shared / "weights" / WEIGHTS)
    lines = [
        chip("import", "--arch", "resnet56", "--weights", weights, "--normalize", "imagenet", "--out", str(public))[2]
    ]
    run_dir = CPU_RUNS / "parent"
    wall, line = finetune(public, run_dir, ctx, PARENT_ARGS, threads=os.cpu_count() or 1)
    from chipprune import load_model

    # The last epoch, not best.pt: best.pt is chosen on the test split, which the study reports on.
    load_model(run_dir / "last.pt").save(PARENT)
    result, eval_line = evaluate(PARENT, ctx)
    append(LOG, {"stage": "parent", "sha256": sha256(PARENT), "top1": result["top1"], "top5": result["top5"],
                 "file": str(PARENT), "precision": precision(run_dir), "machine": machine(), "wall_s": wall,
                 "metrics": epochs_of(run_dir), "commands": [*lines, line, eval_line]})  # fmt: skip


def pruned_model(study: Study, stage: str, ctx: Ctx, plan: Plan) -> tuple[Path, dict[str, Any]]:
    """Prune the parent for a study (stage "bn": BatchNorm re-estimated on RECAL_BATCHES batches): path and result."""
    out = plan.runs / "models" / f"{study.name}-{stage}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    how = ["--sparsity", CONFIGS["paper-1"], "--criterion", study.criterion, "--seed", str(study.seed)]
    how += ["--round-to", str(study.round_to)] if study.round_to else []
    how += ["--recalibrate-bn", str(RECAL_BATCHES)] if stage == "bn" else []
    how += ["--data", ctx.data] if study.criterion in ACTIVATION or stage == "bn" else []
    how += ["--device", plan.device]
    result, _, line = chip("prune", str(checked_parent()), *how, "--out", str(out), "--json")
    assert result is not None
    return out, {**{k: result[k] for k in ("params", "flops", "flops_reduction")}, "commands": [line]}


def log_pruned(study: Study, ctx: Ctx, plan: Plan, lock: threading.Lock) -> None:
    """Log a study's top-1 right after pruning and after BatchNorm re-estimation (once each)."""
    for stage in ("pruned", "bn"):
        if find(plan.log, **study._asdict(), stage=stage):
            continue
        ctx.check()
        t = time.time()
        path, row = pruned_model(study, stage, ctx, plan)
        result, line = evaluate(path, ctx, plan.device)
        with lock:
            append(plan.log, {**study._asdict(), "stage": stage, "top1": result["top1"], "top5": result["top5"],
                              **row, "commands": [*row["commands"], line], "machine": machine(plan.device),
                              "wall_s": time.time() - t})  # fmt: skip


def recover(study: Study, ctx: Ctx, plan: Plan, threads: int, lock: threading.Lock) -> None:
    """Fine-tune one study's model (pruning it first where this machine lacks it) and log the run."""
    if find(plan.log, **study._asdict(), stage="recovered"):
        return
    if study.criterion != "parent":
        log_pruned(study, ctx, plan, lock)
    ctx.check()
    model = checked_parent()
    if study.criterion != "parent":
        model = plan.runs / "models" / f"{study.name}-pruned.pt"
        if not model.exists():
            model, _ = pruned_model(study, "pruned", ctx, plan)  # fixed seeds: the same model as the logged one
    run_dir = plan.runs / "ft" / study.name
    args = [*RECOVERY_ARGS, "--epochs", str(plan.epochs), "--seed", str(study.seed), "--device", plan.device]
    args += plan.finetune_args
    args += ["--teacher", str(checked_parent())] if study.distilled else []
    wall, line = finetune(model, run_dir, ctx, args, threads)
    history = epochs_of(run_dir)
    with lock:
        append(plan.log, {**study._asdict(), "stage": "recovered", "top1": history[-1]["test_top1"],
                          "epochs": plan.epochs, "precision": precision(run_dir), "threads": threads,
                          "machine": machine(plan.device), "wall_s": wall, "metrics": history,
                          "commands": [line]})  # fmt: skip


def measure_parallel(ctx: Ctx, plan: Plan, subset: int = 5000) -> int:
    """How many runs at once (1 at all threads, or 2 at one thread each) train faster here; measured once per machine.

    Both ways fine-tune the CHIP seed-0 model for one epoch of `subset` images; the figure is training images per
    second summed over the runs at once (their evaluations are left out: they scale the same way)."""
    here = machine()
    row = next((r for r in read_jsonl(THROUGHPUT) if r["machine"] == here), None)
    if row is None:
        model = plan.runs / "models" / f"{STUDY[0].name}-pruned.pt"
        if not model.exists():
            model, _ = pruned_model(STUDY[0], "pruned", ctx, plan)
        args = ["--preset", "paper-cifar", "--epochs", "1", "--warmup-epochs", "0", "--train-subset", str(subset)]
        cores = here["cores"] or 1

        def speed(name: str, threads: int) -> float:
            run_dir = plan.runs / "throughput" / name
            shutil.rmtree(run_dir, ignore_errors=True)
            finetune(model, run_dir, ctx, args, threads)
            return float(epochs_of(run_dir)[-1]["images_per_s"])

        one = speed("one", cores)
        with ThreadPoolExecutor(cores) as pool:
            many = sum(pool.map(lambda k: speed(f"many{k}", 1), range(cores)))
        row = {"machine": here, "subset": subset, "one_run_images_per_s": one, "parallel_runs": cores,
               "parallel_images_per_s": many, "parallel": cores if many > one else 1}  # fmt: skip
        append(THROUGHPUT, row)
    return int(row["parallel"])


def run(ctx: Ctx, plan: Plan, parallel: str) -> None:
    """Adapt the parent if it is not committed yet (on the CPU), then work through the plan's studies, `parallel` runs
    at once."""
    if plan.device == "cpu":
        adapt_parent(ctx)
    checked_parent()
    n = measure_parallel(ctx, plan) if parallel == "auto" else int(parallel)
    threads = max(1, (os.cpu_count() or 1) // n)
    print(f"{n} run(s) at once, {threads} thread(s) each", file=sys.stderr, flush=True)
    lock = threading.Lock()
    todo = iter([s for s in plan.studies if not find(plan.log, **s._asdict(), stage="recovered")])
    take = threading.Lock()

    def worker() -> None:
        while True:
            with take:
                study = next(todo, None)
            if study is None:
                return
            recover(study, ctx, plan, threads, lock)

    with ThreadPoolExecutor(n) as pool:
        for f in [pool.submit(worker) for _ in range(n)]:
            f.result()  # a Deadline in one worker ends the run once the others finish their current study


def check(ctx: Ctx) -> None:
    """The committed parent loads, its SHA-256 matches the log, and its re-evaluated top-1 is the logged one."""
    path = checked_parent()
    logged = find(LOG, stage="parent")
    assert logged is not None
    result, _ = evaluate(path, ctx)
    same = abs(result["top1"] - logged["top1"]) < 0.005
    print(json.dumps({"file": str(path), "sha256": logged["sha256"], "logged_top1": logged["top1"],
                      "top1": result["top1"], "matches": same}))  # fmt: skip
    if not same:
        raise SystemExit(1)


# --------------------------------------------------------------------------- report

CRITERIA = ("chip", "l1", "hrank", "random")
COLORS = {"chip": "tab:red", "l1": "tab:green", "hrank": "tab:blue", "random": "tab:gray", "parent": "black"}
# Published ResNet-56 results near 2x fewer FLOPs, on the ORIGINAL CIFAR-10 (not this JPEG data), for context.
PUBLISHED = [
    ("CHIP (Sui et al. 2021)", "93.26", "94.16", "47.4 % fewer FLOPs", "300 epochs"),
    ("HRankPlus (Lin et al.)", "93.26", "93.57", "about 50 % fewer FLOPs", "300 epochs"),
    ("DepGraph (Fang et al. 2023)", "93.53", "93.77", "2.13x fewer FLOPs", "100 + 100 epochs"),
]


class Config(NamedTuple):
    """A configuration of the matrix, its seeds pooled."""

    criterion: str
    round_to: int | None
    distilled: bool

    @property
    def label(self) -> str:
        """How the tables name it."""
        what = "control (parent fine-tuned)" if self.criterion == "parent" else self.criterion
        return what + (f", round-to {self.round_to}" if self.round_to else "") + ("" if self.distilled else ", no KD")


class Summary(NamedTuple):
    """Top-1 over a configuration's seeds: mean, spread (max - min) and best."""

    mean: float
    spread: float
    best: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Summary | None:
        """The summary of some values, None for none."""
        return cls(sum(values) / len(values), max(values) - min(values), max(values), len(values)) if values else None

    def __str__(self) -> str:
        seeds = f" ± {self.spread / 2:.2f} (best {self.best:.2f}, n={self.n})" if self.n > 1 else ""
        return f"{self.mean:.2f}{seeds}"


def configs_of(rows: list[dict[str, Any]]) -> dict[Config, dict[str, list[dict[str, Any]]]]:
    """Per configuration, per stage (pruned, bn, recovered), the logged rows of its seeds."""
    out: dict[Config, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        if r["stage"] in ("pruned", "bn", "recovered"):
            config = Config(r["criterion"], r.get("round_to"), r.get("distilled", True))
            out.setdefault(config, {}).setdefault(r["stage"], []).append(r)
    return out


def report() -> None:
    """results/recovery/README.md and its plots, from the logs alone."""
    rows = read_jsonl(LOG)
    parent = find(LOG, stage="parent")
    if parent is None:
        raise SystemExit(f"nothing to report: no parent in {LOG}")
    configs = configs_of(rows)
    epochs_plot(configs, OUT / "top1_by_epoch.png")
    text = [README_HEAD.format(parent=parent, sha=parent["sha256"][:16], machine=parent["machine"]["cpu"])]
    text += results_table(configs, parent)
    text += comparisons(configs)
    gpu = read_jsonl(OUT / "gpu" / "runs.jsonl")
    if gpu:
        epochs_plot(configs_of(gpu), OUT / "gpu" / "top1_by_epoch.png")
        text += ["", "## The long schedule on a GPU", ""]
        text += results_table(configs_of(gpu), parent, gpu=True)
        text += comparisons(configs_of(gpu))
    text += ["", "## Published ResNet-56 results near 2x fewer FLOPs (original CIFAR-10, not this data)", ""]
    text += ["| method | baseline | pruned | FLOPs | fine-tuning |", "|---|---|---|---|---|"]
    text += [f"| {' | '.join(p)} |" for p in PUBLISHED]
    text += [
        "",
        "These are measured on the original CIFAR-10 with hundreds of epochs; the runs above are on JPEG "
        "CIFAR-10 with 5 (CPU) or the GPU's epochs, so only the ordering and the gaps are comparable.",
    ]
    (OUT / "README.md").write_text("\n".join(text) + "\n")
    print(f"wrote {OUT / 'README.md'}", file=sys.stderr)


README_HEAD = """# The recovery study: ResNet-56 pruned to paper-1, fine-tuned, against its parent

> Made by `python experiments/recovery.py report` from [runs.jsonl](runs.jsonl) (the runs:
> `python experiments/recovery.py run`). **Data: CIFAR-10 re-encoded as JPEG** (`../shared/data`), not the original
> CIFAR-10; top-1 on its 10,000 test images.

- **Parent:** the public ResNet-56 adapted to the JPEG images for 3 epochs (`chip finetune --preset paper-cifar
  --epochs 3 --warmup-epochs 0 --lr 0.01`), committed as [parent.safetensors](parent.safetensors)
  (SHA-256 `{sha}…`): **{parent[top1]:.2f} %** top-1, adapted on {machine}.
- **Pruned models:** paper-1 (`[0.]+[0.15]*2+[0.4]*27`, coupled residuals) by each criterion from the parent, with
  fixed seeds (calibration images and, for random, the selection).
- **Recipe, the same for every run and the control:** `chip finetune --preset paper-cifar --epochs 5
  --warmup-epochs 0 --seed S --teacher parent.safetensors` (distilled: A = 0.9, T = 4; "no KD" runs drop
  `--teacher`), i.e. 5 epochs over all 50,000 training images, evaluated after each epoch. The control is the parent
  itself fine-tuned the same way, so "beats the baseline" compares equal training.
- Mean ± half the spread (max − min) over seeds, with the best seed beside it (the paper reports a best run).
"""


def results_table(
    configs: dict[Config, dict[str, list[dict[str, Any]]]], parent: dict[str, Any], gpu: bool = False
) -> list[str]:
    """The table of every configuration: sizes, each stage's top-1, speed, and the gap to the control."""
    control = Summary.of([r["top1"] for r in configs.get(Config("parent", None, True), {}).get("recovered", [])])
    lines = [f"Parent: {parent['top1']:.2f} %.", ""]
    lines += ["| configuration | params | FLOPs | pruned | + BN | after fine-tuning | − control | train img/s | "
              "machine |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for config, stages in sorted(configs.items(), key=lambda kv: order(kv[0])):
        pruned = stages.get("pruned", [])
        size = pruned[0] if pruned else None
        done = stages.get("recovered", [])
        final = Summary.of([r["top1"] for r in done])
        speed = [m["images_per_s"] for r in done for m in r["metrics"]]
        machines = sorted({r["machine"].get("gpu") or r["machine"]["cpu"] for r in done})
        precisions = sorted({r["precision"] for r in done})
        cells = [
            config.label,
            f"{size['params']:,}" if size else "853,018",
            f"{size['flops'] / 1e6:.1f} M" if size else "125.5 M",
            str(Summary.of([r["top1"] for r in pruned]) or "–"),
            str(Summary.of([r["top1"] for r in stages.get("bn", [])]) or "–"),
            f"{final} ({done[0]['epochs'] if done and 'epochs' in done[0] else 5} ep.)" if final else "not run yet",
            f"{final.mean - control.mean:+.2f}" if final and control else "–",
            f"{sum(speed) / len(speed):.0f}" if speed else "–",
            f"{'; '.join(machines)} ({', '.join(precisions)})" if machines else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def order(config: Config) -> tuple[int, bool, int]:
    """Tables list the control first, then the criteria in the matrix's order."""
    rank = 0 if config.criterion == "parent" else 1 + CRITERIA.index(config.criterion)
    return (config.round_to or 0, not config.distilled, rank)


def comparisons(configs: dict[Config, dict[str, list[dict[str, Any]]]]) -> list[str]:
    """Plain statements: CHIP against each other criterion, against the control, and KD against none."""

    def final(config: Config) -> Summary | None:
        return Summary.of([r["top1"] for r in configs.get(config, {}).get("recovered", [])])

    chip = final(Config("chip", None, True))
    lines = ["", "### What the data supports", ""]
    if chip is None:
        return lines + ["- No CHIP run has finished yet."]
    for other in ("l1", "hrank", "random", "parent"):
        theirs = final(Config(other, None, True))
        if theirs is None:
            lines.append(f"- CHIP against {Config(other, None, True).label}: not run yet.")
            continue
        gap, noise = chip.mean - theirs.mean, max(chip.spread, theirs.spread)
        if min(chip.n, theirs.n) < 2:
            verdict = "one seed of one of them: not yet judged against the seed spread"
        elif abs(gap) <= noise:
            verdict = f"level within the seed spread of {noise:.2f}"
        else:
            verdict = f"{'ahead' if gap > 0 else 'behind'} by more than the seed spread of {noise:.2f}"
        lines.append(f"- CHIP {chip.mean:.2f} against {Config(other, None, True).label} {theirs.mean:.2f}: "
                     f"{gap:+.2f} points, {verdict}.")  # fmt: skip
    for criterion in ("chip", "l1"):
        kd, ce = final(Config(criterion, None, True)), final(Config(criterion, None, False))
        if kd and ce:
            lines.append(f"- {criterion}: distilled {kd.mean:.2f} against cross-entropy alone {ce.mean:.2f} "
                         f"({kd.mean - ce.mean:+.2f}).")  # fmt: skip
    return lines


def epochs_plot(configs: dict[Config, dict[str, list[dict[str, Any]]]], path: Path) -> None:
    """Top-1 against epoch per distilled paper-1 configuration: the mean over seeds and a band from min to max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for config, stages in sorted(configs.items(), key=lambda kv: order(kv[0])):
        runs = [[m["test_top1"] for m in r["metrics"]] for r in stages.get("recovered", [])]
        if not runs or config.round_to or not config.distilled:
            continue
        n = min(map(len, runs))
        by_epoch = list(zip(*(r[:n] for r in runs), strict=True))
        epochs = range(1, n + 1)
        color = COLORS[config.criterion]
        ax.plot(epochs, [sum(v) / len(v) for v in by_epoch], color=color, label=f"{config.label} ({len(runs)} seeds)")
        ax.fill_between(epochs, [min(v) for v in by_epoch], [max(v) for v in by_epoch], color=color, alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 % (JPEG CIFAR-10 test)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["run", "check", "report"])
    parser.add_argument("--data", default="../shared/data", help="JPEG CIFAR-10 (its parent holds weights/)")
    parser.add_argument("--parallel", default="auto", help="run: fine-tunes at once, or auto (measured, on a CPU)")
    parser.add_argument("--deadline", help="run: start no new unit of work after HH:MM UTC")
    parser.add_argument("--device", default="cpu", help="run: where to prune, fine-tune and evaluate")
    parser.add_argument("--epochs", type=int, default=RECOVERY_EPOCHS, help="run: fine-tuning epochs")
    parser.add_argument("--studies", default="cpu", choices=sorted(STUDIES), help="run: which matrix")
    parser.add_argument("--out", type=Path, default=OUT, help="run: the folder of the log (runs.jsonl)")
    parser.add_argument("--runs", type=Path, default=CPU_RUNS, help="run: the folder of models and run folders")
    parser.add_argument("--batch-size", type=int, help="run: fine-tuning batch (default: the preset's)")
    parser.add_argument("--train-subset", type=int, help="run: fine-tune on N images (gpu.sh --dry-run)")
    args = parser.parse_args()
    ctx = Ctx(args)
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in ("batch_size", "train_subset") and v]
    plan = Plan(args.out / "runs.jsonl", args.runs, args.device, args.epochs, STUDIES[args.studies], extra)
    try:
        if args.step == "run":
            run(ctx, plan, args.parallel)
        elif args.step == "check":
            check(ctx)
        else:
            report()
    except Deadline:
        print("deadline reached; stopping", file=sys.stderr)


if __name__ == "__main__":
    main()
