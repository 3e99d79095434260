"""Hardening, round 3 (issue 29): run folders and teachers. A run folder's `.lock` is never written through a link or
into a file that chip did not leave; no run file replaces a file the command reads (model, teacher, parent, data);
no output is written through a link into a file of another format; a damaged training state or parent record, a
teacher of other inputs and a malformed option value are each refused in one line, exit code 2, with every file as it
was and no wait."""

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import math
import os
import re
import shutil
import signal
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import ANY

import pytest
import torch

from chipprune.cli import build_parser, main
from chipprune.files.modelfile import CIFAR10_CLASSES, ModelFile, library_model, load_model
from chipprune.models import create_model
from command import run
from refusals import assert_refused

SRC = Path(__file__).resolve().parents[1] / "src" / "chipprune"
pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Within, a wait of more than `seconds` (on a FIFO, say) fails the test instead of hanging it."""

    def expired(*_):
        raise TimeoutError(f"still waiting after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(*roots: Path) -> dict[str, str]:
    """What each path at and under `roots` is, links not followed: a file's SHA-256, a link's target, or its kind.
    The decoded-image cache (conftest's, a folder `cache` of the test's), which reading data fills, is left out."""
    seen = {}
    for root in roots:
        tree = root.is_dir() and not root.is_symlink()
        for path in [root, *sorted(root.rglob("*"))] if tree else [root]:
            if path.relative_to(root).parts[:1] == ("cache",):
                continue
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                seen[str(path)] = "a link to " + os.readlink(path)
            elif stat.S_ISREG(mode):
                seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                seen[str(path)] = stat.filemode(mode)[0]
    return seen


def finetune(model, data, run_dir, *more):
    """The arguments of a one-epoch `chip finetune` of 8-image batches into run_dir."""
    return ["finetune", model, "--data", data, "--out-dir", run_dir, "--epochs", "1", "--batch-size", "8", *more]


@pytest.fixture
def inputs(capsys, workdir, tmp_path):
    """A model pruned from a parent (for --teacher parent), a teacher, and data with a --val-data, all copies."""
    parent, model, teacher = tmp_path / "parent.pt", tmp_path / "m.pt", tmp_path / "teacher.pt"
    shutil.copy(workdir / "r20.pt", parent)
    shutil.copy(workdir / "r20.pt", teacher)
    prune = ["prune", parent, "--criterion", "l1", "--sparsity", "[0.]*3+[0.5]*9", "--out", model]
    assert run(capsys, *prune)[0] == 0
    data = shutil.copytree(workdir / "data", tmp_path / "data")
    val = shutil.copytree(workdir / "data" / "test", tmp_path / "val" / "test").parent
    return {"model": model, "teacher": teacher, "parent": parent, "data": data, "val": val}


# ---- the lock: never through a link, never into a file that chip did not leave -----------------------------


def plant_lock(lock: Path, kind: str, inputs: dict[str, Path]) -> str:
    """Put something of `kind` at a run folder's lock path; what the refusal says it is."""
    if kind.startswith("link-to-"):
        targets = {**inputs, "nothing": lock.parent / "nowhere", "image": inputs["data"] / "train" / "cat" / "0.png"}
        lock.symlink_to(targets[kind.removeprefix("link-to-")])
        return "is a symbolic link"
    if kind == "hard-link-to-model":
        os.link(inputs["model"], lock)
        return "is a file of 2 names (hard links)"
    if kind == "fifo":
        os.mkfifo(lock)
        return "is a FIFO (named pipe)"
    if kind == "device":
        os.mknod(lock, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
        return "is a character device"
    if kind == "socket":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(lock))
        return "is a socket"
    if kind == "folder":
        lock.mkdir()
        (lock / "x").write_text("x")
        return "is a folder"
    if kind == "text":
        lock.write_text("notes the user kept here\n")
        return "is a file that holds something other than a pid (25 bytes)"
    if kind == "large":
        lock.write_bytes(b"1" * 100_000)
        return "is a file that holds something other than a pid (97.7 kB)"
    assert kind == "other-user"
    lock.write_text("123\n")
    os.chown(lock, 4321, 4321)
    return "is a file of another user (uid 4321)"


LOCKS = [
    "link-to-model",
    "link-to-teacher",
    "link-to-parent",
    "link-to-nothing",
    "link-to-data",
    "link-to-image",
    "hard-link-to-model",
    "fifo",
    "device",
    "socket",
    "folder",
    "text",
    "large",
    "other-user",
]


@pytest.mark.parametrize("kind", LOCKS)
def test_a_lock_path_that_is_not_a_lock_file_chip_left_is_refused_and_kept(capsys, inputs, tmp_path, kind):
    if kind in ("device", "other-user") and os.geteuid() != 0:
        pytest.skip("making a device node or another user's file needs root")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    said = plant_lock(run_dir / ".lock", kind, inputs)
    before = snapshot(tmp_path)
    with deadline(60):
        result = run(capsys, *finetune(inputs["model"], inputs["data"], run_dir, "--teacher", inputs["teacher"]))
    assert_refused(result, f"cannot use --out-dir {run_dir}: its .lock {said}", "not the lock file chip leaves")
    assert snapshot(tmp_path) == before, "every file as it was, the lock path too; nothing written"


@pytest.mark.parametrize("left", ["", "7\n", "4194304\n", "12"])
def test_a_lock_file_that_a_chip_process_left_is_taken_over(capsys, inputs, tmp_path, left):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(left)
    assert run(capsys, *finetune(inputs["model"], inputs["data"], run_dir))[0] == 0
    assert (run_dir / ".lock").read_text() == f"{os.getpid()}\n", "ours now: no digit of the last holder's left"


IN_PLACE = {"pwrite", "write", "ftruncate", "truncate", "O_WRONLY", "O_RDWR", "O_APPEND", "O_TRUNC", "O_CREAT"}


def in_place_writes(tree: ast.AST) -> set[tuple[str, str]]:
    """(function, name) of each use of os.NAME that writes into a file or opens one for writing, in a module."""
    found = set()
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef):
            found |= {
                (function.name, node.attr)
                for node in ast.walk(function)
                if isinstance(node, ast.Attribute)
                and node.attr in IN_PLACE
                and isinstance(node.value, ast.Name)
                and node.value.id == "os"
            }
    return found


def test_the_lock_is_the_only_file_written_in_place():
    """Every other file is written by fileio.atomic_write (test_every_file_is_written_through_atomic_write): the only
    file written into is the lock (its pid), and the only other one opened for writing is /dev/null."""
    found = {(path.name, *use) for path in SRC.rglob("*.py") for use in in_place_writes(ast.parse(path.read_text()))}
    assert found == {
        ("runs.py", "run_lock", "pwrite"),
        ("runs.py", "run_lock", "ftruncate"),
        ("runs.py", "_open_lock", "O_RDWR"),
        ("runs.py", "_open_lock", "O_CREAT"),
        ("_arguments.py", "quiet_stdout", "O_WRONLY"),
        ("export.py", "no_stdout", "O_WRONLY"),
    }


# ---- no run file replaces a file the command reads ---------------------------------------------------------


# (the input a run file links to, the command's options that read it)
READ = {
    "model": [],
    "teacher": ["--teacher", "{teacher}"],
    "parent": ["--teacher", "parent"],
    "data-image": [],
    "val-image": ["--val-data", "{val}"],
}


def victim(inputs: dict[str, Path], which: str) -> Path:
    """The file a planted run file points at."""
    if which == "data-image":
        return inputs["data"] / "train" / "cat" / "1.png"
    if which == "val-image":
        return inputs["val"] / "test" / "dog" / "0.png"
    return inputs[which]


# (the input, how it is linked): a hard link into a data folder is replaced beside it (a rename), never written into
PLANTED = [(which, "symlink") for which in READ] + [
    ("model", "hard-link"),
    ("teacher", "hard-link"),
    ("parent", "hard-link"),
]


@pytest.mark.parametrize("name", ["config.json", "best.pt", "metrics.jsonl", "curves.png", "last.pt"])
@pytest.mark.parametrize(("which", "how"), PLANTED)
def test_a_run_file_is_never_an_input_of_the_run(capsys, inputs, tmp_path, which, how, name):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    target = victim(inputs, which)
    if how == "symlink":
        (run_dir / name).symlink_to(target)
    else:
        os.link(target, run_dir / name)
    options = [o.format(**inputs) for o in READ[which]]
    before = snapshot(tmp_path)
    with deadline(60):
        result = run(capsys, *finetune(inputs["model"], inputs["data"], run_dir, *options))
    assert_refused(result, f"--out-dir {run_dir} would replace ", f"an input of this command, with its {name}")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["config.json", "metrics.jsonl"])
def test_a_training_run_never_replaces_an_image_of_its_data(capsys, inputs, tmp_path, name):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / name).symlink_to(victim(inputs, "val-image"))
    before = snapshot(tmp_path)
    args = ["train", "--arch", "resnet20", "--data", inputs["data"], "--val-data", inputs["val"]]
    result = run(capsys, *args, "--out-dir", run_dir, "--epochs", "1", "--batch-size", "8")
    assert_refused(result, f"would replace {victim(inputs, 'val-image')}, a file under {inputs['val']}")
    assert snapshot(tmp_path) == before


# ---- a link is never written through into a file of another format ----------------------------------------


# (the command, with {o} for its --out; the link's name; the name of the file it links to, "{m}": the model)
LINKS = {
    "overwrite-input": ("prune", "out.safetensors", "{m}"),
    "prune-into-pt": ("prune", "out.safetensors", "other.pt"),
    "prune-into-new-pt": ("prune", "out.safetensors", "new.pt"),
    "prune-into-unsuffixed": ("prune", "out.safetensors", "blob"),
    "prune-into-safetensors": ("prune", "out.pt", "other.safetensors"),
    "import-into-safetensors": ("import", "out", "other.safetensors"),
    "import-into-pth": ("import", "out.safetensors", "other.pth"),
}
COMMANDS = {
    "prune": ["prune", "{m}", "--criterion", "l1", "--sparsity", "[0.]*12", "--out", "{o}", "--overwrite-input"],
    "import": ["import", "--arch", "resnet20", "--weights", "{w}", "--out", "{o}"],
}


def link_command(tmp_path: Path, inputs: dict[str, Path], command: str, name: str, target: str) -> list[str]:
    """The command line of `command` whose --out is the link `name` to `target` (made, unless a new path)."""
    model, weights = inputs["parent"], tmp_path / "w.pt"  # the parent: a model of every channel, to prune
    torch.save(load_model(model).model.state_dict(), weights)
    to = model if target == "{m}" else tmp_path / target
    if target != "{m}" and not target.startswith("new"):
        to.write_bytes(b"a file of its own")
    (tmp_path / name).symlink_to(to)
    return [a.format(m=model, w=weights, o=tmp_path / name) for a in COMMANDS[command]]


@pytest.mark.parametrize("case", list(LINKS))
def test_a_link_is_never_written_through_into_a_file_of_another_format(capsys, inputs, tmp_path, case):
    command, name, target = LINKS[case]
    args = link_command(tmp_path, inputs, command, name, target)
    before = snapshot(tmp_path)
    assert_refused(
        run(capsys, *args), f"cannot write {tmp_path / name}: it links to ", "write ", "itself, or a new path"
    )
    assert snapshot(tmp_path) == before, "the model and the link's target as they were; nothing new"


@pytest.mark.parametrize(
    ("command", "name", "target"),
    [("prune", "out.pt", "{m}"), ("prune", "out", "{m}"), ("import", "out.safetensors", "new.safetensors")],
)
def test_a_link_to_a_file_of_the_same_format_is_written_through(capsys, inputs, tmp_path, command, name, target):
    args = link_command(tmp_path, inputs, command, name, target)
    assert run(capsys, *args)[0] == 0
    written = os.path.realpath(tmp_path / name)
    assert (tmp_path / name).is_symlink() and load_model(written).arch == "resnet20"


# ---- a damaged training state is one line on --resume ------------------------------------------------------


def stopped(workdir: Path, root: Path, *options: str) -> Path:
    """The folder of a two-epoch run, its last.pt rewound to the end of epoch 1 (as a run stopped there leaves it)."""
    run_dir = root / "run"
    with pytest.MonkeyPatch.context() as env:  # conftest's cache fixture is per test: set up after a module's
        env.setenv("CHIP_CACHE_DIR", str(root / "cache"))
        args = finetune(workdir / "r20.pt", workdir / "data", run_dir, "--epochs", "2", *options)
        assert main([str(a) for a in args]) == 0
    d = torch.load(run_dir / "last.pt", weights_only=True)
    d["training"]["history"] = d["training"]["history"][:1]
    d["training"]["step"] = 5  # 40 images, batches of 8
    torch.save(d, run_dir / "last.pt")
    return run_dir


@pytest.fixture(scope="module")
def stopped_run(workdir, tmp_path_factory):
    """A stopped float32 run."""
    return stopped(workdir, tmp_path_factory.mktemp("stopped"))


@pytest.fixture(scope="module")
def stopped_fp16_run(workdir, tmp_path_factory):
    """A stopped run of fp16 autocast, whose loss scaler has a state."""
    return stopped(workdir, tmp_path_factory.mktemp("stopped-fp16"), "--amp", "fp16")


def damage_and_resume(capsys, workdir: Path, run_dir: Path, change, *options: str) -> tuple[int, str, str]:
    """Change last.pt's training state in a copy of `run_dir` and resume the copy: chip's exit code and output."""
    d = torch.load(run_dir / "last.pt", weights_only=True)
    change(d["training"])
    torch.save(d, run_dir / "last.pt")
    with deadline(120):
        return run(capsys, *finetune(workdir / "r20.pt", workdir / "data", run_dir, "--epochs", "2", *options))


def buffer(t):
    """The first momentum buffer of a training state."""
    return t["optimizer"]["state"][0]


EPOCH = {"loss": 92.0, "hits": 4.0, "images": 40.0, "seconds": 1.5}  # the sums of a whole epoch of the stopped run
# What each damage changes in the training state, and the field the refusal names.
DAMAGES = {
    "rng-missing": (lambda t: t.pop("rng"), "rng"),
    "rng-empty": (lambda t: t.update(rng={}), "rng"),
    "rng-short": (lambda t: t["rng"].update(cpu=torch.zeros(3, dtype=torch.uint8)), "rng"),
    "rng-float": (lambda t: t["rng"].update(cpu=t["rng"]["cpu"].float()), "rng"),
    "rng-zeros": (lambda t: t["rng"].update(cpu=torch.zeros_like(t["rng"]["cpu"])), "rng"),
    "rng-text": (lambda t: t["rng"].update(cpu="state"), "rng"),
    "rng-unknown-device": (lambda t: t["rng"].update(mps=t["rng"]["cpu"]), "rng"),
    "optimizer-empty": (lambda t: t.update(optimizer={}), "optimizer"),
    "optimizer-no-groups": (lambda t: t["optimizer"].update(param_groups=[]), "optimizer"),
    "optimizer-other-params": (lambda t: t["optimizer"]["param_groups"][0].update(params=[0]), "optimizer"),
    "optimizer-state-list": (lambda t: t["optimizer"].update(state=[]), "optimizer"),
    "optimizer-state-index": (lambda t: t["optimizer"]["state"].update({999: buffer(t)}), "optimizer"),
    "buffer-shape": (lambda t: buffer(t).update(momentum_buffer=torch.zeros(3)), "optimizer"),
    "buffer-dtype": (lambda t: buffer(t).update(momentum_buffer=buffer(t)["momentum_buffer"].long()), "optimizer"),
    "buffer-nan": (lambda t: buffer(t)["momentum_buffer"].fill_(math.nan), "optimizer"),
    "buffer-text": (lambda t: buffer(t).update(momentum_buffer="x"), "optimizer"),
    "history-numbers": (lambda t: t.update(history=[1]), "history"),
    "history-empty-epoch": (lambda t: t.update(history=[{}]), "history"),
    "history-too-long": (lambda t: t.update(history=t["history"] * 3), "history"),
    "history-wrong-epoch": (lambda t: t["history"][0].update(epoch=2), "history"),
    "history-nan-loss": (lambda t: t["history"][0].update(train_loss=math.nan), "history"),
    "history-text": (lambda t: t["history"][0].update(lr="0.1"), "history"),
    "step-negative": (lambda t: t.update(step=-5), "step"),
    "step-beyond-the-epoch": (lambda t: t.update(step=11), "step"),
    "step-huge": (lambda t: t.update(step=10**30), "step"),
    "step-float": (lambda t: t.update(step=5.0), "step"),
    "best-nan": (lambda t: t.update(best_top1=math.nan), "best_top1"),
    "best-above-100": (lambda t: t.update(best_top1=150.0), "best_top1"),
    "partial-text": (lambda t: t["partial"].update(loss="x"), "partial"),
    "partial-negative": (lambda t: t["partial"].update(images=-1.0), "partial"),
    "partial-keys": (lambda t: t.update(partial={"loss": 0.0}), "partial"),
    "partial-of-other-steps": (lambda t: t.update(step=7), "partial"),
    "partial-more-hits-than-images": (
        lambda t: t.update(step=6, partial={**EPOCH, "images": 8.0, "hits": 9.0}),
        "partial",
    ),
    "stopped-in-evaluation-without-sums": (lambda t: t.update(step=10), "partial"),
    "scaler-junk": (lambda t: t.update(scaler={"scale": "x"}), "scaler"),
    "identity-list": (lambda t: t.update(identity=[]), "identity"),
    "config-list": (lambda t: t.update(config=[]), "config"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_training_state_is_one_line_and_changes_nothing(capsys, workdir, tmp_path, stopped_run, damage):
    change, field = DAMAGES[damage]
    run_dir = shutil.copytree(stopped_run, tmp_path / "run")
    before = snapshot(run_dir, workdir / "r20.pt")
    result = damage_and_resume(capsys, workdir, run_dir, change, "--resume")
    assert_refused(result, f"{run_dir / 'last.pt'}: damaged checkpoint: its training state has no valid {field!r}")
    assert snapshot(run_dir, workdir / "r20.pt") == {**before, str(run_dir / "last.pt"): ANY}, "config.json kept"


def scaler(**changes):
    """A change of the loss scaler's state: keys set (to None: removed)."""

    def change(t):
        t["scaler"].update(changes)
        for k in [k for k, v in changes.items() if v is None]:
            del t["scaler"][k]

    return change


SCALES = {
    "scale-nan": scaler(scale=math.nan),
    "scale-zero": scaler(scale=0.0),
    "scale-negative": scaler(scale=-2.0),
    "scale-text": scaler(scale="65536"),
    "tracker-negative": scaler(_growth_tracker=-1),
    "tracker-at-the-interval": scaler(_growth_tracker=2000),
    "tracker-float": scaler(_growth_tracker=1.5),
    "growth-factor": scaler(growth_factor=3.0),
    "interval-missing": scaler(growth_interval=None),
    "unknown-key": scaler(extra=1),
    "empty": lambda t: t.update(scaler={}),
}


@pytest.mark.parametrize("damage", list(SCALES))
def test_a_damaged_loss_scaler_is_one_line(capsys, workdir, tmp_path, stopped_fp16_run, damage):
    run_dir = shutil.copytree(stopped_fp16_run, tmp_path / "run")
    result = damage_and_resume(capsys, workdir, run_dir, SCALES[damage], "--amp", "fp16", "--resume")
    assert_refused(result, f"{run_dir / 'last.pt'}: damaged checkpoint: its training state has no valid 'scaler'")


# (the run, a change of its training state that a resume takes, the options it was made with)
WHOLE = {
    "as-saved": ("stopped_run", lambda t: None, []),
    "fp16-as-saved": ("stopped_fp16_run", lambda t: None, ["--amp", "fp16"]),
    "an-older-checkpoint": ("stopped_run", lambda t: t.pop("identity"), []),
    "sums-as-a-list": ("stopped_run", lambda t: t.update(partial=list(t["partial"].values())), []),
    "optimizer-groups-not-read": (
        "stopped_run",
        lambda t: t["optimizer"]["param_groups"][0].update(momentum="x", weight_decay=math.nan),
        [],
    ),
    "stopped-in-evaluation": ("stopped_run", lambda t: t.update(step=10, partial=EPOCH), []),
    "stopped-in-an-epoch": (
        "stopped_run",
        lambda t: t.update(step=6, partial={**EPOCH, "images": 8.0, "hits": 1.0}),
        [],
    ),
}


@pytest.mark.parametrize("case", list(WHOLE))
def test_a_whole_training_state_resumes(capsys, request, workdir, tmp_path, case):
    fixture, change, options = WHOLE[case]
    run_dir = shutil.copytree(request.getfixturevalue(fixture), tmp_path / "run")
    code, _, err = damage_and_resume(capsys, workdir, run_dir, change, *options, "--resume")
    assert code == 0, err
    assert torch.load(run_dir / "last.pt", weights_only=True)["training"]["step"] == 10


# ---- --teacher parent: the parent's record is checked --------------------------------------------------------


def parent_record(tmp_path: Path, inputs: dict[str, Path], case: str) -> object:
    """A student's meta["pruned"] whose parent record is damaged in one way."""
    good = load_model(inputs["model"]).meta["pruned"]
    digest = good["parent_sha256"]
    if case == "fifo":
        os.mkfifo(tmp_path / "fifo")
    return {
        "text": "pruned",
        "list": [good["parent_path"], digest],
        "path-number": {**good, "parent_path": 3},
        "path-list": {**good, "parent_path": [good["parent_path"]]},
        "path-empty": {**good, "parent_path": ""},
        "digest-missing": {k: v for k, v in good.items() if k != "parent_sha256"},
        "digest-short": {**good, "parent_sha256": digest[:12]},
        "digest-number": {**good, "parent_sha256": 7},
        "fifo": {**good, "parent_path": str(tmp_path / "fifo")},
        "device": {**good, "parent_path": "/dev/zero"},
        "folder": {**good, "parent_path": str(tmp_path)},
        "nul": {**good, "parent_path": "a\0b"},
    }[case]


PARENTS = {
    **dict.fromkeys(["text", "list", "path-number", "path-list", "path-empty"], "records no valid parent"),
    **dict.fromkeys(["digest-missing", "digest-short", "digest-number"], "records no valid parent"),
    **dict.fromkeys(["fifo", "device", "folder", "nul"], "is gone or has changed since"),
}


@pytest.mark.parametrize("case", list(PARENTS))
def test_a_damaged_parent_record_is_one_line(capsys, inputs, tmp_path, case):
    student = load_model(inputs["model"])
    damaged = tmp_path / "student.pt"
    student.meta["pruned"] = parent_record(tmp_path, inputs, case)
    student.save(damaged)
    before = snapshot(tmp_path)
    with deadline(60):
        result = run(capsys, *finetune(damaged, inputs["data"], tmp_path / "run", "--teacher", "parent"))
    assert_refused(result, damaged, PARENTS[case])
    assert snapshot(tmp_path) == before


# ---- a teacher takes the student's inputs --------------------------------------------------------------------


NORMAL = "0.5,0.5,0.5:0.25,0.25,0.25"  # the student's normalization (tests/images.py)


def teacher_of(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A teacher file of a ResNet-20 student (CIFAR-10, 32 px, mean 0.5, std 0.25) that differs in one way."""
    path = tmp_path / f"{case}.pt"
    size = {"224-px": 224, "64-px": 64, "33-px": 33, "32-px": 32}.get(case)
    if size is not None:  # a library model: any input size
        mf = library_model("torchvision:mobilenet_v3_small", {"num_classes": 10}, input_size=size, normalize=NORMAL)
        dataclasses.replace(mf, classes=list(CIFAR10_CLASSES)).save(path)
        return path, f"input size {size} (the student's: 32)"
    classes, std = list(CIFAR10_CLASSES), (0.25,) * 3
    if case == "normalization":
        std = (0.2, 0.25, 0.25)
    elif case == "class-order":
        classes[:2] = classes[1::-1]
    else:
        assert case == "class-names"
        classes[-1] = "lorry"
    ModelFile("resnet20", create_model("resnet20"), (0.5,) * 3, std, classes).save(path)
    return path, {"normalization": "normalization", "class-order": "classes", "class-names": "classes"}[case]


@pytest.mark.parametrize("case", ["224-px", "64-px", "33-px", "normalization", "class-order", "class-names"])
def test_a_teacher_of_other_inputs_or_classes_is_refused(capsys, inputs, tmp_path, case):
    teacher, differs = teacher_of(tmp_path, case)
    before = snapshot(tmp_path)
    result = run(capsys, *finetune(inputs["model"], inputs["data"], tmp_path / "run", "--teacher", teacher))
    assert_refused(result, f"the teacher {teacher} takes other inputs or gives other classes", differs)
    assert snapshot(tmp_path) == before


def test_a_library_teacher_of_the_students_inputs_teaches(capsys, inputs, tmp_path):
    teacher, _ = teacher_of(tmp_path, "32-px")
    assert run(capsys, *finetune(inputs["model"], inputs["data"], tmp_path / "run", "--teacher", teacher))[0] == 0


# ---- an option's value: what was expected, never a function's name -------------------------------------------


def typed_options() -> list[tuple[str, str, object]]:
    """(subcommand, option, type) of every option of `chip` whose value a function of chipprune's checks."""
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return [
        (command, action.option_strings[0], action.type)
        for command, sub in subcommands.items()
        for action in sub._actions
        if action.option_strings and callable(action.type) and action.type.__module__.startswith("chipprune")
    ]


TYPED = typed_options()
BAD_VALUES = ["abc", "", " ", "1e999", "-1", "0x10", "nan", "1,2", "{", "9" * 5000, "½"]


@pytest.mark.parametrize(("command", "option", "kind"), TYPED, ids=[f"{c}{o}" for c, o, _ in TYPED])
def test_every_option_type_refuses_in_argparse_own_terms(command, option, kind):
    """argparse shows an ArgumentTypeError's message; for any other error it shows the function's name ('invalid
    _unit_interval value')."""
    for value in BAD_VALUES:
        with contextlib.suppress(argparse.ArgumentTypeError):
            kind(value)


@pytest.mark.parametrize(("command", "option", "kind"), TYPED, ids=[f"{c}{o}" for c, o, _ in TYPED])
def test_a_malformed_option_value_says_what_was_expected(capsys, command, option, kind):
    code, out, err = run(capsys, command, option, "abc")
    assert code == 2 and out == "", err
    line = err.strip()
    assert "\n" not in line and line.startswith(f"chip {command}: error: argument {option}: "), err
    assert not re.search(r"invalid .* value", line), "the type's own message, not argparse's with its name"
    assert "'abc'" in line or "JSON" in line, "the value, or what it should be"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["finetune", "--kd-weight", "abc"], "argument --kd-weight: expected a number in [0, 1], got 'abc'"),
        (["finetune", "--kd-weight", "1.5"], "argument --kd-weight: must be a finite number in [0, 1], got 1.5"),
        (["finetune", "--kd-temperature", "x"], "argument --kd-temperature: expected a number in (0, ∞), got 'x'"),
        (["finetune", "--kd-temperature", "0"], "argument --kd-temperature: must be a finite number in (0, ∞)"),
        (["train", "--epochs", "ten"], "argument --epochs: expected an integer from 1 to 2,147,483,647, got 'ten'"),
        (["eval", "--limit", "2.5"], "argument --limit: expected an integer from 1 to 2,147,483,647, got '2.5'"),
        (["prune", "--ratio", "half"], "argument --ratio: expected a number in [0, 1), got 'half'"),
    ],
)
def test_option_messages_name_the_range(capsys, args, message):
    code, _, err = run(capsys, *args)
    assert code == 2 and f"chip {args[0]}: error: {message}" in err, err
