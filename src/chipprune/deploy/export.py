"""Deployable copies of a model file: ONNX and TorchScript, checked against PyTorch before they are kept.

Contract of an exported model: input `images`, float32 [B, 3, H, W], RGB in [0, 1] (pixel / 255); the
normalization of the model file is built in. Output `logits` [B, classes]."""

from __future__ import annotations

import math
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from ..files.fileio import atomic_write, reason
from ..files.modelfile import ModelFile

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4  # max error relative to the largest logit


class ExportError(RuntimeError):
    """An exported model that does not reproduce PyTorch's outputs."""


class Normalized(nn.Module):
    """A model that takes images in [0, 1] and normalizes them itself."""

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        return self.model((images - self.mean) / self.std)


def export(
    mf: ModelFile,
    path: str | os.PathLike,
    fmt: str,
    *,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    opset: int = 17,
) -> float:
    """Write the model in `fmt`, check it against PyTorch, and return the max relative error."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    model = Normalized(mf.model, mf.mean, mf.std).eval()
    size = mf.input_size
    example = torch.rand(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # Tracing warns on Python-side shape checks (the shortcut's identity test); they are fixed per module.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torch.jit's deprecation notices (DeprecationWarning, FutureWarning since torch 2.14): TorchScript is still
        # the format users ask for.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)  # the ONNX exporter's shape-inference notes; checked below
        staged = Path(tmp) / "model"
        if fmt == "onnx":
            _to_onnx(model, example, staged, opset, dynamic_batch)
        else:
            with torch.no_grad():
                torch.jit.save(torch.jit.trace(model, example), str(staged))
        # A different batch size where it may vary: a batch-size-specialized graph must not pass unnoticed.
        check = torch.rand(batch_size + 2 if dynamic_batch or fmt == "torchscript" else batch_size, 3, size, size)
        with torch.no_grad():
            expected = model(check)
        if not bool(torch.isfinite(expected).all()):
            raise ExportError("the model's own outputs are not finite (NaN or Inf): there is nothing to check against")
        try:
            error = relative_error(run_exported(staged, fmt, check), expected)
        except Exception as e:  # the runtimes raise their own types; the first line says what failed
            raise ExportError(f"the exported model fails on a batch of {len(check)}: {reason(e)}") from None
        if math.isnan(error):
            raise ExportError("the exported model's outputs are not finite (NaN or Inf) where PyTorch's are")
        if not error <= TOLERANCE:
            raise ExportError(f"the exported model differs from PyTorch: relative error {error:.2e} > {TOLERANCE}")
        atomic_write(path, staged.read_bytes())
    return error


def _to_onnx(model: nn.Module, example: Tensor, path: Path, opset: int, dynamic_batch: bool) -> None:
    axes = {"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    try:
        with no_stdout():  # where an export fails, torch prints its whole IR graph to stdout
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes=axes,
            )
    except (RuntimeError, ValueError, TypeError, torch.onnx.errors.OnnxExporterError) as e:
        if "memory" in str(e):
            raise
        why = reason(e).split("[Caused by")[0].strip()[:200]
        raise ExportError(
            f"torch cannot export the model to ONNX at opset {opset} ({why}); opset 17, the default, can"
        ) from None


@contextmanager
def no_stdout() -> Iterator[None]:
    """Within, whatever is written to file descriptor 1 (by C++ as well as Python) is discarded."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def run_exported(path: str | os.PathLike, fmt: str, images: Tensor) -> Tensor:
    """Logits of an exported model, run by onnxruntime (CPU) or the TorchScript runtime."""
    if fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path))(images)
    import onnxruntime  # the optional `export` extra

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def relative_error(got: Tensor, expected: Tensor) -> float:
    """Max absolute difference over the largest magnitude of `expected`: NaN if either holds a NaN or an Inf."""
    if not (bool(torch.isfinite(got).all()) and bool(torch.isfinite(expected).all())):
        return math.nan
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
