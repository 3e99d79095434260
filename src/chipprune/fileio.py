"""File I/O helpers: atomic writes (a crash leaves the old file or the new one, never half of one), and the
one-line reason of a failed read or write."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes the file private; the result should be an ordinary file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def save_torch(obj: object, path: str | os.PathLike) -> None:
    """torch.save, atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def save_json(obj: Any, path: str | os.PathLike) -> None:
    """JSON, indented, atomically."""
    atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode())
