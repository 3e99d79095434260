"""Tests for chipprune.training.loop and `chip finetune` / `chip train`: the run folder, exact resume, torchrun, and
distributed calibration, on a tiny synthetic image folder and ResNet-20."""

import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from chipprune.calibrate import score_layers
from chipprune.cli import main
from chipprune.criteria import CHIP
from chipprune.data import batches, load_split
from chipprune.files.fileio import sha256
from chipprune.files.modelfile import CIFAR10_CLASSES, ModelFile, load_model
from chipprune.models import create_model
from chipprune.training import loop as train
from chipprune.training.loop import PRESETS, Config, distillation_loss, lr_at
from images import make_workdir

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "chipprune.cli"]
LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo"}  # gloo between the test's processes on this machine only
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """An image folder (48 train and 2 test 32x32 PNGs per CIFAR-10 class), its train split alone, a ResNet-20."""
    root = make_workdir(tmp_path_factory.mktemp("train"), {"train": 48, "test": 2})
    (root / "train-only").mkdir()
    (root / "train-only" / "train").symlink_to(root / "data" / "train")
    return root


def finetune_args(work, run, *extra):
    """`chip finetune` of the ResNet-20 for 3 quick epochs of 15 steps (480 images, batch 32)."""
    return [
        "finetune",
        str(work / "r20.pt"),
        "--data",
        str(work / "data"),
        "--out-dir",
        str(run),
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--train-subset",
        "480",
        "--lr",
        "0.05",
        "--warmup-epochs",
        "1",
        "--workers",
        "0",
        *extra,
    ]


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def metrics(run):
    """metrics.jsonl without the timings."""
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("images_per_s", "seconds")}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


# ---- schedule and presets ----------------------------------------------------------------------------------


def test_lr_warms_up_linearly_per_step_then_decays_by_cosine_to_zero():
    cfg = Config(epochs=10, batch_size=8, lr=0.1, momentum=0.9, weight_decay=0, label_smoothing=0, warmup_epochs=2)
    lrs = [lr_at(s, cfg, 5) for s in range(50)]
    assert lrs[:10] == pytest.approx([0.01 * (s + 1) for s in range(10)])
    assert lrs[10] == 0.1 and lrs[30] == pytest.approx(0.05) and 0 < lrs[-1] < 1e-3
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lr_at(0, replace(cfg, warmup_epochs=0), 5) == 0.1


def test_presets_are_the_authors_recipes():
    cifar, imagenet, baseline = PRESETS["paper-cifar"], PRESETS["paper-imagenet"], PRESETS["baseline-cifar"]
    assert (cifar.epochs, cifar.batch_size, cifar.lr, cifar.momentum, cifar.weight_decay, cifar.warmup_epochs) == (
        400,
        256,
        0.01,
        0.9,
        0.005,
        5,
    )
    assert (imagenet.epochs, imagenet.momentum, imagenet.label_smoothing, imagenet.weight_decay) == (
        180,
        0.99,
        0.1,
        1e-4,
    )
    assert (baseline.epochs, baseline.lr, baseline.momentum, baseline.weight_decay) == (200, 0.1, 0.9, 5e-4)


# ---- data for many processes -------------------------------------------------------------------------------


def test_ranks_share_every_batch_and_start_skips_whole_batches(work):
    split = load_split(work / "data", "train", progress=False)
    kw = {"mean": (0.5,) * 3, "std": (0.25,) * 3, "train": True, "shuffle": True, "seed": 3, "drop_last": True}
    whole = list(batches(split, 24, **kw))
    assert len(whole) == 480 // 24 and all(len(y) == 24 for _, y in whole)
    shares = [list(batches(split, 24, rank=r, world=3, **kw)) for r in range(3)]
    for k, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([s[k][0] for s in shares]), x), "same images, same crops and flips"
        assert torch.equal(torch.cat([s[k][1] for s in shares]), y)
    for (x, _), (x2, _) in zip(whole[5:], batches(split, 24, start=5, **kw), strict=True):
        assert torch.equal(x, x2)


# ---- the run folder ----------------------------------------------------------------------------------------


def test_finetune_writes_a_complete_run_folder(work, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(finetune_args(work, run, "--epochs", "2", "--train-subset", "64", "--preset", "paper-cifar")) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["config"] | {"lr": 0.05, "weight_decay": 0.005, "momentum": 0.9, "batch_size": 32} == config["config"]
    assert config["preset"] == "paper-cifar" and config["train_images"] == 64 and config["steps_per_epoch"] == 2
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert set(lines[0]) == {
        "epoch",
        "lr",
        "train_loss",
        "train_top1",
        "test_top1",
        "test_top5",
        "images_per_s",
        "seconds",
    }
    assert all(math.isfinite(m["train_loss"]) and 0 <= m["test_top1"] <= m["test_top5"] <= 100 for m in lines)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(run / "last.pt", weights_only=True)["training"]
    assert state["step"] == 4 and len(state["history"]) == 2 and "momentum_buffer" in state["optimizer"]["state"][0]
    best = load_model(run / "best.pt")
    assert best.arch == "resnet20" and best.meta["trained"]["best_top1"] == max(m["test_top1"] for m in lines)
    capsys.readouterr()
    assert main(["eval", str(run / "last.pt"), "--data", str(work / "data"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == lines[-1]["test_top1"]


def test_train_from_scratch_without_an_evaluation_split(work, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--arch",
            "resnet20",
            "--data",
            str(work / "train-only"),
            "--out-dir",
            str(run),
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--train-subset",
            "64",
            "--workers",
            "0",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0 and err.count("no evaluation split") == 1 and "training without evaluation" in err
    assert [m["test_top1"] for m in metrics(run)] == [None, None] and not (run / "best.pt").exists()
    assert json.loads((run / "config.json").read_text())["config"]["lr"] == 0.1, "baseline-cifar by default"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((), "already holds a run: --resume to continue it"),
        (("--resume", "--lr", "0.1"), "was made with lr 0.05 (now 0.1): give the same options"),
        (("--batch-size", "1000", "--out-dir", "other"), "fewer than one batch of 1000"),
    ],
)
def test_bad_runs_are_one_line_errors(work, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    assert main(finetune_args(work, "run", "--epochs", "1", "--train-subset", "32")) == 0
    capsys.readouterr()
    assert main(finetune_args(work, "run", "--epochs", "1", "--train-subset", "32", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# ---- exact resume ------------------------------------------------------------------------------------------


def start(args, log):
    """`chip ARGS` in a new process, its stderr (the progress bars) in `log`."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "chipprune.cli", *args], stdout=f, stderr=f)


def wait_for_step(proc, log, epoch, step):
    """Wait until the progress bar of `epoch` (of 3, 15 steps) shows at least `step` steps done."""
    bar = re.compile(rf"epoch {epoch}/3: +\d+%\|[^|]*\| *(\d+)/15")
    deadline = time.monotonic() + 120
    while not any(int(done) >= step for done in bar.findall(log.read_text(errors="replace"))):
        assert proc.poll() is None, f"exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)


def test_killed_then_stopped_run_resumes_to_bit_identical_weights(work, tmp_path):
    assert main(finetune_args(work, tmp_path / "straight")) == 0
    run, log = tmp_path / "run", tmp_path / "log.txt"

    proc = start(finetune_args(work, run, "--resume"), log)  # the same command line for the start and restarts
    wait_for_step(proc, log, epoch=2, step=3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "last.pt yet, starting the run" in log.read_text()
    assert torch.load(run / "last.pt", weights_only=True)["training"]["step"] == 15, "killed within epoch 2"

    proc = start(finetune_args(work, run, "--resume"), log)
    wait_for_step(proc, log, epoch=3, step=3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 130
    assert "stopped: saved" in log.read_text()
    step = torch.load(run / "last.pt", weights_only=True)["training"]["step"]
    assert 30 < step < 45, "SIGTERM saves within the epoch, after the current step"

    assert main(finetune_args(work, run, "--resume")) == 0
    straight, resumed = weights(tmp_path / "straight" / "last.pt"), weights(run / "last.pt")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight), "bit for bit"
    assert metrics(run) == metrics(tmp_path / "straight")


# ---- distillation ------------------------------------------------------------------------------------------


def test_distillation_loss_is_the_weighted_sum_of_tempered_kl_and_cross_entropy():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(6, 10), 3 * torch.randn(6, 10), torch.randint(0, 10, (6,))
    cfg = replace(PRESETS["paper-cifar"], kd_weight=0.7, kd_temperature=4.0)
    p = torch.softmax(teacher / 4, 1)
    kl = (p * (p.log() - torch.log_softmax(student / 4, 1))).sum() / 6  # KL(teacher || student), by hand
    ce = -torch.log_softmax(student, 1)[torch.arange(6), labels].mean()
    expected = 0.7 * 16 * kl + 0.3 * ce
    torch.testing.assert_close(distillation_loss(student, teacher, labels, cfg), expected)
    torch.testing.assert_close(distillation_loss(student, None, labels, cfg), F.cross_entropy(student, labels))
    same = distillation_loss(student, student, labels, cfg)
    torch.testing.assert_close(same, 0.3 * ce), "a student equal to its teacher pays only the hard term"


@pytest.fixture
def pruned(work, tmp_path, capsys):
    """A ResNet-20 pruned by `chip prune` from work/r20.pt (which it records as its parent), in tmp_path."""
    args = ["prune", work / "r20.pt", "--criterion", "l1", "--sparsity", "[0.]*3+[0.5]*9", "--out", tmp_path / "p.pt"]
    assert main([str(a) for a in args]) == 0
    capsys.readouterr()
    return tmp_path / "p.pt"


def test_a_pruned_file_records_its_parent_and_finetune_distills_from_it(work, pruned, tmp_path, capsys):
    parent = load_model(pruned).meta["pruned"]
    assert parent["parent_path"] == str((work / "r20.pt").resolve()) and parent["parent_sha256"] == sha256(
        work / "r20.pt"
    )
    args = finetune_args(work, tmp_path / "run", "--epochs", "1", "--train-subset", "64", "--teacher", "parent")
    args[1] = str(pruned)
    assert main(args) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["teacher"] == {"path": parent["parent_path"], "sha256": parent["parent_sha256"]}
    assert config["config"]["teacher"] == parent["parent_sha256"]
    assert (config["config"]["kd_weight"], config["config"]["kd_temperature"]) == (
        train.KD_WEIGHT,
        train.KD_TEMPERATURE,
    )
    assert capsys.readouterr().err.count("precision: ") == 1


def stop_after(steps):
    """A stand-in for train._stop_requests that asks the loop to stop at its `steps`-th look, as SIGTERM would (the
    loop looks once per step, and once per batch while it evaluates)."""

    @contextmanager
    def requests():
        calls = itertools.count(1)
        yield lambda: next(calls) == steps

    return requests


def test_a_distilled_run_resumes_bit_for_bit(work, pruned, tmp_path, monkeypatch):
    def args(run):
        a = finetune_args(
            work, tmp_path / run, "--epochs", "2", "--train-subset", "128", "--teacher", str(work / "r20.pt")
        )
        a[1] = str(pruned)
        return [*a, "--kd-weight", "0.6", "--kd-temperature", "3"]

    assert main(args("straight")) == 0
    monkeypatch.setattr(train, "_stop_requests", stop_after(6))  # within epoch 2 (4 steps each)
    assert main(args("run")) == 130
    monkeypatch.undo()
    assert 4 < torch.load(tmp_path / "run" / "last.pt", weights_only=True)["training"]["step"] < 8, "within epoch 2"
    assert main([*args("run"), "--resume"]) == 0
    straight, resumed = weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "run" / "last.pt")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight), "bit for bit"
    assert metrics(tmp_path / "run") == metrics(tmp_path / "straight")


def test_distillation_refuses_what_it_cannot_use(work, pruned, tmp_path, capsys):
    def finetune(*extra):
        a = finetune_args(work, tmp_path / "run", "--epochs", "1", "--train-subset", "32", *extra)
        a[1] = str(pruned)
        code = main(a)
        return code, capsys.readouterr().err

    assert finetune("--kd-weight", "0.5") == (
        2,
        "chip finetune: error: --kd-weight and --kd-temperature apply to --teacher\n",
    )
    other = tmp_path / "other.pt"
    ModelFile("resnet20", create_model("resnet20"), (0.5,) * 3, (0.5,) * 3, list(CIFAR10_CLASSES)).save(other)
    code, err = finetune("--teacher", str(other))
    assert code == 2 and "takes other inputs or gives other classes" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):  # argparse: A is in [0, 1]
        finetune("--teacher", "parent", "--kd-weight", "1.5")
    assert finetune("--teacher", str(work / "r20.pt"))[0] == 0
    code, err = finetune("--teacher", str(pruned), "--resume")
    assert code == 2 and "was made with teacher" in err, "a resumed run distills from the same model"


def test_teacher_parent_needs_the_parent_as_it_was(work, tmp_path, capsys):
    parent, child = tmp_path / "parent.pt", tmp_path / "child.pt"
    shutil.copy(work / "r20.pt", parent)
    assert main(["prune", str(parent), "--criterion", "l1", "--sparsity", "[0.]*3+[0.5]*9", "--out", str(child)]) == 0
    a = finetune_args(work, tmp_path / "run", "--epochs", "1", "--train-subset", "32", "--teacher", "parent")
    a[1] = str(child)
    parent.touch()  # the same bytes: still the parent
    assert main([*a, "--out-dir", str(tmp_path / "ok")]) == 0
    ModelFile("resnet20", create_model("resnet20"), (0.5,) * 3, (0.25,) * 3, list(CIFAR10_CLASSES)).save(parent)
    capsys.readouterr()
    assert main(a) == 2
    assert capsys.readouterr().err.endswith(
        f"the parent of {child}, {parent}, is gone or has changed since: give --teacher FILE\n"
    )
    parent.unlink()
    assert main(a) == 2 and "is gone or has changed" in capsys.readouterr().err
    a[1] = str(work / "r20.pt")
    assert main(a) == 2 and "records no parent" in capsys.readouterr().err


# ---- many processes ----------------------------------------------------------------------------------------


def test_two_gloo_processes_match_one_with_the_same_global_batch(work, tmp_path):
    # One process sees each half of a batch as a micro-batch (--accum 2), as BatchNorm does in each of two processes.
    assert main(finetune_args(work, tmp_path / "one", "--epochs", "2", "--train-subset", "128", "--accum", "2")) == 0
    cmd = [
        *TORCHRUN,
        *finetune_args(work, tmp_path / "two", "--epochs", "2", "--train-subset", "128"),
    ]
    done = subprocess.run(cmd, env={**os.environ, **LOOPBACK}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = weights(tmp_path / "one" / "last.pt"), weights(tmp_path / "two" / "last.pt")
    # BatchNorm running statistics differ by design: DDP keeps rank 0's, updated by its half of each batch.
    params = [k for k in one if "running_" not in k and "num_batches" not in k]
    for k in params:
        torch.testing.assert_close(two[k], one[k])
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5) and b["train_top1"] == a["train_top1"]
    assert json.loads((tmp_path / "two" / "config.json").read_text())["processes"] == 2


def calibration_batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, 3, 32, 32, generator=g), torch.zeros(n, dtype=torch.long)) for n in (5, 4, 1)]


def test_chip_score_under_torchrun_equals_one_process(work, tmp_path):
    score = ["score", str(work / "r20.pt"), "--data", str(work / "data"), "--batches", "3", "--batch-size", "10"]
    assert main([*score, "--out", str(tmp_path / "one.json")]) == 0
    cmd = [
        *TORCHRUN,
        *score,
        "--out",
        str(tmp_path / "two.json"),
    ]
    done = subprocess.run(cmd, env={**os.environ, **LOOPBACK}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["images"] == two["images"] == 30
    assert (one["processes"], two["processes"]) == (1, 2)
    for conv, s in one["layers"].items():
        torch.testing.assert_close(torch.tensor(two["layers"][conv]), torch.tensor(s), rtol=1e-9, atol=1e-12)


def score_in_process(rank, world, rendezvous, out):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = create_model("resnet20").eval()
        scores, images = score_layers(model, model.channel_layers(), CHIP(), calibration_batches())
        torch.save({"scores": scores, "images": images}, out / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_calibration_equals_one_process(tmp_path, monkeypatch):
    for k, v in LOOPBACK.items():
        monkeypatch.setenv(k, v)
    mp.spawn(score_in_process, args=(2, tmp_path / "rendezvous", tmp_path), nprocs=2)
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    scores, images = score_layers(model, model.channel_layers(), CHIP(), calibration_batches())
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert got["images"] == images == 10
        for conv, s in scores.items():
            torch.testing.assert_close(got["scores"][conv], s, rtol=1e-12, atol=1e-12)
