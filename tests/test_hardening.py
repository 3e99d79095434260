"""Hardening, through the `chip` command and the readers behind it: untrusted files run no code; bad input is one
line on stderr with exit code 2 and no traceback; a process killed while writing a checkpoint leaves the previous one
intact and resumable; and the command line keeps its contract (--version, defaults in every --help, JSON alone on
stdout)."""

import argparse
import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import warnings
import zipfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from attacks import Payload, touching
from chipprune import __version__
from chipprune.cli import build_parser
from chipprune.data import DataError, load_split, sources
from chipprune.fileio import atomic_write, stale_temps
from chipprune.modelfile import (
    CIFAR10_CLASSES,
    FORMAT,
    ModelFile,
    ModelFileError,
    import_weights,
    load_checkpoint,
    load_model,
)
from chipprune.models import ARCHS, create_model
from chipprune.sparsity import SparsityError, format_rates, parse_rates, resolve, widths
from command import run
from images import make_tree

SRC = Path(__file__).resolve().parents[1] / "src" / "chipprune"
pytestmark = pytest.mark.usefixtures("one_thread")


PROGRESS = re.compile(r"\[(\d+:)?\d\d:\d\d[<,]")  # a tqdm bar: "…| 40/40 [00:00<00:00, …]", "0batch [00:00, …]"


def error_line(err):
    """The one line of an error on stderr, after which nothing else; progress bars alone may come before it."""
    assert err.endswith("\n") and "Traceback" not in err, err
    *before, line = err[:-1].split("\n")  # not splitlines: a bar's updates are separated by carriage returns
    assert all(PROGRESS.search(b) for b in before) and "\r" not in line, err
    return line


def assert_refused(result, *wanted):
    """Exit code 2, nothing on stdout, one error line on stderr naming each of `wanted`, no traceback."""
    code, out, err = result
    assert code == 2, err
    assert out == "", out
    line = error_line(err)
    assert line.startswith("chip ") and ": error: " in line, err
    for w in wanted:
        assert str(w) in line, err


def fill(args, **paths):
    """A command line with {name} replaced by paths[name]."""
    return [a.format(**paths) for a in args]


# ---- untrusted files run no code ---------------------------------------------------------------------------


def evil_model(path, marker, how):
    """A 'model file' whose unpickling runs code: torch.save'd or pickle.dump'ed."""
    payload = {"format": FORMAT, "arch": "resnet20", "state_dict": {"conv1.weight": touching(marker)}}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


def evil_weights(path, marker, how):
    """Third-party 'weights' whose unpickling runs code: a state_dict under 'state_dict', or a bare one."""
    state = {"conv1.weight": touching(marker), "fc.weight": torch.zeros(10, 64)}
    if how == "torch.save":
        torch.save({"state_dict": state}, path)
    else:
        path.write_bytes(pickle.dumps(state))
    return path


def evil_cifar(root, marker, how):
    """A cifar-10-batches-py folder (or cifar-10-python.tar.gz) with valid metadata and booby-trapped batches."""
    folder = root / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}, protocol=2)
    )
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": touching(marker), b"labels": [0]}, protocol=2))
    if how == "folder":
        return folder
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    shutil.rmtree(root / "cifar")
    return root / "cifar-10-python.tar.gz"


def naive_load(path):
    """Load a file as a careless reader would: torch.load without weights_only, or plain pickle."""
    if path.is_dir():
        return pickle.loads((path / "data_batch_1").read_bytes())
    if path.name.endswith(".tar.gz"):
        with tarfile.open(path) as tar:
            return pickle.loads(tar.extractfile("cifar-10-batches-py/data_batch_1").read())
    if zipfile.is_zipfile(path):  # torch.save's format
        return torch.load(path, weights_only=False)
    return pickle.loads(path.read_bytes())


@pytest.mark.parametrize(
    "make",
    [
        lambda tmp, m: evil_model(tmp / "m.pt", m, "torch.save"),
        lambda tmp, m: evil_model(tmp / "m.pt", m, "pickle"),
        lambda tmp, m: evil_weights(tmp / "w.th", m, "torch.save"),
        lambda tmp, m: evil_weights(tmp / "w.th", m, "pickle"),
        lambda tmp, m: evil_cifar(tmp, m, "folder"),
        lambda tmp, m: evil_cifar(tmp, m, "tarball"),
    ],
    ids=["model-torch.save", "model-pickle", "weights-torch.save", "weights-pickle", "cifar-folder", "cifar-tarball"],
)
@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's notes on the pickle protocol
def test_the_attack_files_are_live(tmp_path, make):
    """Loaded carelessly, each crafted file does run its code: the refusals below are not vacuous."""
    marker = tmp_path / "pwned"
    path = make(tmp_path, marker)
    naive_load(path)
    assert marker.exists()


MODEL_COMMANDS = {
    "profile": ["profile", "{m}"],
    "export": ["export", "{m}", "--format", "torchscript", "--out", "{o}/x.ts"],
    "score": ["score", "{m}", "--data", "{d}", "--batches", "1", "--batch-size", "4", "--out", "{o}/s.json"],
    "prune": ["prune", "{m}", "--criterion", "l1", "--sparsity", "[0.]*12", "--out", "{o}/p.pt"],
    "eval": ["eval", "{m}", "--data", "{d}"],
    "finetune": [
        "finetune",
        "{m}",
        "--data",
        "{d}",
        "--out-dir",
        "{o}/run",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--workers",
        "0",
    ],
}
IMPORT = ["import", "--arch", "resnet20", "--weights", "{m}", "--out", "{o}/i.pt"]
DATA_COMMANDS = {
    "score": ["score", "{m}", "--data", "{d}", "--batches", "1", "--batch-size", "4", "--out", "{o}/s.json"],
    "prune": [
        "prune",
        "{m}",
        "--data",
        "{d}",
        "--batches",
        "1",
        "--batch-size",
        "4",
        "--sparsity",
        "[0.]*12",
        "--out",
        "{o}/p.pt",
    ],
    "prune-recalibrate": [
        "prune",
        "{m}",
        "--criterion",
        "l1",
        "--data",
        "{d}",
        "--recalibrate-bn",
        "1",
        "--batch-size",
        "4",
        "--sparsity",
        "[0.]*12",
        "--out",
        "{o}/p.pt",
    ],
    "eval": ["eval", "{m}", "--data", "{d}"],
    "finetune": MODEL_COMMANDS["finetune"],
    "train": [
        "train",
        "--arch",
        "resnet20",
        "--data",
        "{d}",
        "--out-dir",
        "{o}/run",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--workers",
        "0",
    ],
}


@pytest.fixture
def out(tmp_path):
    """An empty folder for the outputs of a command that must write none."""
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
@pytest.mark.parametrize("command", [*MODEL_COMMANDS, "import"])
def test_a_model_or_weights_file_runs_no_code(capsys, workdir, tmp_path, out, command, how):
    marker = tmp_path / "pwned"
    make = evil_weights if command == "import" else evil_model
    path = make(tmp_path / "evil.pt", marker, how)
    args = IMPORT if command == "import" else MODEL_COMMANDS[command]
    result = run(capsys, *fill(args, m=path, d=workdir / "data", o=out))
    assert_refused(result, path, "cannot be read safely")
    assert "weights_only" not in result[2], "no advice to turn the safety off"
    assert not marker.exists() and not any(out.iterdir())


@pytest.mark.parametrize("how", ["folder", "tarball"])
@pytest.mark.parametrize("command", list(DATA_COMMANDS))
def test_cifar_batches_run_no_code(capsys, workdir, tmp_path, out, command, how):
    marker = tmp_path / "pwned"
    data = evil_cifar(tmp_path, marker, how)
    result = run(capsys, *fill(DATA_COMMANDS[command], m=workdir / "r20.pt", d=data, o=out))
    assert_refused(result, data, "forbidden global posix.system")
    assert not marker.exists() and not any(out.iterdir())


@pytest.mark.parametrize("command", ["finetune", "train"])
def test_a_run_folder_checkpoint_runs_no_code_on_resume(capsys, workdir, tmp_path, out, command):
    marker = tmp_path / "pwned"
    (out / "run").mkdir()
    last = evil_model(out / "run" / "last.pt", marker, "torch.save")
    before = last.read_bytes()
    result = run(capsys, *fill(DATA_COMMANDS[command], m=workdir / "r20.pt", d=workdir / "data", o=out), "--resume")
    assert_refused(result, last, "cannot be read safely")
    assert not marker.exists() and last.read_bytes() == before


def test_a_scores_file_runs_no_code(capsys, workdir, tmp_path, out):
    marker = tmp_path / "pwned"
    scores = tmp_path / "s.json"
    scores.write_bytes(pickle.dumps({"format": "chipprune-scores/1", "layers": touching(marker)}))
    result = run(
        capsys, "prune", workdir / "r20.pt", "--scores", scores, "--sparsity", "[0.]*12", "--out", out / "p.pt"
    )
    assert_refused(result, scores, "cannot read scores JSON")
    assert not marker.exists() and not any(out.iterdir())


# ---- damaged model files -----------------------------------------------------------------------------------


def spoiled(raw: bytes, how: str) -> bytes:
    """A file's bytes broken one way: empty, cut in half, or random bytes of the same length."""
    return {"empty": b"", "truncated": raw[: len(raw) // 2], "corrupt": np.random.default_rng(0).bytes(len(raw))}[how]


def damaged(path, kind, good):
    """A model file broken in one way, made from the good one."""
    if kind in ("empty", "truncated", "corrupt"):
        path.write_bytes(spoiled(good.read_bytes(), kind))
    elif kind != "missing":
        d = torch.load(good, weights_only=True)
        if kind == "unknown-arch":
            d["arch"] = "resnet99"
        elif kind == "no-classes":
            del d["classes"]
        elif kind == "bad-widths":
            d["widths"] = {"conv1": "sixteen"}
        elif kind == "bad-state":
            d["state_dict"] = ["not", "a", "dict"]
        torch.save(d, path)
    return path


FILE_DAMAGE = {
    "missing": "no such file",
    "empty": "empty file (0 bytes)",
    "truncated": "corrupt or truncated",
    "corrupt": "corrupt or truncated",
}
FIELD_DAMAGE = {
    "unknown-arch": "damaged model file: unknown architecture 'resnet99'",
    "no-classes": "damaged model file: no 'classes'",
    "bad-widths": "damaged model file: invalid 'widths'",
    "bad-state": "damaged model file: invalid 'state_dict'",
}


@pytest.mark.parametrize(
    ("command", "kind"),
    [  # import reads any state_dict, not a model file's fields
        *((c, k) for c in MODEL_COMMANDS for k in (*FILE_DAMAGE, *FIELD_DAMAGE)),
        *(("import", k) for k in FILE_DAMAGE),
    ],
)
def test_damaged_model_files_are_one_line_errors(capsys, workdir, tmp_path, out, command, kind):
    path = damaged(tmp_path / "bad.pt", kind, workdir / "r20.pt")
    args = IMPORT if command == "import" else MODEL_COMMANDS[command]
    result = run(capsys, *fill(args, m=path, d=workdir / "data", o=out))
    assert_refused(result, path, {**FILE_DAMAGE, **FIELD_DAMAGE}[kind])
    assert not any(out.iterdir())


def test_weights_of_other_names_and_shapes_are_listed(capsys, workdir, tmp_path, out):
    state = create_model("resnet20").state_dict()
    state["layer1.0.bn1.weight"] = torch.ones(3)
    del state["layer2.0.conv1.weight"]
    state["head.weight"] = torch.ones(1)
    torch.save(state, tmp_path / "w.th")
    assert_refused(
        run(capsys, *fill(IMPORT, m=tmp_path / "w.th", o=out)),
        "weights do not fit the architecture",
        "missing layer2.0.conv1.weight",
        "unexpected head.weight",
        "layer1.0.bn1.weight: shape (3,)",
    )
    d = torch.load(workdir / "r20.pt", weights_only=True)  # a model file whose weights were edited
    d["state_dict"]["layer3.2.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(d, tmp_path / "m.pt")
    assert_refused(
        run(capsys, "profile", tmp_path / "m.pt"),
        "layer3.2.conv2.weight: shape (64, 64, 1, 1) where the model has (64, 64, 3, 3)",
    )


@pytest.mark.parametrize("signs", ["+", "+-"])
@pytest.mark.parametrize("command", ["score", "prune"])
def test_non_finite_activations_name_the_layer(capsys, workdir, tmp_path, out, command, signs):
    d = torch.load(workdir / "r20.pt", weights_only=True)  # finite weights (others are refused on loading) ...
    weight = d["state_dict"]["layer2.0.conv1.weight"]
    weight.fill_(3e38)  # ... whose sums overflow float32: to Inf, or with both signs to NaN (Inf - Inf)
    if signs == "+-":
        weight[:, ::2] = -3e38
    torch.save(d, tmp_path / "m.pt")
    result = run(capsys, *fill(DATA_COMMANDS[command], m=tmp_path / "m.pt", d=workdir / "data", o=out))
    assert_refused(result, f"chip {command.split('-')[0]}: error: non-finite activations in layer2.0.conv1")
    assert not any(out.iterdir())


# ---- bad data ----------------------------------------------------------------------------------------------


def broken_data(root, kind, good):
    """A copy of the good image folder (or a tarball of it) broken in one way, in both splits."""
    if kind.endswith("archive"):
        path = root / "data.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            tar.add(good, arcname="data")
        path.write_bytes(spoiled(path.read_bytes(), kind.removesuffix("-archive")))
        return path
    data = shutil.copytree(good, root / "data")
    for split in ("train", "test"):
        image = data / split / "cat" / "0.png"
        if kind.endswith("-image"):
            image.write_bytes(spoiled(image.read_bytes(), kind.removesuffix("-image")))
        elif kind == "no-images":
            for f in (data / split / "cat").iterdir():
                f.unlink()
            (data / split / "cat" / "README.txt").write_text("no images here")
        elif kind == "no-class-folders":
            for d in list((data / split).iterdir()):
                shutil.rmtree(d)
            Image.new("RGB", (32, 32)).save(data / split / "flat.png")
    return data


DATA_DAMAGE = {
    "empty-archive": ("empty archive", "data.tar.gz"),
    "truncated-archive": ("corrupt or truncated archive", "data.tar.gz"),
    "corrupt-archive": ("corrupt or truncated archive", "data.tar.gz"),
    "empty-image": ("empty image file", "cat/0.png"),
    "truncated-image": ("cannot decode image", "cat/0.png"),
    "corrupt-image": ("cannot decode image", "cat/0.png"),
    "no-images": ("class folder 'cat' has no images", "data/"),
    "no-class-folders": ("no class folders in", "data/"),
}


@pytest.mark.parametrize("kind", list(DATA_DAMAGE))
@pytest.mark.parametrize("command", ["score", "eval", "train"])
def test_damaged_data_is_a_one_line_error(capsys, workdir, tmp_path, out, command, kind):
    data = broken_data(tmp_path, kind, workdir / "data")
    result = run(capsys, *fill(DATA_COMMANDS[command], m=workdir / "r20.pt", d=data, o=out))
    assert_refused(result, f"chip {command}: error: ", *DATA_DAMAGE[kind])
    assert not any(out.iterdir())


def test_a_damaged_test_split_stops_training_rather_than_skipping_evaluation(capsys, workdir, tmp_path, out):
    data = shutil.copytree(workdir / "data", tmp_path / "data")
    (data / "test" / "dog" / "1.png").write_bytes(b"garbage")
    result = run(capsys, *fill(DATA_COMMANDS["train"], m="", d=data, o=out))
    assert_refused(result, "cannot decode image", "test/dog/1.png")
    assert "training without evaluation" not in result[2] and not (out / "run" / "last.pt").exists()


def test_mixed_image_sizes_name_two_files_and_sizes(capsys, workdir, tmp_path, out):
    data = shutil.copytree(workdir / "data", tmp_path / "data")
    Image.new("RGB", (28, 30)).save(data / "train" / "horse" / "2.png")
    result = run(capsys, *fill(DATA_COMMANDS["score"], m=workdir / "r20.pt", d=data, o=out))
    assert_refused(result, "must all be one size", "airplane/0.png is 32x32", "horse/2.png is 28x30")


def test_inconsistent_classes_between_the_splits(capsys, workdir, tmp_path, out):
    data = shutil.copytree(workdir / "data", tmp_path / "data")
    (data / "test" / "truck").rename(data / "test" / "lorry")
    for command in ("eval", "train"):
        result = run(capsys, *fill(DATA_COMMANDS[command], m=workdir / "r20.pt", d=data, o=out))
        assert_refused(result, "differ from the other split's: lorry, truck")
    # Each split in its own tarball, or the evaluation split given apart: compared when training.
    many, val = tmp_path / "many", tmp_path / "val"
    many.mkdir()
    for split in ("train", "test"):
        with tarfile.open(many / f"{split}.tar.gz", "w:gz") as tar:
            tar.add(data / split, arcname=split)
    shutil.copytree(data / "test", val / "test")
    for source in ([many], [workdir / "data", "--val-data", val]):
        result = run(
            capsys,
            "train",
            "--arch",
            "resnet20",
            "--data",
            *source,
            "--out-dir",
            out / "run",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--workers",
            "0",
        )
        assert_refused(result, "the evaluation split's classes differ")
    assert not any(out.iterdir())


# ---- bad options -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["profile", "--arch", "resnet20", "--sparsity", "[0.]+[0.99]*11"], "sparsity leaves no channels in"),
        (
            ["prune", "{m}", "--criterion", "l1", "--sparsity", "[0.]+[0.95]*11", "--out", "{o}/p.pt"],
            "sparsity leaves no channels in",
        ),
        (["prune", "{m}", "--criterion", "l1", "--sparsity", "[0.]*11+[-0.1]", "--out", "{o}/p.pt"], "not a rate"),
        (["profile", "--arch", "resnet20", "--sparsity", "[0.1]*x"], "cannot read '[0.1]*x'"),
        (["profile", "--arch", "resnet20", "--sparsity", "__import__('os')"], "not a rate"),
        (["profile", "--arch", "resnet20", "--sparsity", " "], "empty sparsity"),
        (["profile", "--arch", "vgg16_bn", "--sparsity", "[0.5]*13"], "vgg16_bn takes 12 rates"),
    ],
)
def test_bad_sparsity_is_a_one_line_error(capsys, workdir, out, args, message):
    assert_refused(run(capsys, *fill(args, m=workdir / "r20.pt", o=out)), message)
    assert not any(out.iterdir())


def test_a_huge_repeat_count_is_a_one_line_error(capsys):
    assert_refused(run(capsys, "profile", "--arch", "resnet20", "--sparsity", "[0.1]*" + "9" * 30), "rates")


@pytest.mark.parametrize(
    "args",
    [
        ["profile", "--arch", "resnet99"],
        ["import", "--arch", "resnet99", "--weights", "w.th", "--out", "x.pt"],
        ["train", "--arch", "resnet99", "--data", "d", "--out-dir", "r"],
    ],
)
def test_an_unknown_architecture_lists_the_known_ones(capsys, args):
    code, out, err = run(capsys, *args)
    assert code == 2 and out == "" and "Traceback" not in err
    assert "invalid choice: 'resnet99'" in err and "resnet20" in err and "vgg16_bn" in err


# ---- the command line's contract ---------------------------------------------------------------------------


def test_version_is_the_package_version(capsys):
    code, out, err = run(capsys, "--version")
    assert code == 0 and out == f"chipprune {__version__}\n" and err == ""
    assert __version__ == version("chipprune")


def subcommands():
    """The subparsers of `chip`, by name."""
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def help_entries(text):
    """Each option string of a --help text -> its entry (invocation and help, whitespace collapsed)."""
    entries, current = {}, None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            current = [line]
            for opt in re.findall(r"(?<![\w-])--?[\w-]+", re.split(r"\s{2,}", line.strip())[0]):
                entries[opt] = current
        elif current is not None and line.startswith("    "):
            current.append(line)
        else:
            current = None
    return {opt: " ".join(" ".join(lines).split()) for opt, lines in entries.items()}


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_help_shows_each_default(capsys, monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping: a default is never split across lines
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    entries = help_entries(out)
    checked = 0
    for action in subcommands()[command]._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction) or action.default is None:
            continue
        entry = entries[action.option_strings[0]]
        if action.default is argparse.SUPPRESS:  # the training hyperparameters: each preset has its own
            assert "(default: " in entry, entry
        else:
            assert f"(default: {action.default})" in entry, entry
        checked += 1
    assert checked, "every command has options with defaults"


def test_json_alone_on_stdout_progress_and_warnings_on_stderr(workdir, tmp_path):
    env = dict(os.environ)  # one thread and this test's cache, from the one_thread fixture
    cmd = [
        sys.executable,
        "-m",
        "chipprune.cli",
        "prune",
        str(workdir / "r20.pt"),
        "--data",
        str(workdir / "data"),
        "--batches",
        "20",
        "--batch-size",
        "4",
        "--sparsity",
        "[0.]+[0.5]*11",
        "--out",
        str(tmp_path / "p.pt"),
        "--json",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # the whole of stdout is one JSON document
    assert result["images"] == 40 and result["out"] == str(tmp_path / "p.pt")
    assert "warning: asked for 80 calibration images, the train split has 40" in done.stderr
    assert "scoring (chip)" in done.stderr and "decoding" in done.stderr
    bad = subprocess.run(
        cmd[:-1] + ["--sparsity", "[0.]*3", "--json"], capture_output=True, text=True, env=env, timeout=120
    )
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1


# ---- every write is atomic; a killed checkpoint write loses nothing ----------------------------------------


WRITERS = [
    r"\.write_(text|bytes)\(",
    r"\bopen\([^)]*['\"][wax]",
    r"torch\.save\(",
    r"json\.dump\(",
    r"np\.save",
    r"\.savefig\(",
    r"torch\.jit\.save\(",
    r"torch\.onnx\.export\(",
]
# Writes that are not files of their own: torch.save and savefig into memory buffers; export's staging files in a
# temporary folder, copied with atomic_write once checked.
ALLOWED = {
    ("fileio.py", r"torch\.save\("): "torch.save(obj, buffer)",
    ("train.py", r"\.savefig\("): "savefig(buffer",
    ("export.py", r"torch\.jit\.save\("): "str(staged)",
    ("export.py", r"torch\.onnx\.export\("): "str(path)",
}


def test_every_file_is_written_through_atomic_write():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines, 1):
            for pattern in WRITERS:
                if re.search(pattern, line):
                    allowed = ALLOWED.get((path.name, pattern))
                    call = " ".join(
                        lines[i - 1 : i + 3]
                    )  # the call's first arguments, on its following lines once formatted
                    if allowed is None or allowed not in call:
                        found.append(f"{path.name}:{i}: {line.strip()}")
    assert not found, "write through fileio.atomic_write:\n" + "\n".join(found)
    assert "atomic_write(path, staged.read_bytes())" in (SRC / "export.py").read_text()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        atomic_write(target, b"new" * 1000)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


# The child: `chip finetune` whose second write of last.pt (after epoch 2) stops half-way through the temp file,
# says where it is, and waits to be killed. Only fileio's view of os/tempfile is patched: the real atomic_write runs.
CHILD = """
import os, sys, tempfile, time, types
from pathlib import Path
from chipprune import fileio
from chipprune.cli import main

ready, temps = Path(sys.argv[1]), []

def mkstemp(*args, **kw):
    fd, name = tempfile.mkstemp(*args, **kw)
    temps.append((fd, name))
    return fd, name

class HalfWrite:
    def __init__(self, f, name):
        self.f, self.name = f, name
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.f.__exit__(*exc)
    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        ready.write_text(self.name)
        time.sleep(600)

def fdopen(fd, *args, **kw):
    f = os.fdopen(fd, *args, **kw)
    checkpoints = [name for _, name in temps if Path(name).name.startswith(".last.pt.")]
    if len(checkpoints) == 2 and temps[-1] == (fd, checkpoints[-1]):
        return HalfWrite(f, checkpoints[-1])
    return f

fileio.tempfile = types.SimpleNamespace(mkstemp=mkstemp)
fileio.os = types.SimpleNamespace(**{**vars(os), "fdopen": fdopen})
sys.exit(main(sys.argv[2:]))
"""


def test_a_kill_during_a_checkpoint_write_keeps_the_previous_one_resumable(capsys, workdir, tmp_path):
    args = [
        "finetune",
        str(workdir / "r20.pt"),
        "--data",
        str(workdir / "data"),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "0.05",
        "--workers",
        "0",
    ]
    run_dir, ready, log = tmp_path / "run", tmp_path / "ready", tmp_path / "log.txt"
    env = dict(os.environ)  # one thread, from the one_thread fixture
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(ready), *args, "--out-dir", str(run_dir)], stdout=f, stderr=f, env=env
        )
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert proc.poll() is None, f"exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the second checkpoint write never started"
            time.sleep(0.02)
        before = (run_dir / "last.pt").read_bytes()
        temp = Path(ready.read_text())
        assert temp.parent == run_dir and 0 < temp.stat().st_size < len(before), "killed mid-write, half written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    assert (run_dir / "last.pt").read_bytes() == before, "the previous checkpoint is untouched"
    mf, state = load_checkpoint(run_dir / "last.pt")
    assert state is not None and state["step"] == 5 and [h["epoch"] for h in state["history"]] == [1]
    assert stale_temps(run_dir / "last.pt") == [temp], "the half-written file is a dot-file, never read as last.pt"
    assert sorted(p.name for p in run_dir.glob("*.pt")) == ["best.pt", "last.pt"]

    assert run(capsys, *args, "--out-dir", run_dir, "--resume")[0] == 0
    assert run(capsys, *args, "--out-dir", tmp_path / "straight")[0] == 0
    resumed = torch.load(run_dir / "last.pt", weights_only=True)
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    assert json.loads((run_dir / "config.json").read_text())["start_step"] == 5, "resumed after epoch 1"
    assert resumed["training"]["step"] == 10
    assert all(torch.equal(v, straight["state_dict"][k]) for k, v in resumed["state_dict"].items()), "bit for bit"
    assert not stale_temps(run_dir / "last.pt"), "the resumed run removed the killed write's temp file"


# ---- training runs -----------------------------------------------------------------------------------------


def test_a_checkpoint_with_damaged_training_state_is_a_one_line_error(workdir, tmp_path, capsys):
    args = [
        "finetune",
        workdir / "r20.pt",
        "--data",
        workdir / "data",
        "--out-dir",
        tmp_path / "run",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--workers",
        "0",
    ]
    assert run(capsys, *args)[0] == 0
    d = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    del d["training"]["optimizer"]
    torch.save(d, tmp_path / "run" / "last.pt")
    code, _, err = run(capsys, *args, "--resume")
    assert code == 2
    assert err.split("\n")[-2].endswith("run/last.pt: damaged checkpoint: its training state has no valid 'optimizer'")


# ---- sparsity strings --------------------------------------------------------------------------------------


# Pieces of sparsity strings, near-valid and not: st.text alone seldom makes a bracket list. No bare digits, so a
# repeat count has at most two digits (a count of billions would build a list of billions: see test_hardening).
PIECES = ["[", "]", "0.1", ".5", "1e-1", "1.", "0.", "*3", ",", "+", " ", "-", "x", "e5", "(", ";", "paper-1"]


@given(st.lists(st.sampled_from(PIECES), max_size=12).map("".join))
def test_near_valid_strings_raise_nothing_but_our_error(text):
    for call in (parse_rates, lambda t: resolve("resnet20", t), lambda t: widths("resnet56", t)):
        with contextlib.suppress(SparsityError):
            call(text)


@given(
    st.sampled_from(sorted(ARCHS)).flatmap(
        lambda a: st.tuples(
            st.just(a),
            st.lists(st.floats(0, 1, exclude_max=True), min_size=ARCHS[a].num_rates, max_size=ARCHS[a].num_rates),
        )
    )
)
def test_valid_configurations_round_trip_in_both_forms(arch_rates):
    arch, rates = arch_rates
    assert resolve(arch, format_rates(rates)) == rates
    assert resolve(arch, ",".join(map(repr, rates))) == rates
    try:
        w = widths(arch, format_rates(rates))
    except SparsityError as e:
        assert "leaves no channels" in str(e)
    else:
        assert min(w.values()) >= 1


# ---- model files, read directly ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(arch="resnet99"), "unknown architecture 'resnet99'"),
        (lambda d: d.pop("state_dict"), "no 'state_dict'"),
        (lambda d: d.update(num_classes=0), "invalid 'num_classes'"),
        (lambda d: d.update(classes=["a", "b"]), "invalid 'classes'"),
        (lambda d: d.update(std=[1.0, 0.0, 1.0]), "invalid 'std'"),
        (lambda d: d.update(widths={"conv1": -3}), "invalid 'widths'"),
        (lambda d: d.update(widths={"nonsense": 3}), "widths do not fit resnet20"),
        (lambda d: d.update(training=[1]), "invalid 'training'"),
    ],
)
def test_a_damaged_model_dict_names_the_field(tmp_path, change, message):
    ModelFile("resnet20", create_model("resnet20"), (0.5,) * 3, (0.5,) * 3, [str(i) for i in range(10)]).save(
        tmp_path / "m.pt"
    )
    d = torch.load(tmp_path / "m.pt", weights_only=True)
    change(d)
    torch.save(d, tmp_path / "m.pt")
    with pytest.raises(ModelFileError, match=message) as e:
        load_model(tmp_path / "m.pt")
    assert str(e.value).startswith(f"{tmp_path / 'm.pt'}: ") and "\n" not in str(e.value)


def test_refusals_never_advise_turning_weights_only_off(tmp_path):
    torch.save({"a": touching(tmp_path / "pwned")}, tmp_path / "evil.pt")
    with pytest.raises(ModelFileError) as e:
        load_model(tmp_path / "evil.pt")
    assert "it asks for posix.system" in str(e.value) and "weights_only" not in str(e.value)


def test_import_reports_tensors_of_the_wrong_rank_as_shape_mismatches(tmp_path):
    state = create_model("resnet20").state_dict()
    state["conv1.weight"], state["fc.weight"] = torch.tensor(1.0), torch.zeros(10)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ModelFileError, match=r"conv1.weight: shape \(\) where the model has \(16, 3, 3, 3\)") as e:
        import_weights("resnet20", tmp_path / "w.pt")
    assert "fc.weight: shape (10,)" in str(e.value)


# ---- data sources and the decoded-image cache, read directly -----------------------------------------------


def test_small_images_of_mixed_sizes_are_an_error_naming_two(tmp_path: Path, cache: Path) -> None:
    make_tree(tmp_path / "root", {"train": {"a": 2, "b": 2}}, size=(8, 6))
    Image.new("RGB", (7, 6)).save(tmp_path / "root/train/b/01.png")
    with pytest.raises(DataError, match=r"must all be one size: .*a/00.png is 8x6, .*b/01.png is 7x6$"):
        load_split(tmp_path / "root", "train", cache_dir=cache, progress=False)
    assert not cache.exists(), "nothing cached"


def test_small_then_large_images_are_read_lazily(tmp_path: Path, cache: Path) -> None:
    make_tree(tmp_path / "root", {"train": {"a": 1, "b": 1, "c": 1}}, size=(8, 6))  # ImageNet has tiny images too
    Image.new("RGB", (7, 6)).save(tmp_path / "root/train/b/00.png")
    Image.new("RGB", (300, 200)).save(tmp_path / "root/train/c/00.png")
    data = load_split(tmp_path / "root", "train", cache_dir=cache, progress=False)
    assert data.images is None and data.paths is not None and len(data.paths) == 3


@pytest.mark.parametrize(
    ("name", "message"),
    [("d.tar.gz", "empty archive .*d.tar.gz"), ("root/train/a/00.png", "empty image file .*a/00.png")],
)
def test_empty_files_are_named(tmp_path: Path, cache: Path, name: str, message: str) -> None:
    make_tree(tmp_path / "root", {"train": {"a": 2}})
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError, match=message):
        load_split(tmp_path / name.split("/")[0], "train", cache_dir=cache, progress=False)


def test_an_absent_split_is_told_apart_from_a_damaged_one(tmp_path: Path, cache: Path) -> None:
    make_tree(tmp_path / "root", {"train": {"a": 2}})
    with pytest.raises(sources.MissingSplit):
        load_split(tmp_path / "root", "test", cache_dir=cache, progress=False)
    make_tree(tmp_path / "root", {"test": {"a": 1}})
    (tmp_path / "root/test/a/00.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot decode") as err:
        load_split(tmp_path / "root", "test", cache_dir=cache, progress=False)
    assert not isinstance(err.value, sources.MissingSplit)


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", "malicious", "wrong-dtype"])
@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's note on the pickle protocol
def test_a_damaged_cache_file_is_decoded_again(tmp_path: Path, cache: Path, content: bytes | str) -> None:
    expected = make_tree(tmp_path / "root", {"train": {"a": 2}})
    load_split(tmp_path / "root", "train", cache_dir=cache, progress=False)
    (file,) = cache.iterdir()
    if content == "malicious":
        file.write_bytes(pickle.dumps({"classes": Payload(os.system, (f"touch {tmp_path / 'pwned'}",))}))
    elif content == "wrong-dtype":
        torch.save({"classes": ["a"], "labels": torch.zeros(2, dtype=torch.int64), "images": torch.zeros(2, 3)}, file)
    else:
        file.write_bytes(content)  # type: ignore[arg-type]
    with pytest.warns(UserWarning, match=f"ignoring unreadable cache file {re.escape(str(file))}") as said:
        data = load_split(tmp_path / "root", "train", cache_dir=cache, progress=False)
    assert data.images is not None and torch.equal(data.images, expected["train"][0])
    assert not any("weights_only" in str(w.message) for w in said)
    assert not (tmp_path / "pwned").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten: read from the cache again, without a word
        assert load_split(tmp_path / "root", "train", cache_dir=cache, progress=False).images is not None
