"""The recovery study: is a CHIP-pruned ResNet-56 as good as its parent after the same fine-tuning?

    python experiments/recovery.py run [--parallel auto|1|2] [--deadline HH:MM]   # the matrix, resumable
    python experiments/recovery.py check                                          # the committed parent
    python experiments/recovery.py report                                         # README, tables and plots

The parent is the public ResNet-56 adapted once to the JPEG images (PARENT_ARGS) and committed as
results/recovery/parent.safetensors; its SHA-256 and top-1 are in the log, and every step checks the hash before it
reads the file. Each study prunes the parent to paper-1 (coupled) with fixed seeds, then fine-tunes it for
RECOVERY_ARGS (5 epochs over all 50,000 training images, distilled from the parent unless said otherwise).

Every result is one JSON line in results/recovery/runs.jsonl (command lines, machine, precision, wall seconds,
per-epoch metrics), written as soon as it finishes; logged results are skipped, so a killed run goes on where it
stopped. A fine-tune resumes from its last epoch's checkpoint (runs/recovery/, not committed) where this machine
still has it, else starts again. `--parallel auto` measures once per machine whether two runs at one thread each
train faster than one run at two threads (results/recovery/throughput.jsonl) and uses the faster."""

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
RUNS = Path("runs/recovery")
LOG = OUT / "runs.jsonl"
THROUGHPUT = OUT / "throughput.jsonl"
PARENT = OUT / "parent.safetensors"
WEIGHTS = "resnet56-4bfd9763.th"
PARENT_ARGS = ["--preset", "paper-cifar", "--epochs", "3", "--warmup-epochs", "0", "--lr", "0.01", "--seed", "0"]
RECOVERY_ARGS = ["--preset", "paper-cifar", "--epochs", "5", "--warmup-epochs", "0"]
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


# --------------------------------------------------------------------------- machine and files


def machine() -> dict[str, Any]:
    """The processor, torch's CPU capability and versions this process runs on."""
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


def evaluate(model: Path, ctx: Ctx) -> tuple[dict[str, Any], str]:
    """`chip eval --json` on the test split: the result and the command line."""
    result, _, line = chip("eval", str(model), "--data", ctx.data, "--json")
    assert result is not None
    return result, line


# --------------------------------------------------------------------------- steps


def adapt_parent(ctx: Ctx) -> None:
    """Adapt the public ResNet-56 once (PARENT_ARGS), save its last epoch as the committed safetensors file, log it."""
    if find(LOG, stage="parent"):
        checked_parent()
        return
    ctx.check()
    public = RUNS / "resnet56.pt"
    weights = str(ctx.shared / "weights" / WEIGHTS)
    lines = [
        chip("import", "--arch", "resnet56", "--weights", weights, "--normalize", "imagenet", "--out", str(public))[2]
    ]
    run_dir = RUNS / "parent"
    wall, line = finetune(public, run_dir, ctx, PARENT_ARGS, threads=os.cpu_count() or 1)
    from chipprune import load_model

    # The last epoch, not best.pt: best.pt is chosen on the test split, which the study reports on.
    load_model(run_dir / "last.pt").save(PARENT)
    result, eval_line = evaluate(PARENT, ctx)
    append(LOG, {"stage": "parent", "sha256": sha256(PARENT), "top1": result["top1"], "top5": result["top5"],
                 "file": str(PARENT), "precision": precision(run_dir), "machine": machine(), "wall_s": wall,
                 "metrics": epochs_of(run_dir), "commands": [*lines, line, eval_line]})  # fmt: skip


def pruned_model(study: Study, stage: str, ctx: Ctx) -> tuple[Path, dict[str, Any]]:
    """Prune the parent for a study (stage "bn": BatchNorm re-estimated on RECAL_BATCHES batches): path and result."""
    out = RUNS / "models" / f"{study.name}-{stage}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    how = ["--sparsity", CONFIGS["paper-1"], "--criterion", study.criterion, "--seed", str(study.seed)]
    how += ["--round-to", str(study.round_to)] if study.round_to else []
    how += ["--recalibrate-bn", str(RECAL_BATCHES)] if stage == "bn" else []
    how += ["--data", ctx.data] if study.criterion in ACTIVATION or stage == "bn" else []
    result, _, line = chip("prune", str(checked_parent()), *how, "--out", str(out), "--json")
    assert result is not None
    return out, {**{k: result[k] for k in ("params", "flops", "flops_reduction")}, "commands": [line]}


def log_pruned(study: Study, ctx: Ctx, lock: threading.Lock) -> None:
    """Log a study's top-1 right after pruning and after BatchNorm re-estimation (once each)."""
    for stage in ("pruned", "bn"):
        if find(LOG, **study._asdict(), stage=stage):
            continue
        ctx.check()
        t = time.time()
        path, row = pruned_model(study, stage, ctx)
        result, line = evaluate(path, ctx)
        with lock:
            append(LOG, {**study._asdict(), "stage": stage, "top1": result["top1"], "top5": result["top5"], **row,
                         "commands": [*row["commands"], line], "machine": machine(),
                         "wall_s": time.time() - t})  # fmt: skip


def recover(study: Study, ctx: Ctx, threads: int, lock: threading.Lock) -> None:
    """Fine-tune one study's model (pruning it first where this machine lacks it) and log the run."""
    if find(LOG, **study._asdict(), stage="recovered"):
        return
    if study.criterion != "parent":
        log_pruned(study, ctx, lock)
    ctx.check()
    model = checked_parent()
    if study.criterion != "parent":
        model = RUNS / "models" / f"{study.name}-pruned.pt"
        if not model.exists():
            model, _ = pruned_model(study, "pruned", ctx)  # fixed seeds: the same model as the logged one
    run_dir = RUNS / "ft" / study.name
    teacher = ["--teacher", str(checked_parent())] if study.distilled else []
    wall, line = finetune(model, run_dir, ctx, [*RECOVERY_ARGS, "--seed", str(study.seed), *teacher], threads)
    history = epochs_of(run_dir)
    with lock:
        append(LOG, {**study._asdict(), "stage": "recovered", "top1": history[-1]["test_top1"],
                     "precision": precision(run_dir), "threads": threads, "machine": machine(), "wall_s": wall,
                     "metrics": history, "commands": [line]})  # fmt: skip


def measure_parallel(ctx: Ctx, subset: int = 5000) -> int:
    """How many runs at once (1 at all threads, or 2 at one thread each) train faster here; measured once per machine.

    Both ways fine-tune the CHIP seed-0 model for one epoch of `subset` images; the figure is training images per
    second summed over the runs at once (their evaluations are left out: they scale the same way)."""
    here = machine()
    row = next((r for r in read_jsonl(THROUGHPUT) if r["machine"] == here), None)
    if row is None:
        model = RUNS / "models" / f"{STUDY[0].name}-pruned.pt"
        if not model.exists():
            model, _ = pruned_model(STUDY[0], "pruned", ctx)
        args = ["--preset", "paper-cifar", "--epochs", "1", "--warmup-epochs", "0", "--train-subset", str(subset)]
        cores = here["cores"] or 1

        def speed(name: str, threads: int) -> float:
            run_dir = RUNS / "throughput" / name
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


def run(ctx: Ctx, parallel: str) -> None:
    """Adapt the parent if it is not committed yet, then work through STUDY, `parallel` runs at once."""
    adapt_parent(ctx)
    n = measure_parallel(ctx) if parallel == "auto" else int(parallel)
    threads = max(1, (os.cpu_count() or 1) // n)
    print(f"{n} run(s) at once, {threads} thread(s) each", file=sys.stderr, flush=True)
    lock = threading.Lock()
    todo = iter([s for s in STUDY if not find(LOG, **s._asdict(), stage="recovered")])
    take = threading.Lock()

    def worker() -> None:
        while True:
            with take:
                study = next(todo, None)
            if study is None:
                return
            recover(study, ctx, threads, lock)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["run", "check", "report"])
    parser.add_argument("--data", default="../shared/data", help="JPEG CIFAR-10 (its parent holds weights/)")
    parser.add_argument("--parallel", default="auto", choices=["auto", "1", "2"], help="run: fine-tunes at once")
    parser.add_argument("--deadline", help="run: start no new unit of work after HH:MM UTC")
    args = parser.parse_args()
    ctx = Ctx(args)
    try:
        if args.step == "run":
            run(ctx, args.parallel)
        elif args.step == "check":
            check(ctx)
        else:
            from recovery_report import report

            report()
    except Deadline:
        print("deadline reached; stopping", file=sys.stderr)


if __name__ == "__main__":
    main()
