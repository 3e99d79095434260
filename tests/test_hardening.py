"""Hardening, through the `chip` command and the readers behind it: untrusted files run no code; bad input is one
line on stderr with exit code 2 and no traceback; a process killed while writing a checkpoint leaves the previous one
intact and resumable; and the command line keeps its contract (--version, defaults in every --help, JSON alone on
stdout)."""

import argparse
import contextlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
import zipfile
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from attacks import Payload, touching
from chipprune import __version__
from chipprune.cli import build_parser
from chipprune.data import DataError, load_split, sources
from chipprune.deploy import export as export_module
from chipprune.files import fileio
from chipprune.files.fileio import atomic_write, stale_temps
from chipprune.files.modelfile import (
    CIFAR10_CLASSES,
    FORMAT,
    ModelFile,
    ModelFileError,
    import_weights,
    load_checkpoint,
    load_model,
)
from chipprune.files.scores import ScoresError, read_scores
from chipprune.models import ARCHS, create_model
from chipprune.pruning.sparsity import SparsityError, format_rates, parse_rates, resolve, widths
from command import run
from images import make_tree, png16

SRC = Path(__file__).resolve().parents[1] / "src" / "chipprune"
pytestmark = pytest.mark.usefixtures("one_thread")


PROGRESS = re.compile(r"\[(\d+:)?\d\d:\d\d[<,]")  # a tqdm bar: "…| 40/40 [00:00<00:00, …]", "0batch [00:00, …]"
WARNING = re.compile(r"chip [a-z]+: warning: ")


def error_line(err):
    """The one line of an error on stderr, after which nothing else; progress bars, warnings and the training
    loop's precision line (one line each) alone may come before it."""
    assert err.endswith("\n") and "Traceback" not in err, err
    *before, line = err[:-1].split("\n")  # not splitlines: a bar's updates are separated by carriage returns
    for b in before:
        last = b.split("\r")[-1]
        assert PROGRESS.search(b) or WARNING.match(last) or last.startswith("precision: "), err
    assert "\r" not in line, err
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
    assert "unknown architecture 'resnet99'" in err and "resnet20" in err and "vgg16_bn" in err
    assert "torchvision:NAME or timm:NAME" in err and err.count("\n") == 1


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
# Writes that are not files of their own: torch.save, safetensors' save, savefig and the latency table's ONNX export
# into memory buffers; export's staging files in a temporary folder, copied with atomic_write once checked.
ALLOWED = {
    ("fileio.py", r"torch\.save\("): "torch.save(obj, buffer)",
    ("modelfile.py", r"torch\.save\("): "atomic_write(path, safetensors.torch.save(",
    ("latency.py", r"torch\.onnx\.export\("): "buffer, dynamo=False",
    ("loop.py", r"\.savefig\("): "savefig(buffer",
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
    assert "atomic_write(path, staged.read_bytes())" in (SRC / "deploy" / "export.py").read_text()


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
from chipprune.files import fileio
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


# ==== round 2 (issue 20): one test (or a few) per class of defect, each over several inputs ===================


def writers(model):
    """The commands that write one output file, as argument lists with {o} for the output."""
    return {
        "import": ["import", "--arch", "resnet20", "--weights", str(model), "--out", "{o}"],
        "score": ["score", str(model), "--criterion", "l1", "--out", "{o}"],
        "prune": ["prune", str(model), "--criterion", "l1", "--sparsity", "[0.]*12", "--out", "{o}"],
    }


def write(capsys, model, command, output):
    """Run a writing command with `output` as its output."""
    return run(capsys, *[a.replace("{o}", str(output)) for a in writers(model)[command]])


# ---- 1. writing never replaces what is not a regular file, nor loses a file's mode -------------------------


def output_of_kind(tmp_path, kind):
    """An output path of one kind that must be refused, and what the refusal says."""
    if kind == "device":
        return "/dev/null", "/dev/null is a character device: an output must be a regular file or a new path"
    if kind == "fifo":
        os.mkfifo(tmp_path / "fifo")
        return tmp_path / "fifo", "is a FIFO (named pipe)"
    if kind == "folder":
        (tmp_path / "folder").mkdir()
        return tmp_path / "folder", "is a folder"
    if kind == "link-to-device":
        (tmp_path / "null").symlink_to("/dev/null")
        return tmp_path / "null", "is a character device"
    if kind == "empty":
        return "", "empty output path"
    if kind == "under-a-file":
        (tmp_path / "file").write_text("x")
        return tmp_path / "file" / "m.pt", "file is a regular file, not a folder"
    if kind == "name-too-long":
        return tmp_path / ("m" * 253 + ".pt"), "a name of 256 bytes, over the 255 the file system allows"
    assert kind == "under-proc"
    return "/proc/chip-test/m.pt", "cannot write /proc/chip-test/m.pt"


@pytest.mark.parametrize("command", ["import", "score", "prune"])
@pytest.mark.parametrize(
    "kind", ["device", "fifo", "folder", "link-to-device", "empty", "under-a-file", "name-too-long", "under-proc"]
)
def test_an_output_that_cannot_be_a_regular_file_is_refused(capsys, workdir, tmp_path, command, kind):
    output, message = output_of_kind(tmp_path, kind)
    assert_refused(write(capsys, workdir / "r20.pt", command, output), message)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode), "/dev/null is still the device"
    if kind == "fifo":
        assert stat.S_ISFIFO(os.stat(output).st_mode)


@pytest.mark.parametrize(
    ("failure", "message"),
    [("read-only", "is on a read-only file system"), ("disk-full", "cannot write {o}: No space left on device")],
)
def test_a_write_error_is_one_line_and_keeps_the_old_file(capsys, workdir, tmp_path, monkeypatch, failure, message):
    output = tmp_path / "m.pt"
    output.write_bytes(b"old")
    if failure == "read-only":
        statvfs = os.statvfs
        monkeypatch.setattr(os, "statvfs", lambda p: SimpleNamespace(f_flag=statvfs(p).f_flag | os.ST_RDONLY))
    else:

        def full(fd):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", full)
    assert_refused(write(capsys, workdir / "r20.pt", "import", output), message.format(o=output))
    assert output.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_a_link_is_written_through_and_a_replaced_file_keeps_its_mode_and_owner(capsys, workdir, tmp_path):
    target = tmp_path / "target.pt"
    target.write_bytes(b"old")
    target.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(target, 1234, 1234)
    (tmp_path / "link.pt").symlink_to(target)
    assert write(capsys, workdir / "r20.pt", "import", tmp_path / "link.pt")[0] == 0
    assert (tmp_path / "link.pt").is_symlink(), "the link is kept, its target replaced"
    assert load_model(target).arch == "resnet20"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    if os.geteuid() == 0:
        assert (target.stat().st_uid, target.stat().st_gid) == (1234, 1234)


def test_a_250_byte_file_name_is_written_and_its_temp_file_found(capsys, workdir, tmp_path):
    output = tmp_path / ("m" * 247 + ".pt")
    assert write(capsys, workdir / "r20.pt", "import", output)[0] == 0
    assert load_model(output).arch == "resnet20"
    fd, temp = tempfile.mkstemp(prefix=fileio._temp_prefix(output.name), suffix=".tmp", dir=tmp_path)
    os.close(fd)
    assert len(Path(temp).name.encode()) <= 255 and stale_temps(output) == [Path(temp)]


# ---- 2. an output is never an input of the same command ----------------------------------------------------


SAME = {
    "export": (["export", "{m}", "--format", "torchscript", "--out", "{o}"], "m"),
    "score-model": (["score", "{m}", "--criterion", "l1", "--out", "{o}"], "m"),
    "score-data": (["score", "{m}", "--data", "{d}", "--out", "{o}"], "d"),
    "prune-model": (["prune", "{m}", "--criterion", "l1", "--sparsity", "[0.]*12", "--out", "{o}"], "m"),
    "prune-scores": (["prune", "{m}", "--scores", "{s}", "--sparsity", "[0.]*12", "--out", "{o}"], "s"),
    "import": (["import", "--arch", "resnet20", "--weights", "{m}", "--out", "{o}"], "m"),
}


@pytest.mark.parametrize("how", ["same-path", "symlink", "hard-link", "other-spelling"])
@pytest.mark.parametrize("case", list(SAME))
def test_an_output_that_is_an_input_is_refused(capsys, workdir, tmp_path, monkeypatch, case, how):
    monkeypatch.chdir(tmp_path)
    inputs = {"m": tmp_path / "m.pt", "s": tmp_path / "s.json", "d": tmp_path / "data.tar.gz"}
    shutil.copy(workdir / "r20.pt", inputs["m"])
    assert run(capsys, "score", inputs["m"], "--criterion", "l1", "--out", inputs["s"])[0] == 0
    with tarfile.open(inputs["d"], "w:gz") as tar:
        tar.add(workdir / "data", arcname="data")
    args, which = SAME[case]
    victim = inputs[which]
    output = {
        "same-path": victim,
        "symlink": tmp_path / "link",
        "hard-link": tmp_path / "hard",
        "other-spelling": Path("sub/..") / victim.name,
    }[how]
    (tmp_path / "sub").mkdir()
    if how == "symlink":
        output.symlink_to(victim)
    elif how == "hard-link":
        os.link(victim, output)
    before = victim.read_bytes()
    result = run(capsys, *fill(args, m=inputs["m"], s=inputs["s"], d=inputs["d"], o=output))
    assert_refused(result, f"--out {output} is ", "an input of this command: writing it would destroy it")
    assert victim.read_bytes() == before


def test_prune_replaces_its_model_file_only_when_asked(capsys, workdir, tmp_path):
    model = shutil.copy(workdir / "r20.pt", tmp_path / "m.pt")
    args = ["prune", model, "--criterion", "l1", "--sparsity", "[0.]+[0.5]*11", "--out", model]
    assert_refused(run(capsys, *args), "an input of this command", "--overwrite-input")
    assert run(capsys, *args, "--overwrite-input")[0] == 0
    assert load_model(model).model.widths["layer1.0.conv1"] == 8


@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
def test_a_run_folder_never_replaces_its_model_file(capsys, workdir, tmp_path, name):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model = shutil.copy(workdir / "r20.pt", run_dir / name)  # a run's file given as the model to fine-tune
    before = model.read_bytes()
    result = run(capsys, *fill(MODEL_COMMANDS["finetune"], m=model, d=workdir / "data", o=tmp_path), "--resume")
    assert_refused(result, f"--out-dir {run_dir} would replace {model}, an input of this command, with its {name}")
    assert model.read_bytes() == before


# ---- 3. run folders: one process at a time, the same run on --resume, no other run's files overwritten -----


def finetune(model, data, run_dir, *more):
    """The arguments of a one-epoch `chip finetune` into run_dir."""
    args = ["finetune", model, "--data", data, "--out-dir", run_dir, "--epochs", "1", "--batch-size", "8"]
    return [*args, "--workers", "0", *more]


HOLD_LOCK = """
import sys, time
from pathlib import Path
from chipprune.training.runs import run_lock
with run_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(300)
"""


def test_a_run_folder_is_locked_while_a_process_uses_it(capsys, workdir, tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        result = run(capsys, *finetune(workdir / "r20.pt", workdir / "data", run_dir))
        assert_refused(result, f"{run_dir} is in use by another chip process (pid {holder.pid})")
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"], "nothing written"
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert run(capsys, *finetune(workdir / "r20.pt", workdir / "data", run_dir))[0] == 0, "free once it is gone"


@pytest.mark.parametrize("change", ["model", "data", "val-data"])
def test_resume_continues_only_the_same_run(capsys, workdir, tmp_path, change):
    model = shutil.copy(workdir / "r20.pt", tmp_path / "m.pt")
    data = shutil.copytree(workdir / "data", tmp_path / "data")
    val = shutil.copytree(workdir / "data" / "test", tmp_path / "val" / "test")
    run_dir = tmp_path / "run"
    assert run(capsys, *finetune(model, data, run_dir, "--val-data", val.parent))[0] == 0
    config = (run_dir / "config.json").read_bytes()
    if change == "model":  # another model file at the same path
        d = torch.load(model, weights_only=True)
        d["state_dict"]["fc.bias"] += 1
        torch.save(d, model)
        wanted = "model file (SHA-256)"
    elif change == "data":  # other data: one training image fewer
        (data / "train" / "cat" / "0.png").unlink()
        wanted = "training images 40 (now 39)"
    else:
        shutil.copytree(workdir / "data" / "test", tmp_path / "val2" / "test")
        val = tmp_path / "val2" / "test"
        wanted = f"--val-data {(tmp_path / 'val').resolve()} (now {(tmp_path / 'val2').resolve()})"
    result = run(capsys, *finetune(model, data, run_dir, "--val-data", val.parent, "--resume"))
    assert_refused(result, f"--resume: the run in {run_dir} was made with", wanted)
    assert (run_dir / "config.json").read_bytes() == config, "config.json is not rewritten"


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("leftover", ["best.pt", "metrics.jsonl", "curves.png"])
def test_a_previous_runs_files_without_last_pt_are_never_overwritten(capsys, workdir, tmp_path, leftover, resume):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / leftover).write_bytes(b"a previous run's")
    result = run(capsys, *finetune(workdir / "r20.pt", workdir / "data", run_dir, *(["--resume"] * resume)))
    assert_refused(result, f"{run_dir} holds files of a previous run ({leftover}) but no last.pt to resume")
    assert (run_dir / leftover).read_bytes() == b"a previous run's" and not (run_dir / "config.json").exists()


# ---- 4. class names are compared, not only counted ---------------------------------------------------------


def renamed_class(tmp_path, good, old="airplane", new="zeppelin", splits=("train", "test")):
    """A copy of the image folder with one class folder renamed in `splits`."""
    data = shutil.copytree(good, tmp_path / "renamed")
    for split in splits:
        (data / split / old).rename(data / split / new)
    return data


CLASS_COMMANDS = {
    "eval": ["eval", "{m}", "--data", "{d}"],
    "score": ["score", "{m}", "--data", "{d}", "--batches", "1", "--batch-size", "4", "--out", "{o}/s.json"],
    "finetune": MODEL_COMMANDS["finetune"],
}


@pytest.mark.parametrize("command", list(CLASS_COMMANDS))
def test_class_names_are_compared_between_model_and_data(capsys, workdir, tmp_path, out, command):
    data = renamed_class(tmp_path, workdir / "data")
    args = fill(CLASS_COMMANDS[command], m=workdir / "r20.pt", d=data, o=out)
    result = run(capsys, *args)
    assert_refused(
        result,
        "the data's classes are not the model's: the data has 'zeppelin', the model 'airplane' instead",
        "--ignore-class-names",
    )
    assert not any(out.iterdir())
    code, _, err = run(capsys, *args, "--ignore-class-names")
    assert code == 0, err
    assert "warning: matching the data's classes to the model's by position" in err


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        (CIFAR10_CLASSES[::-1], "the same classes in another order: 'airplane' where the model has 'truck'"),
        ([*CIFAR10_CLASSES[:9], "lorry"], "the data has 'truck', the model 'lorry' instead"),
        ([f"class_{i}" for i in range(10)], None),  # imported ImageNet-style weights: unnamed, any names fit
    ],
    ids=["reordered", "renamed", "unnamed"],
)
def test_a_models_class_names_must_be_the_datas(capsys, workdir, tmp_path, classes, message):
    d = torch.load(workdir / "r20.pt", weights_only=True)
    d["classes"] = list(classes)
    torch.save(d, tmp_path / "m.pt")
    result = run(capsys, "eval", tmp_path / "m.pt", "--data", workdir / "data")
    if message is None:
        assert result[0] == 0 and "warning" not in result[2]
    else:
        assert_refused(result, message)


def test_class_names_are_compared_between_the_splits(capsys, workdir, tmp_path, out):
    val = renamed_class(tmp_path, workdir / "data", splits=("test",))
    shutil.rmtree(val / "train")
    args = ["train", "--arch", "resnet20", "--data", workdir / "data", "--val-data", val, "--out-dir", out / "run"]
    args += ["--epochs", "1", "--batch-size", "8", "--workers", "0"]
    assert_refused(run(capsys, *args), "the evaluation split's classes differ", "--ignore-class-names")
    code, _, err = run(capsys, *args, "--ignore-class-names")
    assert code == 0 and "warning: matching the evaluation split's classes to the train split's by position" in err


# ---- 5. preprocessing: a cache never stale, images the size and depth the model expects, or told ------------


@pytest.mark.parametrize("change", ["add", "replace", "remove", "add-class"])
def test_the_decoded_image_cache_keys_on_every_file(tmp_path, cache, change):
    make_tree(tmp_path / "root", {"train": {"a": 3, "b": 3}}, size=(8, 8))
    load_split(tmp_path / "root", "train", cache_dir=cache, progress=False)
    images = tmp_path / "root" / "train"
    pixels = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    if change == "add":  # inside a class folder: the top-level entries do not change
        Image.fromarray(pixels).save(images / "a" / "09.png")
    elif change == "replace":  # the same name, other pixels
        Image.fromarray(pixels).save(images / "b" / "01.png")
    elif change == "remove":
        (images / "a" / "00.png").unlink()
    else:
        (images / "c").mkdir()
        Image.fromarray(pixels).save(images / "c" / "00.png")
    cached = load_split(tmp_path / "root", "train", cache_dir=cache, progress=False)
    fresh = load_split(tmp_path / "root", "train", cache_dir=tmp_path / "other", progress=False)
    assert cached.classes == fresh.classes and torch.equal(cached.labels, fresh.labels)
    assert cached.images is not None and fresh.images is not None and torch.equal(cached.images, fresh.images)


def test_one_large_image_among_many_small_ones_is_named(capsys, workdir, tmp_path):
    make_tree(tmp_path / "root", {"test": {c: 20 for c in CIFAR10_CLASSES}}, size=(32, 32))
    Image.new("RGB", (65, 65)).save(tmp_path / "root" / "test" / "truck" / "19.png")
    assert_refused(
        run(capsys, "eval", workdir / "r20.pt", "--data", tmp_path / "root"),
        "must all be one size",
        "airplane/00.png is 32x32",
        "truck/19.png is 65x65 (1 over 64 px: resize or remove them)",
    )


def test_images_of_the_models_size_are_used_as_they_are_also_beside_large_ones(capsys, workdir, tmp_path):
    data = shutil.copytree(workdir / "data", tmp_path / "data")
    Image.new("RGB", (65, 65)).save(data / "test" / "truck" / "1.png")  # 1 in 20: read lazily, each image told
    split = load_split(data, "test", progress=False)
    assert split.images is None and split.large and "truck/1.png (65x65)" in split.large
    mf = load_model(workdir / "r20.pt")
    with pytest.warns(UserWarning, match="images over 64 px .* are resized to the model's 32x32, images of 32x32"):
        x, _ = next(iter(mf.batches(split, 20)))
    small = load_split(workdir / "data", "test", progress=False)
    expected, _ = next(iter(mf.batches(small, 20)))
    assert torch.equal(x[:19], expected[:19]), "32x32 images pass unresized"
    code, _, err = run(capsys, "eval", workdir / "r20.pt", "--data", data)
    assert code == 0 and "warning: images over 64 px" in err


@pytest.mark.parametrize(
    ("size", "told"),
    [((1, 1), "the images are 1x1 pixels, the model takes 32x32: resizing them (bilinear)"), ((64, 8), "aspect")],
)
def test_small_images_of_another_size_are_resized_with_one_warning(capsys, workdir, tmp_path, size, told):
    make_tree(tmp_path / "root", {"test": {c: 2 for c in CIFAR10_CLASSES}}, size=size)
    code, _, err = run(capsys, "eval", workdir / "r20.pt", "--data", tmp_path / "root", "--batch-size", "4")
    assert code == 0 and err.count("warning:") == 1 and told in err


def test_16_bit_pixels_are_scaled_and_float_pixels_refused(capsys, workdir, tmp_path, cache):
    make_tree(tmp_path / "root", {"train": {"a": 2, "b": 1}}, size=(4, 4))
    grey = np.full((4, 4, 1), 40000, np.uint16)
    (tmp_path / "root/train/a/00.png").write_bytes(png16(grey))
    rgb = np.zeros((4, 4, 3), np.uint16)
    rgb[..., 0], rgb[..., 2] = 65535, 257 * 128
    (tmp_path / "root/train/a/01.png").write_bytes(png16(rgb))
    with pytest.warns(UserWarning, match=r"1 image of root/train with 16-bit pixels \(as .*a/00.png\): scaled"):
        data = load_split(tmp_path / "root", "train", cache_dir=cache, progress=False)
    assert data.images is not None
    assert data.images[0].unique().tolist() == [round(40000 / 257)], "not clipped to 255"
    assert data.images[1, :, 0, 0].tolist() == [255, 0, 128]
    Image.fromarray(np.random.default_rng(0).random((4, 4), dtype=np.float32)).save(tmp_path / "root/train/b/1.tif")
    result = run(capsys, "score", workdir / "r20.pt", "--data", tmp_path / "root", "--out", tmp_path / "s.json")
    assert_refused(result, "b/1.tif: its pixels are 32-bit floats, of no fixed range")


# ---- 6. NaN and Inf: numbers are range-checked, a non-finite loss stops training, exports are checked -------


TRAIN = ["finetune", "{m}", "--data", "{d}", "--out-dir", "{o}/run", "--epochs", "1", "--batch-size", "8"]
PRUNE = ["prune", "{m}", "--criterion", "l1", "--out", "{o}/p.pt", "--flops-target"]
IMPORT_NORMALIZED = ["import", "--arch", "resnet20", "--weights", "{m}", "--out", "{o}/i.pt", "--normalize"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*TRAIN, "--lr", "nan"], "argument --lr: must be a finite number in (0, ∞), got nan"),
        ([*TRAIN, "--lr", "inf"], "argument --lr: must be a finite number"),
        ([*TRAIN, "--lr", "-0.1"], "argument --lr: must be a finite number in (0, ∞), got -0.1"),
        ([*TRAIN, "--lr", "0"], "argument --lr"),
        ([*TRAIN, "--weight-decay", "-1"], "argument --weight-decay: must be a finite number in [0, ∞)"),
        ([*TRAIN, "--momentum", "5"], "argument --momentum: must be a finite number in [0, 1), got 5"),
        ([*TRAIN, "--momentum", "nan"], "argument --momentum"),
        ([*TRAIN, "--label-smoothing", "-1"], "argument --label-smoothing: must be a finite number in [0, 1)"),
        ([*TRAIN, "--label-smoothing", "2"], "argument --label-smoothing"),
        ([*TRAIN, "--warmup-epochs", "-3"], "argument --warmup-epochs: must be a finite number in [0, ∞)"),
        ([*TRAIN, "--warmup-epochs", "inf"], "argument --warmup-epochs"),
        ([*PRUNE, "nan"], "argument --flops-target: must be a finite number in (0, 1], got nan"),
        ([*PRUNE, "0"], "argument --flops-target"),
        ([*PRUNE, "1.5"], "argument --flops-target"),
        ([*IMPORT_NORMALIZED, "nan,nan,nan:1,1,1"], "needs 3 finite means and 3 finite positive stds"),
        ([*IMPORT_NORMALIZED, "0,0,0:inf,1,1"], "needs 3 finite means and 3 finite positive stds"),
    ],
)
def test_numbers_must_be_finite_and_in_range(capsys, workdir, out, args, message):
    assert_refused(run(capsys, *fill(args, m=workdir / "r20.pt", d=workdir / "data", o=out)), message)
    assert not any(out.iterdir())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["state_dict"]["layer2.0.conv1.weight"].view(-1)[0].fill_(float("nan")), "non-finite values"),
        (lambda d: d["state_dict"]["fc.bias"].fill_(float("-inf")), "(NaN or Inf) in fc.bias"),
        (lambda d: d.update(mean=[float("nan")] * 3), "damaged model file: invalid 'mean'"),
        (lambda d: d.update(std=[1.0, float("inf"), 1.0]), "damaged model file: invalid 'std'"),
    ],
    ids=["nan-weight", "inf-bias", "nan-mean", "inf-std"],
)
def test_a_model_file_with_non_finite_numbers_is_refused(capsys, workdir, tmp_path, change, message):
    d = torch.load(workdir / "r20.pt", weights_only=True)
    change(d)
    torch.save(d, tmp_path / "m.pt")
    assert_refused(run(capsys, "profile", tmp_path / "m.pt"), message)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(
    capsys, workdir, tmp_path, monkeypatch, value
):
    calls = 0
    cross_entropy = torch.nn.functional.cross_entropy

    def spoiled_at_step_7(*args, **kwargs):  # 5 steps an epoch: epoch 2, step 2
        nonlocal calls
        calls += 1
        loss = cross_entropy(*args, **kwargs)
        return loss * value if calls == 7 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spoiled_at_step_7)
    run_dir = tmp_path / "run"
    result = run(capsys, *finetune(workdir / "r20.pt", workdir / "data", run_dir, "--epochs", "3"))
    assert_refused(result, "the training loss is not finite (NaN or Inf) in epoch 2, step 2 of 5: stopped")
    mf, state = load_checkpoint(run_dir / "last.pt")  # refused if its weights were not finite
    assert state is not None and [h["epoch"] for h in state["history"]] == [1] and state["step"] == 5
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("where", ["exported", "pytorch"])
def test_the_export_check_fails_on_non_finite_outputs(capsys, workdir, tmp_path, monkeypatch, where):
    model = workdir / "r20.pt"
    if where == "exported":
        monkeypatch.setattr(export_module, "run_exported", lambda path, fmt, x: torch.full((len(x), 10), torch.nan))
        message = "the exported model's outputs are not finite (NaN or Inf) where PyTorch's are"
    else:
        d = torch.load(model, weights_only=True)
        d["state_dict"]["fc.weight"].fill_(3e38)  # finite weights, infinite logits
        torch.save(d, tmp_path / "m.pt")
        model, message = tmp_path / "m.pt", "the model's own outputs are not finite"
    result = run(capsys, "export", model, "--format", "torchscript", "--out", tmp_path / "m.ts")
    assert_refused(result, message)
    assert not (tmp_path / "m.ts").exists()


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 400])
def test_a_scores_file_with_non_finite_numbers_is_refused(capsys, workdir, tmp_path, out, number):
    scores = tmp_path / "s.json"
    assert run(capsys, "score", workdir / "r20.pt", "--criterion", "l1", "--out", scores)[0] == 0
    text = scores.read_text()
    first = text.index("[") + 1  # the first score of the first conv
    scores.write_text(text[:first] + number + text[text.index(",", first) :])
    result = run(capsys, "prune", workdir / "r20.pt", "--scores", scores, "--sparsity", "[0.]*12", "--out", out / "p")
    assert_refused(result, f"{scores}: cannot read scores JSON")
    assert not any(out.iterdir())


# ---- 7. every failure is one line (exit code 2), never a traceback -----------------------------------------


def scores_file(tmp_path, layers):
    """A scores file for the ResNet-20 whose 'layers' entry is `layers` (JSON text)."""
    path = tmp_path / "bad.json"
    path.write_text('{"format": "chipprune-scores/1", "arch": "resnet20", "criterion": "l1", "layers": ' + layers + "}")
    return path


def empty_cifar(tmp_path):
    """A cifar-10-batches-py folder whose test batch holds no images."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}))
    (folder / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((0, 3072), np.uint8), b"labels": np.zeros(0, np.int64)})
    )
    return folder


def bomb(path):
    """A 48 kB PNG of 20000 x 20000 pixels (400 megapixels: a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return path


def one_line_case(tmp_path, workdir, case):
    """The command line of one failure case, and what its one line says."""
    m, d = str(workdir / "r20.pt"), str(workdir / "data")
    prune_scores = ["prune", m, "--sparsity", "[0.]*12", "--out", str(tmp_path / "p.pt"), "--scores"]
    tiny_run = ["--out-dir", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "8", "--workers", "0"]
    if case.startswith("device-"):
        return ["eval", m, "--data", d, "--device", case.removeprefix("device-")], "argument --device: "
    if case == "seed-beyond-64-bits":
        return ["finetune", m, "--data", d, *tiny_run, "--seed", str(2**64)], "argument --seed: must be an integer"
    if case == "negative-workers":
        big = tmp_path / "big"
        make_tree(big, {"test": {"a": 1, "b": 1}}, size=(80, 80))
        return ["eval", m, "--data", big, "--workers", "-1"], "argument --workers: must be an integer from 0"
    if case.startswith("opset-"):
        opset = case.removeprefix("opset-")
        message = "opset 17, the default, can" if opset == "7" else "exports opsets 7 to"
        return ["export", m, "--format", "onnx", "--out", tmp_path / "m.onnx", "--opset", opset], message
    if case == "export-huge-batch":
        return ["export", m, "--format", "torchscript", "--out", tmp_path / "m.ts", "--batch-size", str(2**31 - 1)], (
            "out of memory: "
        )
    if case == "latency-huge-batch":
        return ["profile", m, "--latency", "--batch-sizes", str(10**9)], "out of memory: 11.2 TB asked for at once"
    if case.startswith("scores-"):
        layers = {
            "null": '{"conv1": [null]}',
            "strings": '{"conv1": ["a", "b"]}',
            "nested": '{"conv1": [[1.0], [2.0]]}',
            "huge-int": '{"conv1": [1' + "0" * 400 + "]}",
            "list-for-dict": "[1, 2, 3]",
            "deep": "[" * 100_000 + "]" * 100_000,
        }[case.removeprefix("scores-")]
        return [*prune_scores, scores_file(tmp_path, layers)], "bad.json: "
    if case == "data-fifo":
        os.mkfifo(tmp_path / "fifo")
        return ["eval", m, "--data", tmp_path / "fifo"], "fifo is a FIFO (named pipe): expected a folder, or a .tar"
    if case == "data-dev-zero":
        return ["eval", m, "--data", "/dev/zero"], "/dev/zero is a character device: expected a folder"
    if case == "bomb":
        data = shutil.copytree(workdir / "data", tmp_path / "data")
        bomb(data / "test" / "airplane" / "0.png")
        return ["eval", m, "--data", data], "refusing image"
    if case == "bomb-in-a-loader-process":  # large images, read lazily in a worker process
        make_tree(tmp_path / "big", {"test": {c: 1 for c in CIFAR10_CLASSES}}, size=(80, 80))
        bomb(tmp_path / "big" / "test" / "truck" / "00.png")
        return ["eval", m, "--data", tmp_path / "big", "--workers", "1"], "refusing image"
    assert case == "empty-cifar-split"
    return ["eval", m, "--data", empty_cifar(tmp_path)], "no images in the 'test' split"


ONE_LINE_CASES = [
    "device-bogus",
    "device-meta",
    "device-cuda:99",
    "seed-beyond-64-bits",
    "negative-workers",
    "opset-1",
    "opset-7",
    "opset-99",
    "export-huge-batch",
    "latency-huge-batch",
    "scores-null",
    "scores-strings",
    "scores-nested",
    "scores-huge-int",
    "scores-list-for-dict",
    "scores-deep",
    "data-fifo",
    "data-dev-zero",
    "bomb",
    "bomb-in-a-loader-process",
    "empty-cifar-split",
]


@pytest.mark.parametrize("case", ONE_LINE_CASES)
def test_a_failure_is_one_line_never_a_traceback(capfd, workdir, tmp_path, case):
    args, message = one_line_case(tmp_path, workdir, case)
    result = run(capfd, *args)  # capfd: also what C++ code writes to the file descriptors (torch's IR dump)
    assert_refused(result, message)
    assert not (tmp_path / "run").exists() and not (tmp_path / "m.onnx").exists()


def test_a_closed_stdout_is_one_line(workdir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "chipprune.cli", "profile", str(workdir / "r20.pt"), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # the reader is gone before anything is written (`chip profile … --json | head -0`)
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 2
    assert err == "chip profile: error: stdout was closed before all the output was written\n"


class AlwaysOutOfMemory(torch.nn.Module):
    """A forward pass that always runs out of memory, as the CPU allocator says it."""

    def __call__(self, *args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes.")


@pytest.mark.parametrize("command", ["score", "eval"])
def test_running_out_of_memory_is_one_line_after_the_retries(capsys, workdir, tmp_path, monkeypatch, command):
    from chipprune.models.resnet_cifar import ResNetCifar

    monkeypatch.setattr(ResNetCifar, "forward", lambda self, x: AlwaysOutOfMemory()(x))
    args = fill(DATA_COMMANDS[command], m=workdir / "r20.pt", d=workdir / "data", o=tmp_path)
    code, out, err = run(capsys, *args)
    assert code == 2 and out == "" and "Traceback" not in err and "During handling" not in err
    last = err.rstrip("\n").split("\n")[-1]
    if command == "score":  # 4 images: halved to 2, then 1, then the error
        assert err.count("warning: out of memory scoring") == 2
        assert (
            last
            == "chip score: error: out of memory scoring a single image on cpu: free memory, or score on another device"
        )
    else:
        assert last == "chip eval: error: out of memory: 1 GB asked for at once: try a smaller --batch-size"


# ---- 8. no hangs, no memory blow-ups: regular files only, sizes bounded before anything is read or built ----


@pytest.mark.parametrize("scores", ["fifo", "/dev/zero"])
def test_a_scores_file_that_never_ends_is_refused_at_once(workdir, tmp_path, scores):
    if scores == "fifo":
        os.mkfifo(tmp_path / "fifo")
        scores = tmp_path / "fifo"
    args = ["prune", workdir / "r20.pt", "--scores", scores, "--sparsity", "[0.]*12", "--out", tmp_path / "p.pt"]
    done = subprocess.run(
        [sys.executable, "-m", "chipprune.cli", *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "not a scores file" in done.stderr and done.stderr.count("\n") == 1


def max_rss_mb(args):
    """(exit code, stderr, peak resident memory in MB) of `chip ARGS` run in a child process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "chipprune.cli", *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    err = proc.stderr.read().decode()
    proc.stderr.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, err, usage.ru_maxrss / 1024


def test_oversized_archive_members_and_model_widths_are_refused_before_memory_is_spent(workdir, tmp_path):
    baseline = max_rss_mb(["profile", workdir / "r20.pt"])
    assert baseline[0] == 0
    # A tarball of 200 kB whose one image member is 200 MB of zeros: refused by its header's size, unread.
    with tarfile.open(tmp_path / "data.tar.gz", "w:gz", compresslevel=1) as tar:
        for name, size in (("data/test/a/0.png", 200 << 20), ("data/test/b/0.png", 10)):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(bytes(size)))
    code, err, mb = max_rss_mb(["eval", workdir / "r20.pt", "--data", tmp_path / "data.tar.gz"])
    assert code == 2 and "data/test/a/0.png in" in err and "209,715,200 bytes, over the 128 MB" in err
    assert mb < baseline[2] + 100, (mb, baseline[2])
    # A model file of 1 MB whose one conv claims 3,000,000 channels: refused by the widths, nothing built.
    d = torch.load(workdir / "r20.pt", weights_only=True)
    d["widths"]["layer1.0.conv1"] = 3_000_000
    torch.save(d, tmp_path / "wide.pt")
    code, err, mb = max_rss_mb(["profile", tmp_path / "wide.pt"])
    assert code == 2 and "layer1.0.conv1 has 3000000 channels, resnet20 at full width 16" in err
    assert mb < baseline[2] + 100, (mb, baseline[2])


@pytest.mark.parametrize("what", ["model-classes", "import-head"])
def test_a_head_must_be_backed_by_the_files_weights(capsys, workdir, tmp_path, what):
    d = torch.load(workdir / "r20.pt", weights_only=True)
    if what == "model-classes":  # a million classes, and the head of ten
        d.update(num_classes=10**6, classes=[str(i) for i in range(10**6)])
        torch.save(d, tmp_path / "m.pt")
        assert_refused(run(capsys, "profile", tmp_path / "m.pt"), "no head of its 1000000 classes in its weights")
    else:  # a head of a million rows of one column: 4 MB that would build a head of 256 MB
        d["state_dict"]["fc.weight"] = torch.zeros(10**6, 1)
        torch.save(d["state_dict"], tmp_path / "w.pt")
        result = run(capsys, *fill(IMPORT, m=tmp_path / "w.pt", o=tmp_path))
        assert_refused(result, "head: shape (1000000, 1) where the model has (1000000, 64)")


# ---- 9. smaller defects: --limit samples, --flops-target near 1, an unwritable cache, Ctrl-C in evaluation ---


def test_eval_limit_takes_a_seeded_sample_of_every_class_and_says_so(capsys, workdir, monkeypatch):
    seen = []

    def labels(model, batches, **kwargs):
        seen.append(torch.cat([y for _, y in batches]).tolist())
        return {"top1": 0.0, "top5": 0.0, "images": len(seen[-1])}

    monkeypatch.setattr("chipprune.api.evaluate_batches", labels)
    args = ["eval", workdir / "r20.pt", "--data", workdir / "data", "--limit", "10"]
    code, out, _ = run(capsys, *args)
    assert code == 0 and "(10 images, a random sample of the 20 with seed 0)" in out
    assert len(set(seen[0])) > 2, "not the first classes' images"
    assert json.loads(run(capsys, *args, "--json")[1])["sample"] == {"of": 20, "seed": 0}
    assert seen[1] == seen[0], "the same sample for the same seed"
    run(capsys, *args, "--seed", "1")
    assert sorted(seen[2]) != sorted(seen[0]) or seen[2] != seen[0]


@pytest.mark.parametrize("target", ["0.99", "1"])
def test_a_flops_target_within_the_tolerance_of_everything_keeps_every_channel(capsys, workdir, tmp_path, target):
    args = ["prune", workdir / "r20.pt", "--criterion", "l1", "--flops-target", target, "--out", tmp_path / "p.pt"]
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert load_model(tmp_path / "p.pt").model.widths == load_model(workdir / "r20.pt").model.widths


def test_a_cache_folder_that_cannot_be_written_is_a_warning(capsys, workdir, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("CHIP_CACHE_DIR", str(tmp_path / "file" / "cache"))
    code, out, err = run(capsys, "eval", workdir / "r20.pt", "--data", workdir / "data")
    assert code == 0 and "(20 images)" in out
    assert "warning: not caching the decoded images (cannot write" in err and "set CHIP_CACHE_DIR" in err
    assert "cache_dir=" not in err, "a CLI user is told the environment variable, not a Python argument"


# The child: `chip finetune` whose evaluation says when it has started and then takes its time, batch by batch.
SLOW_EVALUATION = """
import sys, time
from pathlib import Path
import chipprune.training.loop as train
from chipprune.cli import main

ready, evaluate = Path(sys.argv[1]), train.evaluate

def slowly(model, batches, **kwargs):
    def paced():
        for batch in batches:
            ready.write_text("evaluating")
            yield batch
            time.sleep(2)
    return evaluate(model, paced(), **kwargs)

train.evaluate = slowly
sys.exit(main(sys.argv[2:]))
"""


def test_ctrl_c_during_evaluation_stops_at_once_and_resumes_exactly(capsys, workdir, tmp_path):
    args = [*finetune(workdir / "r20.pt", workdir / "data", tmp_path / "run"), "--lr", "0.05"]  # the last epoch
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_EVALUATION, str(ready), *map(str, args)], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the evaluation never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]  # 3 batches of 2 s: within one batch, not after them
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "stopped: saved" in err and err.endswith("chip finetune: interrupted\n")
    state = load_checkpoint(tmp_path / "run" / "last.pt")[1]
    assert state is not None and state["step"] == 5 and state["history"] == [], "saved at the epoch's end, unevaluated"
    assert run(capsys, *args, "--resume")[0] == 0
    straight = [*finetune(workdir / "r20.pt", workdir / "data", tmp_path / "straight"), "--lr", "0.05"]
    assert run(capsys, *straight)[0] == 0
    resumed, uninterrupted = (torch.load(tmp_path / r / "last.pt", weights_only=True) for r in ("run", "straight"))
    assert resumed["training"]["history"][0]["test_top1"] == uninterrupted["training"]["history"][0]["test_top1"]
    assert all(torch.equal(v, uninterrupted["state_dict"][k]) for k, v in resumed["state_dict"].items())


def test_compile_on_cpu_is_refused_with_the_torch_that_crashes(capsys, workdir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    result = run(capsys, *finetune(workdir / "r20.pt", workdir / "data", tmp_path / "run", "--compile"))
    assert_refused(result, "--compile on CPU crashes torch 2.13.0+cpu (its inductor aborts)")


@pytest.mark.skipif(not os.environ.get("CHIP_SLOW_TESTS"), reason="a minute of compilation: set CHIP_SLOW_TESTS=1")
def test_compile_on_cpu_trains_with_the_pinned_torch(capsys, workdir, tmp_path):
    result = run(capsys, *finetune(workdir / "r20.pt", workdir / "data", tmp_path / "run", "--compile"))
    assert result[0] == 0, result[2]


# ---- 10. messages say what a thing is and what to do -------------------------------------------------------


def model_path_of_kind(tmp_path, workdir, kind):
    """A path given as the model file, of one kind, and what the refusal says it is."""
    if kind == "folder":
        return tmp_path, f"{tmp_path} is a folder, not a model file"
    if kind == "fifo":
        os.mkfifo(tmp_path / "fifo")
        return tmp_path / "fifo", "fifo is a FIFO (named pipe), not a model file"
    if kind == "dev-zero":
        return "/dev/zero", "/dev/zero is a character device, not a model file"
    if kind == "onnx":
        assert run_quietly(["export", workdir / "r20.pt", "--format", "onnx", "--out", tmp_path / "m.onnx"]) == 0
        return tmp_path / "m.onnx", "m.onnx is an ONNX model, not a model file: give the model file it was exported"
    if kind == "torchscript":
        assert run_quietly(["export", workdir / "r20.pt", "--format", "torchscript", "--out", tmp_path / "m.ts"]) == 0
        return tmp_path / "m.ts", "m.ts is a TorchScript archive, not a model file"
    assert kind == "scores"
    assert run_quietly(["score", workdir / "r20.pt", "--criterion", "l1", "--out", tmp_path / "s.json"]) == 0
    return tmp_path / "s.json", "s.json is JSON or other text, not a model file"


def run_quietly(args):
    """The exit code of `chip ARGS` run in this process, its output discarded."""
    from chipprune.cli import main

    with contextlib.redirect_stderr(io.StringIO()):
        return main([str(a) for a in args])


@pytest.mark.parametrize("kind", ["folder", "fifo", "dev-zero", "onnx", "torchscript", "scores"])
def test_a_model_path_that_is_not_a_model_file_says_what_it_is(capsys, workdir, tmp_path, kind):
    path, message = model_path_of_kind(tmp_path, workdir, kind)
    assert_refused(run(capsys, "profile", path), message)


def test_a_damaged_image_is_named_without_python_internals(capsys, workdir, tmp_path):
    data = shutil.copytree(workdir / "data", tmp_path / "data")
    (data / "test" / "dog" / "1.png").write_bytes(b"not an image at all")
    result = run(capsys, "eval", workdir / "r20.pt", "--data", data)
    assert_refused(result, "cannot decode image", "dog/1.png: cannot identify its format (damaged, or not an image)")
    assert "BytesIO" not in result[2] and "0x" not in result[2]


def test_one_image_is_one_image(capsys, workdir, tmp_path):
    args = ["score", workdir / "r20.pt", "--data", workdir / "data", "--batches", "1", "--batch-size", "1"]
    code, _, err = run(capsys, *args, "--out", tmp_path / "s.json")
    assert code == 0 and err.endswith("scores of 19 layers from 1 image\n")


def test_warnings_go_above_progress_bars_and_bars_have_totals(capsys, workdir, tmp_path, monkeypatch):
    from chipprune.models.resnet_cifar import ResNetCifar

    forward = ResNetCifar.forward

    def out_of_memory_over_two(self, x):  # a warning while the scoring bar is drawn (scoring: eval mode)
        if len(x) > 2 and not self.training:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return forward(self, x)

    monkeypatch.setattr(ResNetCifar, "forward", out_of_memory_over_two)
    args = ["prune", workdir / "r20.pt", "--data", workdir / "data", "--batches", "2", "--batch-size", "4"]
    code, _, err = run(capsys, *args, "--sparsity", "[0.]*12", "--recalibrate-bn", "2", "--out", tmp_path / "p.pt")
    assert code == 0, err
    told = [line for line in err.split("\n") if "warning:" in line]
    assert told and all(re.search(r"(^|\r +\r)chip prune: warning: ", line) for line in told), told
    assert "scoring (chip): 100%" in err and "| 2/2 [" in err
    assert "recalibrating BatchNorm: 100%" in err
    code, _, err = run(capsys, "eval", workdir / "r20.pt", "--data", workdir / "data", "--batch-size", "2")
    assert code == 0 and "evaluating: 100%" in err and "| 10/10 [" in err


# ---- fuzzing the readers of untrusted files: nothing but their own one-line errors -------------------------


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
R20_WIDTHS = create_model("resnet20").widths


@st.composite
def scores_documents(draw):
    """JSON documents near a valid scores file: the format, some of the convs, values of every kind."""
    layers = {conv: [draw(st.floats(-1e3, 1e3))] * c for conv, c in R20_WIDTHS.items()}
    for conv in draw(st.lists(st.sampled_from(sorted(R20_WIDTHS)), max_size=3)):
        layers[conv] = draw(st.one_of(JSON, st.lists(JSON, min_size=R20_WIDTHS[conv], max_size=R20_WIDTHS[conv])))
    d = {"format": "chipprune-scores/1", "arch": "resnet20", "criterion": "chip", "images": 8, "layers": layers}
    for key in draw(st.lists(st.sampled_from([*d, "seed", "processes"]), max_size=2)):
        if draw(st.booleans()):
            d[key] = draw(JSON)
        else:
            d.pop(key, None)
    return d if draw(st.integers(0, 9)) else draw(JSON)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=scores_documents())
def test_fuzz_the_scores_reader(tmp_path, document):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(document))
    try:
        scores, how = read_scores(path, "resnet20", R20_WIDTHS)
    except ScoresError as e:
        assert str(e).startswith(f"{path}") and "\n" not in str(e)
    else:
        assert {k: len(v) for k, v in scores.items()} == R20_WIDTHS
        assert all(bool(torch.isfinite(v).all()) and v.dtype == torch.float64 for v in scores.values())
        assert how["criterion"] in ("chip", "hrank", "l1", "random")


def tensors():
    """Small tensors of any dtype, shape and value."""
    dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool])
    shapes = st.lists(st.integers(0, 4), max_size=4)
    fill = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-5, 5))
    return st.builds(lambda dtype, shape, v: torch.full(shape, v).to(dtype), dtypes, shapes, fill)


ANYTHING = st.one_of(JSON, tensors(), st.lists(tensors(), max_size=3), st.dictionaries(st.text(max_size=4), tensors()))
R20 = None


@st.composite
def model_dicts(draw):
    """A ResNet-20 model file's dict with a few fields, widths or weights replaced by anything, or removed."""
    global R20
    if R20 is None:
        with tempfile.TemporaryDirectory() as tmp:
            model = ModelFile("resnet20", create_model("resnet20"), (0.5,) * 3, (0.25,) * 3, list(CIFAR10_CLASSES))
            model.save(Path(tmp) / "m.pt")
            R20 = (Path(tmp) / "m.pt").read_bytes()
    d = torch.load(io.BytesIO(R20), weights_only=True)
    order = ["width", "weight", "field"]
    changes = sorted(draw(st.lists(st.sampled_from(order), min_size=1, max_size=3)), key=order.index)
    for where in changes:  # widths and weights first: a field replaced may be one of them
        if where == "width":
            conv = draw(st.sampled_from(sorted(d["widths"]) + ["nonsense"]))
            d["widths"][conv] = draw(st.one_of(st.integers(-3, 10**7), JSON))
        elif where == "weight":
            key = draw(st.sampled_from(sorted(d["state_dict"]) + ["extra.weight"]))
            d["state_dict"][key] = draw(tensors())
        else:
            key = draw(st.sampled_from([*d, "training"]))
            d[key] = draw(st.one_of(ANYTHING, st.integers(-(10**20), 10**20)))
    return d


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(d=model_dicts())
def test_fuzz_the_model_file_reader(tmp_path, d):
    path = tmp_path / "m.pt"
    torch.save(d, path)
    try:
        mf = load_model(path)
    except ModelFileError as e:
        assert str(e).startswith(f"{path}") and "\n" not in str(e), str(e)
    else:
        assert all(bool(torch.isfinite(v).all()) for v in mf.model.state_dict().values() if v.is_floating_point())
