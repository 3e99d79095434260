"""Hardening, round 3 (issue 29): a model file that describes a structure runs no code, imports nothing it names and
reads no path it names; its constructor arguments, structure, tensors and other fields are checked as it is read,
each refused in one line before anything is built at the size it claims; --model-kwargs takes what a file may hold;
and a graph-pruned registry model is written as .safetensors."""

import copy
import hashlib
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import warnings
from contextlib import contextmanager

import pytest
import safetensors
import safetensors.torch
import torch

from chipprune.files.modelfile import ModelFile, library_model, load_model
from chipprune.models import external
from chipprune.pruning.graph import prune_model
from command import run
from refusals import assert_refused
from test_hardening_cli import max_rss_mb

pytest.importorskip("timm")
pytest.importorskip("torchvision")
pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "torchvision:shufflenet_v2_x0_5"  # pruned, its structure holds splits and channel-shuffle gathers


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A pruned 10-class ShuffleNet of 32 px as a model file's dict: (path of the .pt, its dict)."""
    torch.manual_seed(0)
    mf = library_model(ARCH, {"num_classes": 10}, input_size=32)
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = prune_model(mf.model.eval(), x[:1], [x], flops_target=0.5)
    path = tmp_path_factory.mktemp("library") / "m.pt"
    ModelFile(ARCH, model, mf.mean, mf.std, mf.classes, {}, mf.model_kwargs, 32).save(path)
    d = torch.load(path, weights_only=True)
    assert {c["kind"] for calls in d["structure"]["calls"].values() for c in calls} == {"Split", "Gather"}
    return path, d


def write(d, path):
    """A model file's dict written as torch.save or, by the suffix, safetensors (its tensors, the rest as JSON)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # the writers recurse: 5,000 levels of nesting, as an attacker's own writer would
    try:
        if path.suffix == ".safetensors":
            rest = {k: v for k, v in d.items() if k != "state_dict"}
            safetensors.torch.save_file(d["state_dict"], path, metadata={"chipprune": json.dumps(rest)})
        else:
            torch.save(d, path)
    finally:
        sys.setrecursionlimit(limit)
    return path


def snapshot(folder):
    """Every file under `folder`, with the SHA-256 of its bytes (a FIFO by its kind, never opened)."""
    found = {}
    for p in sorted(folder.rglob("*")):
        if p.is_fifo():
            found[str(p)] = "fifo"
        elif p.is_file():
            found[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


class Deadline(Exception):
    """A command ran past its time: it waited on something (a FIFO it opened)."""


@contextmanager
def deadline(seconds):
    """Raise Deadline in whatever the code inside waits on after `seconds`; `fired` says whether it did (code that
    catches every exception may turn it into an ordinary error line)."""
    state = {"fired": False}

    def alarm(signum, frame):
        state["fired"] = True
        raise Deadline(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


COMMANDS = {
    "profile": ["profile", "{m}"],
    "eval": ["eval", "{m}", "--data", "{d}"],
    "prune": ["prune", "{m}", "--ratio", "0.3", "--criterion", "l1", "--out", "{o}/p.pt"],
}


def refused(capsys, tmp_path, workdir, path, command="profile", *wanted):
    """Run `chip COMMAND PATH` under a deadline and assert the one-line refusal naming `wanted`, with nothing written,
    no input changed, and no wait on any path the file names."""
    outputs = tmp_path / "out"
    outputs.mkdir(exist_ok=True)
    before = snapshot(tmp_path), snapshot(workdir)
    args = [a.format(m=path, d=workdir / "data", o=outputs) for a in COMMANDS[command]]
    with deadline(60) as state:
        result = run(capsys, *args)
    assert not state["fired"], result
    assert_refused(result, path, *wanted)
    assert (snapshot(tmp_path), snapshot(workdir)) == before
    assert not any(outputs.iterdir())
    return result


def changed(d, edit):
    """A deep copy of a model file's dict, changed in place by `edit`."""
    new = copy.deepcopy(d)
    edit(new)
    return new


def every_call(d, **fields):
    """Set `fields` in every recorded call of a model file's dict."""
    for calls in d["structure"]["calls"].values():
        for call in calls:
            call.update(fields)


def first_call(d, kind):
    """The first recorded call of `kind` in a model file's dict."""
    return next(c for calls in d["structure"]["calls"].values() for c in calls if c["kind"] == kind)


def nested(depth, leaf=0):
    """A dict nested `depth` levels deep."""
    for _ in range(depth):
        leaf = {"a": leaf}
    return leaf


# ---- 1. a recorded call names a module: nothing is imported -------------------------------------------------------

PLANTED = "planted_chip_module"  # a module beside the model file whose import creates a marker


def plant(folder, marker, monkeypatch):
    """A module beside the model file, importable (its folder on sys.path), that creates `marker` when imported."""
    (folder / f"{PLANTED}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, PLANTED, raising=False)


def test_the_planted_module_is_live(tmp_path, monkeypatch):
    """Imported as the old reader did (the first part of a recorded file), the planted module does run."""
    plant(tmp_path, tmp_path / "pwned", monkeypatch)
    importlib.import_module(f"{PLANTED}/x.py".split("/")[0])
    assert (tmp_path / "pwned").exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize(
    "recorded, module",
    [
        (f"{PLANTED}/x.py", PLANTED),
        ("this/x.py", "this"),  # prints the Zen of Python
        ("antigravity/x.py", "antigravity"),  # opens a web browser
        ("venv.__main__/x.py", "venv.__main__"),  # creates a virtual environment
        ("this.py", "this"),
        ("torchvision/../this.py", "this"),
        ("timm/layers/mixed_conv2d.py", "timm.layers.mixed_conv2d"),  # another library's file
        ("chipprune/cli.py", None),
        ("/etc/passwd", None),
        ("torchvision/models/../../../../etc/passwd", None),
        ("torchvision/models/no_such_file.py", None),
        ("torchvision/models/shufflenetv2.pyc", None),
        ("torchvision/models\\shufflenetv2.py", None),
        ("torchvision", None),
        ("", None),
    ],
)
def test_a_recorded_call_imports_and_runs_nothing(
    capsys, tmp_path, workdir, library, monkeypatch, recorded, module, suffix
):
    marker = tmp_path / "pwned"
    plant(tmp_path, marker, monkeypatch)
    monkeypatch.setattr(sys, "argv", ["venv", "--without-pip", str(marker)])  # where venv.__main__ would write
    monkeypatch.setattr("webbrowser.open", lambda *a, **k: marker.touch())  # what antigravity would call
    if module is not None:
        monkeypatch.delitem(sys.modules, module, raising=False)
    path = write(changed(library[1], lambda d: every_call(d, file=recorded)), tmp_path / f"m{suffix}")
    for command in ("profile", "eval"):
        refused(capsys, tmp_path, workdir, path, command, "a recorded call")
    assert not marker.exists()
    assert module is None or module not in sys.modules


# ---- 2. constructor arguments: what a file and --model-kwargs may hold --------------------------------------------


def fifo(tmp_path):
    """A FIFO with no writer: whoever opens it for reading waits forever."""
    path = tmp_path / "fifo"
    if not path.exists():
        os.mkfifo(path)
    return path


KWARGS = {
    "checkpoint_path-fifo": lambda t: {"num_classes": 10, "checkpoint_path": str(fifo(t))},
    "checkpoint_path-file": lambda t: {"num_classes": 10, "checkpoint_path": str(t / "m.pt")},
    "pretrained_cfg_overlay": lambda t: {"num_classes": 10, "pretrained_cfg_overlay": {"file": str(fifo(t))}},
    "pretrained_cfg": lambda t: {"num_classes": 10, "pretrained_cfg": {"file": str(fifo(t))}},
    "file": lambda t: {"num_classes": 10, "file": str(fifo(t))},
    "pretrained": lambda t: {"num_classes": 10, "pretrained": True},
    "weights": lambda t: {"num_classes": 10, "weights": "DEFAULT"},
    "in_chans": lambda t: {"num_classes": 10, "in_chans": 1},
    "num_classes-huge": lambda t: {"num_classes": 10**8},
    "num_classes-zero": lambda t: {"num_classes": 0},
    "num_classes-negative": lambda t: {"num_classes": -1},
    "num_classes-string": lambda t: {"num_classes": "10"},
    "num_classes-float": lambda t: {"num_classes": 10.0},
    "num_classes-bool": lambda t: {"num_classes": True},
    "num_classes-other": lambda t: {"num_classes": 7},  # builds a head other than the file's 10 classes
    "dropout-nan": lambda t: {"num_classes": 10, "dropout": math.nan},
    "dropout-inf": lambda t: {"num_classes": 10, "dropout": math.inf},
    "dropout-one": lambda t: {"num_classes": 10, "dropout": 1.0},
    "width_mult-huge": lambda t: {"num_classes": 10, "width_mult": 1e6},
    "act_layer-unknown": lambda t: {"num_classes": 10, "act_layer": "no_such_activation"},
    "nested": lambda t: {"num_classes": 10, "global_pool": nested(5000)},
    "int-key": lambda t: {1: 2},
    "list": lambda t: [["num_classes", 10]],
}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("case", list(KWARGS))
def test_a_files_constructor_arguments_are_checked(capsys, tmp_path, workdir, library, case, suffix):
    kwargs = KWARGS[case](tmp_path)
    path = write(changed(library[1], lambda d: d.update(model_kwargs=kwargs)), tmp_path / f"m{suffix}")
    wanted = {
        "num_classes-other": "num_classes 7, where the file has 10 classes",
        "nested": "cannot be read as a safetensors model file" if suffix == ".safetensors" else "model_kwargs: ",
    }.get(case, "model_kwargs: ")
    refused(capsys, tmp_path, workdir, path, "profile", wanted)


def test_a_huge_head_is_refused_before_it_is_built(tmp_path, library):
    """A file of 10^5 classes (the most model_kwargs take) with a head of 10 rows: refused within 100 MB of a plain
    command's memory, not after building the 10^5-row head (and the unpruned model's)."""
    baseline = max_rss_mb(["profile", library[0]])
    assert baseline[0] == 0, baseline[1]
    n = external.MAX_CLASSES

    def claim(d):
        d.update(num_classes=n, classes=[f"class_{i}" for i in range(n)], model_kwargs={"num_classes": n})

    path = write(changed(library[1], claim), tmp_path / "huge.pt")
    code, err, mb = max_rss_mb(["profile", path])
    assert code == 2 and re.search(r"fc.weight: shape \(10, (\d+)\) where its structure gives \(100000, \1\)", err), err
    assert mb < baseline[2] + 100, (mb, baseline[2])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ('{"num_classes": NaN}', "NaN is not a number JSON has"),
        ('{"dropout": Infinity}', "Infinity is not a number JSON has"),
        ('{"dropout": -Infinity}', "-Infinity is not a number JSON has"),
        ('{"dropout": 1e400}', "dropout must be a number in [0, 1), not inf"),
        ('{"num_classes": 0}', "num_classes must be an integer from 1 to 100,000, not 0"),
        ('{"num_classes": -1}', "num_classes must be an integer from 1 to 100,000, not -1"),
        ('{"num_classes": 100000000}', "num_classes must be an integer from 1 to 100,000"),
        ('{"num_classes": 4.0}', "num_classes must be an integer"),
        ('{"num_classes": "4"}', "num_classes must be an integer"),
        ('{"checkpoint_path": "/etc/hostname"}', "'checkpoint_path' is not a constructor argument"),
        ('{"pretrained": true}', "'pretrained' is not a constructor argument"),
        ('{"pretrained_cfg_overlay": {"file": "/etc/hostname"}}', "'pretrained_cfg_overlay' is not a constructor"),
        ('{"act_layer": "no_such_activation"}', "act_layer must be one of relu"),
        ('{"global_pool": {"a": {"b": 1}}}', "global_pool must be one of avg"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"a": ' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
        ("[1]", "expected a JSON object"),
        ("{", "not JSON"),
    ],
)
@pytest.mark.parametrize("command", ["import", "profile", "train"])
def test_model_kwargs_on_the_command_line_are_what_a_file_may_hold(capsys, workdir, tmp_path, command, kwargs, message):
    args = {
        "import": ["import", "--arch", "timm:resnet18", "--out", tmp_path / "m.pt"],
        "profile": ["profile", "--arch", "timm:resnet18"],
        "train": ["train", "--arch", "timm:resnet18", "--data", workdir / "data", "--out-dir", tmp_path / "run"],
    }[command]
    assert_refused(run(capsys, *args, "--model-kwargs", kwargs), "--model-kwargs", message)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("size", ["0", "-1", "4097", str(10**15)])
def test_an_input_size_beyond_what_a_file_holds_is_refused(capsys, tmp_path, size):
    result = run(capsys, "import", "--arch", "timm:resnet18", "--input-size", size, "--out", tmp_path / "m.pt")
    assert_refused(result)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("act", external.ACTIVATIONS)
def test_every_activation_model_kwargs_take_builds_a_timm_model(act):
    source = external.parse("timm:resnet18", {"num_classes": 2, "act_layer": act})
    assert external.build(source).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def test_the_arguments_a_file_may_hold_round_trip(tmp_path):
    kwargs = {"num_classes": 3, "drop_rate": 0.25, "drop_path_rate": 0.1, "global_pool": "max", "act_layer": "silu"}
    library_model("timm:resnet18", kwargs, input_size=32).save(tmp_path / "m.safetensors")
    back = load_model(tmp_path / "m.safetensors")
    assert back.model_kwargs == kwargs and back.input_size == 32 and back.model.drop_rate == 0.25


# ---- 2. a compressed archive is refused before it is inflated -----------------------------------------------------


BOMB = """
import sys, zipfile, torch
model, stored, bomb = sys.argv[1:]
d = torch.load(model, weights_only=True)
d["state_dict"]["fc.bias"] = torch.zeros(128 << 20)  # 512 MB of zeros, which deflate to 0.5 MB
torch.save(d, stored)
with zipfile.ZipFile(stored) as z, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as out:
    for info in z.infolist():
        with z.open(info) as src, out.open(info.filename, "w", force_zip64=True) as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
"""


def test_a_compressed_archive_is_refused_before_it_is_inflated(workdir, tmp_path):
    baseline = max_rss_mb(["profile", workdir / "r20.pt"])
    assert baseline[0] == 0, baseline[1]
    # made in a child: a child's peak memory counts its parent's at the time it starts
    subprocess.run([sys.executable, "-c", BOMB, workdir / "r20.pt", tmp_path / "stored.pt", tmp_path / "bomb.pt"],
                   check=True)  # fmt: skip
    (tmp_path / "stored.pt").unlink()
    assert (tmp_path / "bomb.pt").stat().st_size < 8 << 20
    for command in (["profile", tmp_path / "bomb.pt"], ["import", "--arch", "resnet20", "--weights",
                                                       tmp_path / "bomb.pt", "--out", tmp_path / "i.pt"]):  # fmt: skip
        code, err, mb = max_rss_mb(command)
        assert code == 2 and re.search(r"its archive inflates to 51\d MB from [\d.]+ MB", err), err
        assert err.count("\n") == 1 and mb < baseline[2] + 100, (mb, baseline[2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.pt"]


# ---- 3. values in a file's structure, tensors and other fields ----------------------------------------------------


def attribute(module, key, value):
    """An edit setting a recorded attribute of `module`."""
    return lambda d: d["structure"]["attributes"].setdefault(module, {}).__setitem__(key, value)


# conv1.0 is the stem conv (24 channels, pruned to fewer), conv1.1 its BatchNorm, fc the head of 10 classes
ATTRIBUTES = {
    "eps-nan": attribute("conv1.1", "eps", math.nan),
    "eps-inf": attribute("conv1.1", "eps", math.inf),
    "eps-negative": attribute("conv1.1", "eps", -1e-5),
    "eps-larger": attribute("conv1.1", "eps", 10.0),
    "momentum-nan": attribute("conv1.1", "momentum", math.nan),
    "momentum-none": attribute("conv1.1", "momentum", None),
    "affine-flipped": attribute("conv1.1", "affine", False),
    "stride-zero": attribute("conv1.0", "stride", [0, 0]),
    "stride-negative": attribute("conv1.0", "stride", [-2, 2]),
    "stride-three": attribute("conv1.0", "stride", [2, 2, 2]),
    "groups-zero": attribute("conv1.0", "groups", 0),
    "groups-larger": attribute("conv1.0", "groups", 10**6),
    "groups-not-dividing": attribute("conv1.0", "groups", 2),  # 3 input channels
    "padding_mode": attribute("conv1.0", "padding_mode", "no_such_mode"),
    "padding-string": attribute("conv1.0", "padding", "same"),
    "out_channels-huge": attribute("conv1.0", "out_channels", 10**9),
    "out_channels-negative": attribute("conv1.0", "out_channels", -1),
    "out_channels-float": attribute("conv1.0", "out_channels", 12.0),
    "out_channels-string": attribute("conv1.0", "out_channels", "12"),
    "out_channels-deep": attribute("conv1.0", "out_channels", nested(5000)),
    "kernel_size-deep": attribute("conv1.0", "kernel_size", [nested(5000), 3]),
    "out_features-fewer": attribute("fc", "out_features", 7),  # a head of 7 where the weights have 10 rows
    "private": attribute("conv1.0", "_parameters", {}),
    "method": attribute("conv1.0", "forward", 1),
    "no-such-module": attribute("no.such.module", "out_channels", 3),
    "attributes-list": lambda d: d["structure"].update(attributes=[]),
    "module-list": lambda d: d["structure"]["attributes"].update({"conv1.0": [1]}),
}


@pytest.mark.parametrize("case", list(ATTRIBUTES))
def test_a_recorded_attribute_must_be_what_pruning_makes(capsys, tmp_path, workdir, library, case):
    path = write(changed(library[1], ATTRIBUTES[case]), tmp_path / "m.pt")
    wanted = "invalid 'structure'" if case == "attributes-list" else "its structure does not fit"
    refused(capsys, tmp_path, workdir, path, "profile", wanted)


def call(kind, value):
    """An edit replacing the first recorded split (24+20 channels of stage2.1) with a call of `kind` and `value`."""
    return lambda d: first_call(d, "Split").update(kind=kind, value=value)


def gather(value):
    """An edit replacing the first recorded gather's permutation."""
    return lambda d: first_call(d, "Gather").update(value=value)


CALLS = {
    "split-negative": call("Split", [-1, 45]),
    "split-huge": call("Split", [10**12, 20]),
    "split-many": call("Split", [0] * 100_000 + [24, 20]),
    "split-wrong-sum": call("Split", [24, 21]),
    "split-empty": call("Split", []),
    "split-strings": call("Split", ["24", "20"]),
    "split-floats": call("Split", [24.0, 20.0]),
    "gather-repeats": gather([0] * 1_000_000),
    "gather-huge": gather([10**9]),
    "gather-negative": gather([-1, 0]),
    "gather-short": gather([1, 0]),
    "gather-deep": gather(nested(5000)),
    "shape-zero": call("Shape", 0),
    "shape-negative": call("Shape", -5),
    "shape-huge": call("Shape", 10**12),
    "shape-wrong": call("Shape", 7),
    "index-step-zero": call("Index", [{"slice": [None, None, None]}, {"slice": [0, 4, 0]}]),
    "index-huge": call("Index", [{"slice": [None, None, None]}, {"slice": [0, 10**40, None]}]),
    "index-list": call("Index", [{"slice": [None, None, None]}, [0, 0, 0, 0]]),
    "index-other-key": call("Index", [{"slice": [None, None, None]}, {"range": [0, 4]}]),
    "index-no-slice": call("Index", ["...", 0]),
    "index-ok-but-not-a-split": call("Index", [{"slice": [None, None, None]}, {"slice": [0, 4, None]}]),
    "kind-unknown": call("Exec", [1]),
    "line-negative": lambda d: first_call(d, "Split").update(line=-1),
    "line-huge": lambda d: first_call(d, "Split").update(line=10**12),
    "count-zero": lambda d: first_call(d, "Split").update(count=0),
    "extra-field": lambda d: first_call(d, "Split").update(code="print(1)"),
    "calls-not-a-list": lambda d: d["structure"]["calls"].update({"stage2.1": {"kind": "Split"}}),
    "calls-no-module": lambda d: d["structure"]["calls"].update({"no.such": [first_call(d, "Split")]}),
}


@pytest.mark.parametrize("case", list(CALLS))
def test_recorded_call_values_are_checked(capsys, tmp_path, workdir, library, case):
    path = write(changed(library[1], CALLS[case]), tmp_path / "m.pt")
    refused(capsys, tmp_path, workdir, path, "profile", "its structure does not fit")


def tensor(key, value):
    """An edit replacing one tensor of the state dict."""
    return lambda d: d["state_dict"].__setitem__(key, value(d["state_dict"][key]))


TENSORS = {
    "head-fewer-rows": lambda d: d["state_dict"].update(
        {"fc.weight": d["state_dict"]["fc.weight"][:7], "fc.bias": d["state_dict"]["fc.bias"][:7]}
    ),
    "head-more-rows": tensor("fc.weight", lambda t: torch.zeros(12, t.shape[1])),
    "conv-2d": tensor("conv1.0.weight", lambda t: t.flatten(1)),
    "conv-5d": tensor("conv1.0.weight", lambda t: t[..., None]),
    "conv-wider": tensor("conv1.0.weight", lambda t: torch.zeros(t.shape[0] + 1, *t.shape[1:])),
    "conv-int64": tensor("conv1.0.weight", lambda t: t.long()),
    "conv-complex": tensor("conv1.0.weight", lambda t: t.to(torch.complex64)),
    "conv-bool": tensor("conv1.0.weight", lambda t: t > 0),
    "bn-float": tensor("conv1.1.num_batches_tracked", lambda t: t.float()),
    "bn-shorter": tensor("conv1.1.running_var", lambda t: t[:-1]),
    "scalar": tensor("conv1.1.weight", lambda t: t[0]),
    "missing": lambda d: d["state_dict"].pop("conv1.1.running_mean"),
    "unexpected": lambda d: d["state_dict"].update({"extra.weight": torch.zeros(1)}),
}


@pytest.mark.parametrize("case", list(TENSORS))
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_tensor_shapes_and_dtypes_are_compared_with_the_structure(capsys, tmp_path, workdir, library, case, suffix):
    path = write(changed(library[1], TENSORS[case]), tmp_path / f"m{suffix}")
    refused(capsys, tmp_path, workdir, path, "eval", "the tensors do not fit the architecture")


def test_float64_tensors_load_as_the_models_float32(tmp_path, library):
    d = changed(library[1], lambda d: d.update(state_dict={k: v.double() if v.is_floating_point() else v
                                                            for k, v in d["state_dict"].items()}))  # fmt: skip
    back = load_model(write(d, tmp_path / "m.pt"))
    assert {p.dtype for p in back.model.parameters()} == {torch.float32}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back.model.eval()(x), load_model(library[0]).model.eval()(x))


FIELDS = {
    "versions-list": ("versions", ["timm"]),
    "versions-number": ("versions", {"torchvision": 5}),
    "versions-long": ("versions", {"torchvision": "1" * 1000}),
    "versions-many": ("versions", {f"lib{i}": "1" for i in range(100)}),
    "meta-deep": ("meta", nested(5000)),
    "meta-33-deep": ("meta", nested(33)),
    "meta-nan": ("meta", {"pruned": {"flops_target": math.nan}}),
    "meta-list": ("meta", [1, 2]),
    "meta-tensor": ("meta", {"t": torch.zeros(3)}),
    "meta-int-key": ("meta", {1: "a"}),
    "input_size-zero": ("input_size", 0),
    "input_size-huge": ("input_size", 10**15),
    "input_size-float": ("input_size", 32.0),
    "input_size-bool": ("input_size", True),
    "structure-list": ("structure", []),
    "structure-extra": ("structure", {"attributes": {}, "calls": {}, "code": {}}),
    "structure-missing": ("structure", None),
    "model_kwargs-missing": ("model_kwargs", None),
}


@pytest.mark.parametrize("case", list(FIELDS))
@pytest.mark.parametrize("command", ["profile", "prune"])
def test_damaged_fields_are_refused_as_the_file_is_read(capsys, tmp_path, workdir, library, case, command):
    field, value = FIELDS[case]
    d = changed(library[1], lambda d: d.pop(field) if value is None else d.__setitem__(field, value))
    refused(capsys, tmp_path, workdir, write(d, tmp_path / "m.pt"), command, "damaged model file", repr(field))


@pytest.mark.parametrize("depth", [5000, 40])
def test_a_deep_meta_is_refused_before_any_work_in_a_registry_file_too(capsys, tmp_path, workdir, depth):
    d = torch.load(workdir / "r20.pt", weights_only=True)
    d["meta"] = {"imported_from": nested(depth)}
    path = write(d, tmp_path / "deep.pt")
    refused(capsys, tmp_path, workdir, path, "prune", "damaged model file: invalid 'meta'")


# ---- 6. a graph-pruned registry model is written as .safetensors ----------------------------------------------------


@pytest.mark.parametrize(
    "budget",
    [
        ["--flops-target", "0.52", "--global", "--round-to", "8"],  # the README's example
        ["--flops-target", "0.5"],
        ["--ratio", "0.3", "--global"],
    ],
)
def test_a_graph_pruned_registry_model_is_written_as_safetensors(capsys, workdir, tmp_path, budget):
    logits = []
    for name in ("p.pt", "p.safetensors"):
        code, _, err = run(capsys, "prune", workdir / "r20.pt", "--criterion", "l1", *budget, "--out", tmp_path / name)
        assert code == 0, err
        torch.manual_seed(1)
        with torch.no_grad():
            logits.append(load_model(tmp_path / name).model.eval()(torch.randn(4, 3, 32, 32)))
    assert torch.equal(*logits)
    with safetensors.safe_open(tmp_path / "p.safetensors", framework="pt") as f:
        assert any(k.endswith("shortcut.src") for k in f.keys())  # noqa: SIM118
