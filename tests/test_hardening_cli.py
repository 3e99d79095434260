"""The command line's contract under bad input: --version, defaults in every --help, JSON alone on stdout; class
names compared, preprocessing checked, numbers range-checked, every failure one line, no hangs or memory blow-ups,
messages that say what to do."""

import argparse
import contextlib
import io
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
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chipprune import __version__
from chipprune.cli import build_parser
from chipprune.data import load_split
from chipprune.deploy import export as export_module
from chipprune.files.modelfile import (
    CIFAR10_CLASSES,
    load_checkpoint,
    load_model,
)
from command import run
from images import make_tree, png16
from refusals import assert_refused, fill
from test_hardening import DATA_COMMANDS, IMPORT, MODEL_COMMANDS
from test_hardening_outputs import finetune

SRC = Path(__file__).resolve().parents[1] / "src" / "chipprune"
pytestmark = pytest.mark.usefixtures("one_thread")


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
