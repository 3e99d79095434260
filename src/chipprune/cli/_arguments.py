"""What the `chip` command line checks before any work, and how it reports what fails: one line on stderr.

Option values are checked as argparse parses them: numbers within the range that means something (finite, the right
sign), seeds that the random generators take, devices that exist here, ONNX opsets that torch exports. An argparse
error is one line too (`chip COMMAND: error: …`), not the usage text followed by the error."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import torch

MAX_INT = 2**31 - 1  # counts and sizes beyond this are no use and overflow torch's sizes
MAX_SEED = 2**32  # seeds are in [0, 2**32): training seeds epoch e with seed * 1_000_000 + e, within 64 bits


class UsageError(ValueError):
    """A request the command cannot carry out as given."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: `PROG: error: MESSAGE (see PROG --help)`, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive(text: str) -> int:
    """An integer in [1, 2**31)."""
    return _integer(text, 1, MAX_INT)


def non_negative(text: str) -> int:
    """An integer in [0, 2**31)."""
    return _integer(text, 0, MAX_INT)


def seed(text: str) -> int:
    """A seed: an integer in [0, 2**32)."""
    return _integer(text, 0, MAX_SEED - 1)


def _integer(text: str, lo: int, hi: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from {lo} to {hi:,}, got {text!r}") from None
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(f"must be an integer from {lo} to {hi:,}, got {text}")
    return value


def number(lo: float, hi: float = math.inf, *, above: bool = False, below: bool = False) -> Callable[[str], float]:
    """A type for a finite float in [lo, hi] (`above`: greater than lo; `below`: less than hi)."""
    upper = "∞)" if hi == math.inf else f"{hi:g}{')' if below else ']'}"
    interval = f"{'(' if above else '['}{lo:g}, {upper}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}") from None
        if not math.isfinite(value) or value < lo or value > hi or (above and value == lo) or (below and value == hi):
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


def device(text: str) -> str:
    """A torch device that exists here and computes (not meta)."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (cpu, cuda, cuda:1, mps, …)") from None
    if dev.type == "cpu":
        return text
    if dev.type == "meta":
        raise argparse.ArgumentTypeError("the meta device holds no data: give one that computes, as cpu or cuda")
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None) or getattr(
        getattr(torch.backends, dev.type, None), "is_available", None
    )
    if available is None or not available():
        built = " (this torch is built without CUDA)" if dev.type == "cuda" and torch.version.cuda is None else ""
        raise argparse.ArgumentTypeError(f"no {dev.type} device here{built}: use --device cpu")
    count = getattr(backend, "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        raise argparse.ArgumentTypeError(f"no {dev}: this machine has {count} {dev.type} device(s), from index 0")
    return text


def arch(text: str) -> str:
    """A registry architecture, or a library model: torchvision:NAME, timm:NAME (the library must have it)."""
    from ..models import ARCHS, external

    if text in ARCHS:
        return text
    if not external.is_external(text):
        raise argparse.ArgumentTypeError(
            f"unknown architecture {text!r}: one of {', '.join(ARCHS)}, or torchvision:NAME or timm:NAME"
        )
    try:
        external.parse(text)
    except (ValueError, ImportError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def model_kwargs(text: str) -> dict[str, Any]:
    """A JSON object of constructor arguments, as '{"num_classes": 10}', each one a model file may hold
    (models.external.check_kwargs, which checks a model file's too)."""
    from ..models import external

    def refuse(constant: str) -> NoReturn:
        raise ValueError(f"{constant} is not a number JSON has")

    try:
        value = json.loads(text, parse_constant=refuse)
    except RecursionError:
        raise argparse.ArgumentTypeError("not JSON this reads: nested too deeply") from None
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of constructor arguments, got {text[:40]!r}")
    try:
        return external.check_kwargs(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def opset(text: str) -> int:
    """An ONNX opset that this torch exports."""
    try:
        from torch.onnx import _constants

        lo, hi = _constants.ONNX_MIN_OPSET, _constants.ONNX_MAX_OPSET
    except (ImportError, AttributeError):  # torch's private constants moved: let the exporter tell
        lo, hi = 1, 10_000
    value = _integer(text, 1, 10_000)
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(f"torch {torch.__version__} exports opsets {lo} to {hi}, not {value}")
    return value


def quiet_stdout() -> None:
    """Point stdout at /dev/null, after its reader has gone (a closed pipe): the interpreter's last flush at exit
    then has nowhere to fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
