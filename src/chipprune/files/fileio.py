"""File I/O helpers: atomic writes (a crash leaves the old file or the new one, never half of one) to outputs that
are checked first (a regular file or a new path, never an input of the same command), reads of regular files only
(never blocked on a FIFO, never longer than a limit), and the one-line reason of a failed read or write."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import pickle
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

TEMP_SUFFIX = ".tmp"
# Suffixes that decide the format a file is read and written in (a model file: safetensors, else torch's).
FORMAT_SUFFIXES = (".safetensors",)
_RANDOM = 8  # characters mkstemp puts between the prefix and the suffix


class OutputError(OSError):
    """An output that cannot be written as asked: the message is one line naming it and saying why."""


def kind(path: str | os.PathLike) -> str:
    """What is at `path`, in words ('a folder', 'a FIFO', …; 'nothing' where nothing is), following links."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if os.path.islink(path) else "nothing"
    except OSError as e:
        return f"unreadable ({e.strerror or reason(e)})"
    return mode_kind(mode)


def mode_kind(mode: int) -> str:
    """A file type in words (a symbolic link where `mode` is lstat's)."""
    for test, words in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return words
    return "not a regular file"


def read_file(path: str | os.PathLike, *, limit: int, what: str, error: type[Exception]) -> bytes:
    """The bytes of the regular file at `path`, of at most `limit` bytes; else `error` with one line saying what is
    there instead. A FIFO or device is never read: the open does not wait for a writer, and nothing is read past the
    limit (/dev/zero never ends)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or reason(e)}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{path} is {mode_kind(mode)}, not a {what}")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise error(f"cannot read {path}: {e.strerror or reason(e)}") from None
    if len(data) > limit:
        raise error(f"{path} is over {size_text(limit)}: too large for a {what}")
    return data


def size_text(n: int) -> str:
    """A byte count in words: 512 bytes, 64 MB."""
    for unit, size in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


# ---- outputs -----------------------------------------------------------------------------------------------


def check_output(
    path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), *, option: str = "--out", hint: str = ""
) -> None:
    """Refuse, before any work, an output that cannot be written or that would destroy an input of the same
    command: empty, a folder, FIFO or device, under a regular file, a name the file system cannot hold, a link to a
    file of another format, or an input or a file under an input folder (also through links). `hint` ends the
    message of the last case (how to ask for it anyway)."""
    target = _target(path)
    folder = _existing_ancestor(target)
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        raise OutputError(f"cannot write {path}: {folder} is on a read-only file system")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: no permission to write in {folder}")
    replaced = replaced_input(target, inputs)
    if replaced is not None:
        same = "" if replaced == os.fspath(path) else f"the same file as {replaced}, "
        raise OutputError(
            f"{option} {path} is {same}an input of this command: writing it would destroy it; choose another "
            f"{option}{hint}"
        )


def _target(path: str | os.PathLike) -> Path:
    """The file an output path writes: through symbolic links; refused unless a regular file or a new path in a
    folder that can be made, with a name the file system can hold."""
    text = os.fspath(path)
    if not text.strip():
        raise OutputError("empty output path")
    target = Path(os.path.realpath(text))  # a symbolic link is written through: its target is replaced
    if os.path.lexists(target) and not target.is_file():
        raise OutputError(f"{text} is {kind(target)}: an output must be a regular file or a new path")
    if _format(text) != _format(target):  # written in the format of its name, it would be read in its target's
        raise OutputError(
            f"cannot write {text}: it links to {target}, and a file named {Path(text).name} is written in another "
            f"format than one named {target.name} is read in; write {target} itself, or a new path"
        )
    _parent_ok(target, text)
    return target


def _format(path: str | os.PathLike) -> str | None:
    """The format a file's name decides (one of FORMAT_SUFFIXES), or None where its reader's default holds."""
    return next((s for s in FORMAT_SUFFIXES if Path(path).suffix == s), None)


def _parent_ok(target: Path, text: str) -> None:
    """Refuse a path whose nearest existing ancestor is not a folder, or whose name is too long."""
    ancestor = _existing_ancestor(target)
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {text}: {ancestor} is {kind(ancestor)}, not a folder")
    try:
        limit = os.pathconf(ancestor, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    long = [p for p in target.relative_to(ancestor).parts if len(os.fsencode(p)) > limit]
    if long:
        shown = text if len(text) < 80 else text[:60] + "…"
        raise OutputError(
            f"cannot write {shown}: a name of {len(os.fsencode(long[0]))} bytes, over the {limit} the file system "
            "allows"
        )


def _existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of `path` that exists."""
    ancestor = path.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    return ancestor


def replaced_input(target: Path, inputs: Iterable[str | os.PathLike | None]) -> str | None:
    """The input that writing `target` (a path without links) would replace, in words: an input itself (the same
    path after links, or a hard link of it), or a file that exists under an input folder; None where none is."""
    for source in inputs:
        if source is None or not str(source):
            continue
        real = Path(os.path.realpath(source))
        if real in target.parents and os.path.lexists(target):
            return f"{target}, a file under {source}"
        if real == target or _same_inode(target, source):
            return os.fspath(source)
    return None


def _same_inode(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths are one file (False where either is not there)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync, then rename over it.

    A symbolic link is written through (the file it points to is replaced, the link kept); anything but a regular
    file or a new path is refused; a replaced file keeps its permissions (and, for root, its owner). Every failure
    is an OutputError naming `path`, after which the old file is intact and no temp file is left."""
    target = _target(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target.name), suffix=TEMP_SUFFIX, dir=target.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or reason(e)}") from None
    try:
        _take_mode(fd, target)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise OutputError(f"cannot write {path}: {e.strerror or reason(e)}") from None
        raise


def _take_mode(fd: int, target: Path) -> None:
    """Give the temp file the permissions (and, for root, the owner) of the file it replaces, or of a new file."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes the file private; a new file is an ordinary one
        return
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
        with contextlib.suppress(OSError):  # a file system without owners
            os.fchown(fd, st.st_uid, st.st_gid)


def _temp_prefix(name: str) -> str:
    """`.NAME.`, NAME cut so that the temp file's name fits in 255 bytes."""
    room = 255 - len(".." + TEMP_SUFFIX) - _RANDOM
    raw = os.fsencode(name)
    if len(raw) > room:
        name = os.fsdecode(raw[:room].decode("utf-8", "ignore").encode())
    return f".{name}."


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def reason(e: BaseException) -> str:
    """The first line of an exception's message (or its type, if it has none), for one-line errors."""
    lines = str(e).strip().splitlines()
    return lines[0].rstrip(": ") if lines else type(e).__name__


def load_reason(e: BaseException, path: str | os.PathLike) -> str:
    """The one-line reason a weights-only `torch.load` of `path` failed, told by the error's type and our own look
    at the file, not by torch's wording (which changes between releases and advises disabling weights_only)."""
    if isinstance(e, pickle.UnpicklingError):  # the weights-only unpickler refused what the file holds
        try:  # names the objects a zip checkpoint asks for, reading the pickle's opcodes without running any
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip checkpoint: a bare pickle, or a damaged one
            unsafe = []
        return f"it asks for {', '.join(unsafe[:3])}" if unsafe else "the weights-only reader refused it"
    # Only the first sentence of the first line: torch's zip reader appends a paragraph of advice in the same line.
    return reason(e).split(". ")[0].rstrip(".: ") or type(e).__name__


def sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stale_temps(path: str | os.PathLike) -> list[Path]:
    """Temp files of atomic writes to `path` that a killed process left behind (never read as `path` itself)."""
    path = Path(path)
    return sorted(path.parent.glob(glob.escape(_temp_prefix(path.name)) + "?" * _RANDOM + TEMP_SUFFIX))


def save_torch(obj: object, path: str | os.PathLike) -> None:
    """torch.save, atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def save_json(obj: Any, path: str | os.PathLike) -> None:
    """JSON, indented, atomically."""
    atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode())


def cache_root(given: str | os.PathLike | None = None) -> Path:
    """The folder of chipprune's caches: `given`, else CHIP_CACHE_DIR, else ~/.cache/chipprune."""
    return Path(given or os.environ.get("CHIP_CACHE_DIR") or Path.home() / ".cache/chipprune").expanduser()
