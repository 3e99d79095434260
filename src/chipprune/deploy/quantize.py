"""int8 ONNX models: onnxruntime's static post-training quantization of an exported model, checked on images
before the file is kept.

The quantizer is onnxruntime's own (`quantize_static`: QDQ format, per-channel int8 weights, uint8 activations, the
x86 CPUs' U8S8 kernels); chipprune only feeds it calibration images and checks its result. The model keeps the
export contract (deploy/export.py): images in [0, 1], the normalization built in."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .._memory import out_of_memory
from ..files.fileio import atomic_write, reason
from ..files.modelfile import ModelFile
from .export import ExportError, export, no_stdout

METHODS = ("minmax", "entropy", "percentile")
TOLERANCE = 1.0  # top-1 points the int8 model may lose against the float one on the check images


class Int8Options(NamedTuple):
    """How an int8 model is calibrated and checked (the defaults measured in docs/performance.md)."""

    calibration_images: int = 512
    method: str = "minmax"
    check_images: int = 1000
    tolerance: float = TOLERANCE
    seed: int = 0
    ignore_class_names: bool = False


INT8 = Int8Options()  # the defaults


class Int8Report(NamedTuple):
    """What the check of an int8 model measured, and how it was calibrated."""

    float_top1: float
    int8_top1: float
    agreement: float  # percent of the check images on which both models predict the same class
    check_images: int
    calibration_images: int
    method: str
    bytes: int  # the int8 file's size on disk
    float_bytes: int  # the float ONNX model's, for comparison


class _Check(NamedTuple):
    """The float and the int8 model side by side on the check images."""

    float_top1: float
    int8_top1: float
    agreement: float
    images: int


class _Reader:
    """onnxruntime's CalibrationDataReader over batches of images in [0, 1]."""

    def __init__(self, batches: Iterable[Tensor]) -> None:
        self.batches: Iterator[Tensor] = iter(batches)
        self.images = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        self.images += len(batch)
        return {"images": batch.numpy()}


def quantize(
    mf: ModelFile,
    out: str | os.PathLike[str],
    calibration: Iterable[Tensor],
    check: Iterable[tuple[Tensor, Tensor]],
    *,
    method: str = "minmax",
    tolerance: float = TOLERANCE,
    opset: int = 17,
) -> Int8Report:
    """Write `mf` as an int8 ONNX model calibrated on `calibration` (batches of images in [0, 1]), once its top-1 on
    `check` ((images in [0, 1], labels) batches) is within `tolerance` points of the float model's; else ExportError
    saying by how much it missed, and nothing is written."""
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        batches = iter(calibration)
        first = next(batches, None)
        if first is None:
            raise ExportError("no calibration images for the int8 model")
        export(mf, staged / "float.onnx", "onnx", dynamic_batch=True, opset=opset)
        calibration_images = quantize_onnx(
            staged / "float.onnx", staged / "int8.onnx", itertools.chain([first], batches), method
        )
        c = _compare(staged / "float.onnx", staged / "int8.onnx", check)
        if c.float_top1 - c.int8_top1 > tolerance:
            raise ExportError(
                f"the int8 model's top-1 {c.int8_top1:.2f} % is {c.float_top1 - c.int8_top1:.2f} points below the "
                f"float model's {c.float_top1:.2f} % on {c.images} images, more than the tolerance of {tolerance:g}: "
                "try another --calibration-method or more --calibration-images"
            )
        data = (staged / "int8.onnx").read_bytes()
        atomic_write(out, data)
        float_bytes = (staged / "float.onnx").stat().st_size
    return Int8Report(*c, calibration_images, method, bytes=len(data), float_bytes=float_bytes)


def quantize_onnx(src: Path, dst: Path, calibration: Iterable[Tensor], method: str = "minmax") -> int:
    """The float ONNX model `src` (as export writes it: input `images`) pre-processed (shape inference, graph
    optimization) and quantized into `dst`, calibrated on `calibration` (batches of images in [0, 1]); the number of
    calibration images read."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}  # fmt: skip
    reader = _Reader(calibration)
    with tempfile.TemporaryDirectory() as tmp:
        pre = str(Path(tmp) / "pre.onnx")
        try:
            quant_pre_process(str(src), pre)
            with no_stdout():  # the histogram methods print their progress to stdout, which --json keeps for the result
                quantize_static(
                    pre, str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=methods[method],
                )  # fmt: skip
        except (RuntimeError, ValueError, TypeError, IndexError) as e:  # onnxruntime's own failures: one line
            if out_of_memory(e):
                raise
            raise ExportError(f"onnxruntime cannot quantize the model: {reason(e)}") from None
    return reader.images


def _compare(float_path: Path, int8_path: Path, check: Iterable[tuple[Tensor, Tensor]]) -> _Check:
    """Top-1 (percent) of the float and the int8 model on `check`, and how often they predict the same class."""
    import onnxruntime

    sessions = [
        onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (float_path, int8_path)
    ]
    hits = torch.zeros(3, dtype=torch.long)  # float right, int8 right, both predict the same
    images = 0
    for x, y in check:
        fp, q = (torch.from_numpy(_run(s, x)).argmax(1) for s in sessions)
        hits += torch.stack([(fp == y).sum(), (q == y).sum(), (fp == q).sum()])
        images += len(y)
    if images == 0:
        raise ExportError("no images to check the int8 model on")
    float_top1, int8_top1, agreement = (100 * hits.double() / images).tolist()
    return _Check(float_top1, int8_top1, agreement, images)


def _run(session: Any, images: Tensor) -> np.ndarray:
    """An onnxruntime session's logits for a batch of images."""
    return session.run(None, {"images": images.numpy()})[0]
