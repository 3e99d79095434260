"""Pruning to a measured latency on the runtime the model will run on (eager PyTorch, TorchScript, onnxruntime).

FLOPs say little about speed: the CHIP paper-1 ResNet-56 has 48 % fewer FLOPs than the dense one and ran 1.25x
faster at batch 1 in eager PyTorch on a 2-core CPU, and slower than dense under onnxruntime at batch 64. So the
latency is measured, never assumed:

- a **layer table**: each conv or linear layer, rebuilt alone at its real input shape with the channel counts asked
  for, is timed on the runtime (median of repeats after warm-up, with its spread), once: the table is cached on disk
  (CHIP_CACHE_DIR/latency, one JSON file per runtime, device, threads and batch size; a layer's entry is keyed by
  its kind, kernel, stride, padding, groups, input size and channel counts). Layers of the same shape share entries.
- **fast counts**: for each dependency group, the channel counts worth stopping at are those faster than every larger
  count, on the group's own profile (its layers' table entries as it alone shrinks): what the hardware runs fast is
  read off the table, not assumed to be a multiple of 8.
- **the choice**: from the dense model, step by step, the group whose next fast count saves the most predicted time
  per unit of CHIP importance removed gives up those channels, until the additive prediction (the layers' entries
  at their current counts, plus the rest of the model as measured dense) meets the target.
- **the check**: the pruned model is built and timed whole. Where it misses the target, the prediction is corrected
  by the ratio measured / predicted and the choice goes on, up to ROUNDS times."""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .coupling import Cost, Group, Space, removal
from .fileio import atomic_write, cache_root

RUNTIMES = ("eager", "torchscript", "onnxruntime")
ROUNDS = 4  # whole-model checks before giving up on the target
GRID = 16  # channel counts tried per group: every unit count up to it, else GRID evenly spaced ones


class Timing(NamedTuple):
    """Milliseconds of one forward pass: median of the repeats, and the lowest and highest."""

    median_ms: float
    min_ms: float
    max_ms: float


@dataclass(frozen=True)
class Runner:
    """Where latency is measured: runtime, batch size, CPU threads, device, and how many runs."""

    runtime: str = "eager"
    batch_size: int = 1
    threads: int | None = None  # torch's default where None
    device: str = "cpu"
    repeats: int = 20
    warmup: int = 3

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.runtime == "onnxruntime" and self.device != "cpu":
            raise ValueError("onnxruntime is measured on the CPU here: give device cpu")

    @property
    def key(self) -> str:
        """What a cached table is valid for."""
        threads = self.threads or torch.get_num_threads()
        return f"{self.runtime}-{self.device.replace(':', '')}-t{threads}-b{self.batch_size}"

    def time(self, module: nn.Module, sample: tuple[int, ...]) -> Timing:
        """One forward of `module` (eval mode) on a random input of shape (batch_size, *sample)."""
        x = torch.randn(self.batch_size, *sample, device=self.device)
        with self._threads(), torch.no_grad():
            run = self._compiled(module.to(self.device).eval(), x)
            for _ in range(self.warmup):
                run()
            times = []
            for _ in range(self.repeats):
                start = time.perf_counter()
                run()
                if x.is_cuda:
                    torch.cuda.synchronize()
                times.append(1000 * (time.perf_counter() - start))
        return Timing(statistics.median(times), min(times), max(times))

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def _compiled(self, module: nn.Module, x: Tensor) -> Callable[[], Any]:
        """A call of the module as the runtime runs it."""
        if self.runtime == "eager":
            return lambda: module(x)
        if self.runtime == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.freeze(torch.jit.trace(module, x))
            return lambda: traced(x)
        import onnxruntime  # the optional `export` extra

        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=17, input_names=["x"])  # type: ignore[arg-type]
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        feed = {"x": x.cpu().numpy()}
        return lambda: session.run(None, feed)


class Layer(NamedTuple):
    """A conv or linear layer as the table knows it: its shape, less its channel counts."""

    kind: str  # conv, depthwise (one group per channel) or linear
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int  # of a grouped conv (kept when pruned); 1 otherwise
    size: tuple[int, ...]  # the input's spatial size (none for a linear layer)

    def build(self, inputs: int, outputs: int) -> nn.Module:
        """The layer alone with these channel counts."""
        if self.kind == "linear":
            return nn.Linear(inputs, outputs)
        groups = inputs if self.kind == "depthwise" else self.groups
        return nn.Conv2d(inputs, outputs, self.kernel, self.stride, self.padding, self.dilation, groups, bias=False)


def describe(module: nn.Module, sample: tuple[int, ...]) -> Layer:
    """The table's description of a conv or linear layer whose input (less the batch) has shape `sample`."""
    if isinstance(module, nn.Linear):
        return Layer("linear", (1, 1), (1, 1), (0, 0), (1, 1), 1, ())
    if not isinstance(module, nn.Conv2d):
        raise ValueError(f"the latency table times Conv2d and Linear layers, not {type(module).__name__}")
    depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
    padding = module.padding if isinstance(module.padding, tuple) else (0, 0)  # "same"/"valid" strings: timm pads
    return Layer(
        "depthwise" if depthwise else "conv",
        _pair(module.kernel_size),
        _pair(module.stride),
        _pair(padding),
        _pair(module.dilation),
        1 if depthwise else module.groups,
        tuple(sample[1:]),
    )


def _pair(value: tuple[int, ...]) -> tuple[int, int]:
    """A conv's 2-D setting."""
    return (int(value[0]), int(value[-1]))


@dataclass
class Table:
    """Measured milliseconds of single layers at given channel counts, for one Runner, cached in `path`."""

    runner: Runner
    path: Path | None
    entries: dict[str, Timing] = field(default_factory=dict)
    measured: int = 0  # entries measured (not read from the cache) in this process

    @classmethod
    def cached(cls, runner: Runner, folder: str | os.PathLike | None = None) -> Table:
        """The table of `runner` under `folder` (default CHIP_CACHE_DIR/latency), with what it holds already."""
        path = cache_root(folder) / "latency" / f"{runner.key}.json"
        table = cls(runner, path)
        with contextlib.suppress(OSError, ValueError, TypeError):
            table.entries = {k: Timing(*v) for k, v in json.loads(path.read_text()).items()}
        return table

    def ms(self, layer: Layer, inputs: int, outputs: int) -> float:
        """The median milliseconds of `layer` with these channel counts (measured on first use), less the runtime's
        cost of a call: in the whole model it is paid once, not per layer (onnxruntime, batch 1: 0.02 ms a call
        against 0.05 ms for a 16-channel 3x3 conv at 32x32)."""
        key = json.dumps([*layer, inputs, outputs])
        if key not in self.entries:
            sample = (inputs, *layer.size) if layer.kind != "linear" else (inputs,)
            self.entries[key] = self.runner.time(layer.build(inputs, outputs), sample)
            self.measured += 1
        return max(0.0, self.entries[key].median_ms - self.call_ms())

    def call_ms(self) -> float:
        """The median milliseconds of a call that does almost nothing (a 1x1 conv of one channel and pixel)."""
        if "call" not in self.entries:
            self.entries["call"] = self.runner.time(nn.Conv2d(1, 1, 1, bias=False), (1, 1, 1))
            self.measured += 1
        return self.entries["call"].median_ms

    def save(self) -> None:
        """Write the cache (where there is a path and it can be written: a cache, not a result)."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps({k: list(v) for k, v in self.entries.items()}).encode())
        except OSError as e:
            warnings.warn(f"not caching the latency table ({e}); set CHIP_CACHE_DIR to a writable folder", stacklevel=2)


class Report(NamedTuple):
    """How a latency-targeted pruning went: dense and pruned latency as measured, the last prediction, rounds."""

    dense: Timing
    pruned: Timing
    predicted_ms: float
    target_ms: float
    rounds: int
    measured_layers: int  # table entries measured (not cached)


@dataclass
class Choice:
    """The greedy choice: units removed per group, and what the table predicts for it."""

    groups: list[Group]
    costs: list[Cost]
    layers: dict[Space, Layer]  # a cost's out space -> its layer
    table: Table
    orders: list[list[int]]  # each group's units, the least important first
    rest_ms: float  # the dense model's measured time less its layers' (scaled) entries
    scale: float  # the entries' weight: 1, or less where alone they add up to more than the whole model takes
    removed: list[int]  # how many units each group has given up

    @classmethod
    def start(
        cls, groups: list[Group], costs: list[Cost], layers: dict[Space, Layer], table: Table,
        orders: list[list[int]], dense_ms: float,
    ) -> Choice:  # fmt: skip
        """The dense model's choice: nothing removed, the rest and scale from its measured time."""
        full = sum(table.ms(layers[c.out], c.in_channels, c.out_channels) for c in costs)
        # Timed alone, small layers can add up to more than the whole model (onnxruntime fuses and overlaps them:
        # 0.43 ms for a 4-layer net whose layers took 0.6 ms alone): then they share the whole time, none is left.
        scale = min(1.0, dense_ms / full) if full > 0 else 1.0
        return cls(groups, costs, layers, table, orders, dense_ms - scale * full, scale, [0] * len(groups))

    def cut(self, removed: list[int] | None = None) -> dict[Space, list[int]]:
        """The channels removed."""
        counts = self.removed if removed is None else removed
        return removal(self.groups, [order[:n] for order, n in zip(self.orders, counts, strict=True)])

    def predict(self, removed: list[int] | None = None) -> float:
        """Milliseconds the table predicts with these units removed."""
        cut = self.cut(removed)
        total = 0.0
        for c in self.costs:
            out = c.out_channels - len(cut.get(c.out, ()))
            inp = c.in_channels - len(cut.get(c.inp, ()))
            total += self.table.ms(self.layers[c.out], inp, out)
        return self.rest_ms + self.scale * total


def fast_counts(choice: Choice, g: int) -> list[int]:
    """Units-removed counts of group g worth stopping at: each predicted faster than every smaller removal (the
    group alone shrinking), on a grid of at most GRID counts."""
    units = len(choice.groups[g].units)
    step = max(1, units // GRID)
    grid = sorted({n for n in range(step, units, step)} | ({units - 1} if units > 1 else set()))
    best, kept = choice.predict([0] * len(choice.groups)), []
    for n in grid:
        removed = [0] * len(choice.groups)
        removed[g] = n
        ms = choice.predict(removed)
        if ms < best:
            best = ms
            kept.append(n)
    return kept


def choose(choice: Choice, scores: list[list[float]], goal_ms: float, stops: list[list[int]]) -> None:
    """Remove units, group by group, at the best predicted saving per importance lost, until `goal_ms` is
    predicted or no group can give more."""
    current = choice.predict()
    while current > goal_ms:
        best: tuple[float, int, int, float] | None = None  # (importance lost per ms saved, group, count, ms)
        for g, nexts in enumerate(stops):
            later = [n for n in nexts if n > choice.removed[g]]
            if not later:
                continue
            trial = list(choice.removed)
            trial[g] = later[0]
            ms = choice.predict(trial)
            if ms >= current:
                continue
            lost = sum(scores[g][choice.removed[g] : later[0]])
            rate = lost / (current - ms)
            if best is None or rate < best[0]:
                best = (rate, g, later[0], ms)
        if best is None:
            return
        _, g, n, current = best
        choice.removed[g] = n
