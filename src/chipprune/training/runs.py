"""The run folder of `chip finetune` and `chip train`, guarded: one process at a time (a lock), never another run's
files overwritten, a resume only of the same run (its model file, data and sizes: its identity), training stopped
at the first non-finite loss before any checkpoint is written from it, and a stop asked during evaluation obeyed.

These guards live here so that the training loop (train.py) only calls them."""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from ..data import ImageSplit
from ..data.batching import Batches
from ..files.fileio import OutputError, check_output, kind, mode_kind, replaced_input, sha256, size_text

LOCK = ".lock"  # in the run folder: holds the pid of the process that runs it, locked (flock) while it does
PID = re.compile(rb"(\d{1,20}\n?)?")  # what a lock file holds: nothing yet, or the pid of its last holder
PID_BYTES = 21  # the most a lock file holds: 20 digits and a newline
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "config.json", "curves.png")  # what a run folder holds
PREVIOUS = ("best.pt", "metrics.jsonl", "curves.png")  # files of a previous run, beside its last.pt or not
T = TypeVar("T")


class RunError(ValueError):
    """A run folder that cannot be used as asked, or a run that cannot go on (one line saying why)."""


class Stopped(Exception):
    """A stop (SIGINT, SIGTERM) asked while evaluating: the caller saves and stops."""


# ---- the folder --------------------------------------------------------------------------------------------


def check_run_folder(run: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse, before any work, an --out-dir that is not a folder (or a new path), or one of whose run files would
    replace an input of the command (every file it reads: the model file, the teacher, a file of a data source)."""
    text = os.fspath(run)
    if not text.strip():
        raise OutputError("empty --out-dir")
    if os.path.lexists(text) and not os.path.isdir(text):
        raise OutputError(f"--out-dir {text} is {kind(text)}, not a folder")
    inputs = list(inputs)
    for name in RUN_FILES:
        check_output(Path(text) / name, option="--out-dir")
        replaced = replaced_input(Path(text, name).resolve(), inputs)
        if replaced is not None:
            raise OutputError(
                f"--out-dir {text} would replace {replaced}, an input of this command, with its {name}: copy the "
                "input elsewhere first, or choose another --out-dir"
            )


@contextmanager
def run_lock(run: Path, is_main: bool = True) -> Iterator[None]:
    """Within, this process holds the run folder's lock: another one that asks for it is refused at once (an flock,
    released by the system if this process dies; the lock file stays, harmless)."""
    if not is_main:
        yield
        return
    created = not os.path.lexists(run)
    try:
        run.mkdir(parents=True, exist_ok=True)
        fd = _open_lock(run / LOCK)
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"cannot use --out-dir {run}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, PID_BYTES, 0).decode(errors="replace").strip()
            raise RunError(
                f"{run} is in use by another chip process{f' (pid {holder})' if holder.isdigit() else ''}: "
                "wait for it to end, or choose another --out-dir"
            ) from None
        pid = f"{os.getpid()}\n".encode()
        os.pwrite(fd, pid, 0)
        os.ftruncate(fd, len(pid))  # a shorter pid than the last holder's: no digits of it left after ours
        yield
    finally:
        if created and os.listdir(run) == [LOCK]:  # a run that wrote nothing leaves no folder behind
            (run / LOCK).unlink()
            run.rmdir()
        os.close(fd)


def _open_lock(path: Path) -> int:
    """The lock file, opened for writing: made here, or one that a chip process left (see _not_ours). Anything else
    is refused without being written, and a symbolic link is never followed: a link or a hard link to the model
    would have had it overwritten with the pid."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: a FIFO planted meanwhile
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        pass
    found = os.lstat(path)
    if not stat.S_ISREG(found.st_mode):  # not even opened: opening a device can act on it
        raise _not_a_lock(path, mode_kind(found.st_mode))
    fd = os.open(path, flags)
    try:
        problem = _not_ours(fd, found)
        if problem is not None:
            raise _not_a_lock(path, problem)
    except OSError:  # the refusal among them
        os.close(fd)
        raise
    return fd


def _not_ours(fd: int, found: os.stat_result) -> str | None:
    """What the open file `fd` (found at the lock's path as `found`) is instead of a lock file that chip left: a
    regular file of this user's with no other name, holding at most a pid; None where it is one."""
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (found.st_dev, found.st_ino):
        return "a file replaced while it was opened"
    if now.st_nlink != 1:
        return f"a file of {now.st_nlink} names (hard links)"
    if now.st_uid != os.geteuid():
        return f"a file of another user (uid {now.st_uid})"
    if not PID.fullmatch(os.pread(fd, PID_BYTES + 1, 0)):
        return f"a file that holds something other than a pid ({size_text(now.st_size)})"
    return None


def _not_a_lock(path: Path, what: str) -> OutputError:
    """The refusal of a lock file path that holds something else."""
    return OutputError(
        f"cannot use --out-dir {path.parent}: its {path.name} is {what}, not the lock file chip leaves; move it away, "
        "or choose another --out-dir"
    )


def refuse_previous(run: Path) -> None:
    """Refuse to start a run in a folder that holds another run's files without its last.pt (nothing to resume,
    and starting would overwrite them)."""
    found = [name for name in PREVIOUS if (run / name).exists()]
    if found:
        raise RunError(
            f"{run} holds files of a previous run ({', '.join(found)}) but no last.pt to resume: choose another "
            "--out-dir, or move them away"
        )


# ---- identity ----------------------------------------------------------------------------------------------


class Identity(NamedTuple):
    """What a run is of, beside its hyperparameters: a resumed run must have the same."""

    model_sha256: str | None  # the model file fine-tuned; None: trained from scratch
    arch: str
    normalization: list[list[float]]  # mean, std
    data: str | None  # resolved paths of the data sources
    val_data: str | None
    train_images: int
    test_images: int | None
    classes: str  # SHA-256 (16 hex digits) of the class names in order


def identity(
    provenance: dict[str, Any] | None, arch: str, mean: Any, std: Any, train: ImageSplit, test: Any
) -> Identity:
    """The identity of a run of the provenance's model file (or `arch`), normalization, data, sizes and classes."""
    provenance = provenance or {}
    model = provenance.get("model")
    return Identity(
        model_sha256=sha256(model) if model else None,
        arch=arch,
        normalization=[list(map(float, mean)), list(map(float, std))],
        data=_resolved(provenance.get("data")),
        val_data=_resolved(provenance.get("val_data")),
        train_images=len(train),
        test_images=len(test) if test is not None else None,
        classes=hashlib.sha256("\n".join(train.classes).encode()).hexdigest()[:16],
    )


def check_identity(stored: dict[str, Any] | None, now: Identity, last: Path) -> None:
    """Refuse a resume whose model file, data or sizes differ from those the run was started with (a checkpoint of
    an older version has no identity: nothing to compare)."""
    if not isinstance(stored, dict):
        return
    names = {  # each field as the user gave it
        "model_sha256": "model file (SHA-256)",
        "arch": "architecture",
        "normalization": "normalization",
        "data": "--data",
        "val_data": "--val-data",
        "train_images": "training images",
        "test_images": "evaluation images",
        "classes": "classes",
    }
    diff = [
        f"{names[k]} {_brief(stored.get(k))} (now {_brief(v)})" for k, v in now._asdict().items() if stored.get(k) != v
    ]
    if diff:
        raise RunError(
            f"--resume: the run in {last.parent} was made with {', '.join(diff)}: resume it with the model file "
            "and data it was started with, or start a new run in another --out-dir"
        )


def _resolved(source: str | None) -> str | None:
    return str(Path(source).expanduser().resolve()) if source else None


def _brief(value: object) -> str:
    text = str(value)
    return text[:12] + "…" if len(text) == 64 and "/" not in text else text  # a digest: its first characters


# ---- the loop ----------------------------------------------------------------------------------------------


class LossWatch:
    """The first optimizer step whose running loss sum is not finite, kept on the device: no wait per step."""

    def __init__(self, device: torch.device) -> None:
        self.first = torch.full((), -1, dtype=torch.int64, device=device)

    def see(self, loss_sum: Tensor, step: int) -> None:
        """After optimizer step `step` (from 1), with the epoch's loss sum so far (NaN and Inf stay in a sum)."""
        self.first = torch.where((self.first < 0) & ~torch.isfinite(loss_sum), step, self.first)

    def check(self, epoch: int, steps: int, total: float | None = None) -> None:
        """Raise a RunError naming the epoch and step if a loss was not finite here (or, where `total`, the epoch's
        loss summed over every process, is not finite: a NaN on another process)."""
        first = int(self.first)
        if first < 0 and (total is None or math.isfinite(total)):
            return
        where = f", step {first - (epoch - 1) * steps} of {steps}" if first >= 0 else ""
        raise RunError(
            f"the training loss is not finite (NaN or Inf) in epoch {epoch}{where}: stopped without writing a "
            "checkpoint of it (last.pt, if any, is the last good one); lower --lr, or check the model and data"
        )


def until(stop_asked: Callable[[], bool], batches: Iterable[T]) -> Iterator[T]:
    """The batches, until a stop is asked: then Stopped, between two batches. (As many as `batches`, if it knows.)"""

    def checked() -> Iterator[T]:
        for batch in batches:
            if stop_asked():
                raise Stopped
            yield batch

    return Batches(checked(), len(batches)) if isinstance(batches, Sized) else checked()


def check_compile(compile: bool, device: torch.device) -> None:
    """Refuse torch.compile where it is known to crash the process: torch 2.13's inductor aborts on CPU ("double free
    or corruption", plain torch.compile scripts too); 2.14.1, the version the project pins, compiles fine."""
    if compile and device.type == "cpu" and torch.__version__.startswith("2.13."):
        raise RunError(
            f"--compile on CPU crashes torch {torch.__version__} (its inductor aborts): upgrade torch to "
            "2.14.1, or train without --compile"
        )
