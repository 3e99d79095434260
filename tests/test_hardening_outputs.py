"""Hardening of what the commands write: every write is atomic (a process killed while writing a checkpoint leaves the
previous one intact and resumable), never replaces what is not a regular file or an input of the same command, and
run folders hold one process at a time."""

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from chipprune.files import fileio
from chipprune.files.fileio import atomic_write, stale_temps
from chipprune.files.modelfile import (
    load_checkpoint,
    load_model,
)
from command import run
from refusals import assert_refused, fill
from test_hardening import MODEL_COMMANDS

SRC = Path(__file__).resolve().parents[1] / "src" / "chipprune"
pytestmark = pytest.mark.usefixtures("one_thread")


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
