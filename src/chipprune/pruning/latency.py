"""Pruning to a measured latency on the runtime the model will run on (eager PyTorch, TorchScript, onnxruntime).

FLOPs say little about speed: the CHIP paper-1 ResNet-56 has 48 % fewer FLOPs than the dense one and ran 1.25x
faster at batch 1 in eager PyTorch on a 2-core CPU, and slower than dense under onnxruntime at batch 64. So the
latency is measured, never assumed:

- a **layer table**: each conv or linear layer, rebuilt alone at its real input shape with the channel counts asked
  for (a conv with a BatchNorm and a ReLU after it), is timed on the runtime (median of repeats after warm-up, with
  its spread), once: the table is cached on disk (CHIP_CACHE_DIR/latency, one JSON file per runtime, device,
  threads, batch size and machine: processor and library versions; a layer's entry is keyed by its kind, kernel,
  stride, padding, groups, input size and channel counts). Layers of the same shape share entries. A cached table
  whose entries, timed again, no longer agree with each other (measured under another load) is measured again.
- **the choice**: every group gives up the same fraction of its channels, the least important by CHIP first, then
  groups take channels back (a unit, an aligned count or a part of those removed at a time), the cheapest per unit
  first, while the prediction still meets the aim: a count the hardware runs fast can take less time than a smaller
  one and goes first; which counts those are is read off the table, not assumed.
- **the prediction**: the layers' entries at their current counts, scaled by the dense model's measured time over its
  layers' entries; bisection finds the least fraction predicted to meet the target.
- **the search**: each choice is built and timed whole, side by side with the dense model. The aim starts at the
  target; then it is where a line through every check's (predicted, measured) ratio crosses the middle of
  [BAND x target, target]. The search ends in that band, when a choice comes back, or after ROUNDS checks; the
  least-pruned model that met the target is kept.
- **the floor**: every group keeps FLOOR of its units. Where no check met the target, the model at the floor is
  measured: kept if it meets it, else the target is refused with the ratio the floor reaches."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import platform
import reprlib
import stat
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..files.fileio import atomic_write, cache_root, kind, read_file, reason
from ._coupling import Cost, Group, Space, removable, removal

RUNTIMES = ("eager", "torchscript", "onnxruntime")
ROUNDS = 8  # whole-model checks at most (a check of ResNet-56 at batch 64 under onnxruntime: 26 s)
REFINE = 4  # bisection steps with the channels given back, below the uniform fraction found
ALIGNMENTS = (2, 4, 8, 16, 32)  # kept counts a group tries rounding up to, besides one more and parts of the removed
BISECTIONS = 20  # halvings of the fraction removed: 1e-6 of a group, below one channel in any model
BLOCK = 10  # timed runs of one module in a row, when several are timed side by side
CHECKS = 3  # a whole-model check times CHECKS x --repeats runs of each model: it decides, and is noisier than a layer
# The least fraction of its units a group keeps: the paper's heaviest rate (VGG-16 paper-3, 0.78) keeps 22 % of a
# layer; without a floor, ResNet-56 under onnxruntime at batch 1 came back with one channel a layer (861 parameters,
# 10 % top-1). A target that needs less is refused, naming the ratio the floor reaches.
FLOOR = 0.2
BAND = 0.95  # a measured latency within [BAND x target, target] ends the search; below it, the choice backs off
KINDS = ("conv", "depthwise", "linear")  # a Layer's kinds
# A cached table is trusted where the dense model's entries, timed again, run one multiple of their cached times. A
# ResNet-56 table (onnxruntime, batch 64) cached under the recovery study's load had them at 2.1x to 7.0x today's on the
# idle 2-core Xeon, and the search predicted 0.12x for a model measured at 0.48x; a table measured idle and timed again
# under that load spread 0.45x to 0.96x (batch 1: 0.81x to 1.2x).
RECHECK = 8  # entries timed again at most
STALE = 2.5  # the most their cached/today ratios may spread (highest over lowest)
TABLE_LIMIT = 64 << 20  # bytes of a cached table at most: ResNet-56's, batch 64 under onnxruntime, is 60 kB


class CacheError(ValueError):
    """A cached latency table that cannot be used: the message is one line naming it and saying why."""


# A function that opens a session (a compiled module, an onnxruntime session) and returns one run of it: a block of
# timed runs opens its own and drops it after.
Session = Callable[[], Callable[[], Any]]


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
    block: int = BLOCK  # runs of one module in a row before the next module's

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.runtime == "onnxruntime" and self.device != "cpu":
            raise ValueError("onnxruntime is measured on the CPU here: give device cpu")

    @property
    def key(self) -> str:
        """What a cached table is valid for: the runtime, device, threads and batch, and a digest of the processor
        and library versions (a table measured elsewhere says nothing of this machine)."""
        threads = self.threads or torch.get_num_threads()
        return f"{self.runtime}-{self.device.replace(':', '')}-t{threads}-b{self.batch_size}-{self._machine()}"

    def _machine(self) -> str:
        """8 hex digits naming the processor, torch and the runtime's version."""
        versions = [str(torch.__version__)]
        if self.runtime == "onnxruntime":
            versions.append(metadata.version("onnxruntime"))
        return hashlib.sha256(json.dumps([_processor(self.device), *versions]).encode()).hexdigest()[:8]

    def time(self, module: nn.Module, sample: tuple[int, ...]) -> Timing:
        """One forward of `module` (eval mode) on a random input of shape (batch_size, *sample)."""
        return self.times([module], sample)[0]

    def times(self, modules: list[nn.Module], sample: tuple[int, ...]) -> list[Timing]:
        """Each module's timing (eval mode) on one random input of shape (batch_size, *sample), side by side."""
        x = torch.randn(self.batch_size, *sample, device=self.device)
        with self._threads(), torch.no_grad():
            return self.alternate([self.session(m.to(self.device).eval(), x) for m in modules])

    def alternate(self, sessions: list[Session]) -> list[Timing]:
        """Each session's timing, measured side by side: blocks of `block` runs alternate, so that a machine's drift
        (one run on the 2-core CPU timed three identical pruned ResNet-56s at 40, 45 and 48 ms, batch 64) touches
        them alike. Each block runs in a session of its own, closed after it: onnxruntime's threads spin a while
        after a run and slowed another session's runs by half (ResNet-56, batch 1, 2 threads: 2.9 ms against 1.9)."""
        times: list[list[float]] = [[] for _ in sessions]
        with self._threads(), torch.no_grad():
            for done in range(0, self.repeats, self.block):
                for session, kept in zip(sessions, times, strict=True):
                    run = session()
                    for _ in range(self.warmup):
                        run()
                    for _ in range(min(self.block, self.repeats - done)):
                        begin = time.perf_counter()
                        run()
                        if self.device.startswith("cuda"):
                            torch.cuda.synchronize()
                        kept.append(1000 * (time.perf_counter() - begin))
                    del run
        return [Timing(statistics.median(t), min(t), max(t)) for t in times]

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def session(self, module: nn.Module, x: Tensor) -> Session:
        """The module as the runtime runs it on x."""
        if self.runtime == "eager":
            return lambda: lambda: module(x)
        if self.runtime == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.freeze(torch.jit.trace(_unshared(module), x))
            return lambda: lambda: traced(x)
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=17, input_names=["x"])  # type: ignore[arg-type]
        return self.onnx_session(buffer.getvalue(), {"x": x.cpu().numpy()})

    def onnx_session(self, model: bytes | str, feed: dict[str, Any]) -> Session:
        """An ONNX model (its bytes or its path) run by onnxruntime on the CPU, on `feed`, with the runner's
        threads."""
        import onnxruntime  # the optional `export` extra

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads or torch.get_num_threads()
        options.inter_op_num_threads = 1

        def session() -> Callable[[], Any]:
            opened = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            return lambda: opened.run(None, feed)

        return session


def _unshared(module: nn.Module) -> nn.Module:
    """`module`, or where a submodule holds one tensor under two names, a copy holding a clone under the second:
    torch.jit.trace refuses the first ("TracedModules don't support parameter sharing between modules"), and a pruned
    CIFAR ResNet's identity shortcuts hold their channel map as both src and dst."""

    def repeats(m: nn.Module) -> bool:
        ids = [id(t) for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
        return len(ids) != len(set(ids))

    if not any(repeats(m) for m in module.modules()):
        return module
    module = copy.deepcopy(module)
    for m in module.modules():
        seen = set()
        for name, t in [*m._parameters.items(), *m._buffers.items()]:
            if t is not None and id(t) in seen:
                clone = t.detach().clone()
                setattr(m, name, nn.Parameter(clone, t.requires_grad) if isinstance(t, nn.Parameter) else clone)
            seen.add(id(t))
    return module


def _processor(device: str) -> str:
    """The name of the processor that runs `device`."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


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
        """The layer with these channel counts, a conv as CNNs run it: with a BatchNorm and a ReLU after it, whose
        work grows with its output channels too (eager PyTorch runs them as two more passes over the output;
        onnxruntime folds them into the conv, as it does in the model)."""
        if self.kind == "linear":
            return nn.Linear(inputs, outputs)
        groups = inputs if self.kind == "depthwise" else self.groups
        conv = nn.Conv2d(inputs, outputs, self.kernel, self.stride, self.padding, self.dilation, groups, bias=False)
        return nn.Sequential(conv, nn.BatchNorm2d(outputs), nn.ReLU())


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
        """The table of `runner` under `folder` (default CHIP_CACHE_DIR/latency), with what it holds already. A
        table that is not one as Table.save writes it is measured again, with a warning; one at a path that is not
        a regular file (a link, a FIFO, a device) is neither read nor written."""
        path = cache_root(folder) / "latency" / f"{runner.key}.json"
        table = cls(runner, path)
        if not os.path.lexists(path):
            return table
        try:
            table.entries = _read_table(path)
        except CacheError as e:
            table.path = None if _foreign(path) else path
            warnings.warn(f"{e}; measuring it again" + ("" if table.path else ", not caching it"), stacklevel=2)
        return table

    def ms(self, layer: Layer, inputs: int, outputs: int) -> float:
        """The median milliseconds of `layer` with these channel counts (measured on first use), less the runtime's
        cost of a call: in the whole model it is paid once, not per layer (onnxruntime, batch 1: 0.009 ms a call
        against 0.05 ms for a 16-channel 3x3 conv at 32x32)."""
        key = _key(layer, inputs, outputs)
        if key not in self.entries:
            self.entries[key] = self._time(layer, inputs, outputs)
        return max(0.0, self.entries[key].median_ms - self.call_ms())

    def recheck(self, wanted: list[tuple[Layer, int, int]]) -> None:
        """Time again the cached entries of `wanted` (layer, inputs, outputs; RECHECK at most); where the cached
        times are not one multiple of today's (their ratios spread by more than STALE), drop every cached entry, with
        a warning: a table measured under another load misleads every prediction made from it, where a load that
        slowed every entry alike is harmless (the prediction is scaled by the whole model's measured time)."""
        cached = {key: w for w in wanted if (key := _key(*w)) in self.entries}
        keys = list(cached)[:RECHECK]
        if len(keys) < 2:
            return
        fresh = {key: self._time(*cached[key]) for key in keys}
        ratios = [self.entries[k].median_ms / fresh[k].median_ms for k in keys]
        if max(ratios) <= STALE * min(ratios):
            return
        warnings.warn(
            f"latency table {self.path}: {len(keys)} of its entries timed again ran {min(ratios):.2f}x to "
            f"{max(ratios):.2f}x their cached times (measured under another load?); measuring it again",
            stacklevel=2,
        )
        self.entries = fresh

    def _time(self, layer: Layer, inputs: int, outputs: int) -> Timing:
        """Time `layer` with these channel counts on the runner."""
        sample = (inputs, *layer.size) if layer.kind != "linear" else (inputs,)
        self.measured += 1
        return self.runner.time(layer.build(inputs, outputs), sample)

    def call_ms(self) -> float:
        """The median milliseconds of a call that runs no layer (nn.Identity on one value): a layer's own
        overhead stays in its entry, as it does in the model (eager PyTorch: 0.002 ms for the call, 0.013 ms for a
        1x1 conv of one channel and pixel)."""
        if "call" not in self.entries:
            self.entries["call"] = self.runner.time(nn.Identity(), (1, 1, 1))
            self.measured += 1
        return self.entries["call"].median_ms

    def save(self) -> None:
        """Write the cache (where there is a path and it can be written: a cache, not a result)."""
        if self.path is None:
            return
        foreign = _foreign(self.path)
        if foreign:
            warnings.warn(f"not caching the latency table: {self.path} is {foreign}", stacklevel=2)
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps({k: list(v) for k, v in self.entries.items()}).encode())
        except OSError as e:
            warnings.warn(f"not caching the latency table ({e}); set CHIP_CACHE_DIR to a writable folder", stacklevel=2)


def _key(layer: Layer, inputs: int, outputs: int) -> str:
    """A table entry's key: the layer's fields and its channel counts, as JSON."""
    return json.dumps([*layer, inputs, outputs])


def _read_table(path: Path) -> dict[str, Timing]:
    """The entries of the table cached at `path`, or CacheError: where it is not a regular file (a FIFO is never
    waited on, a link never followed), not a JSON object, or holds an entry Table.save would not have written."""
    foreign = _foreign(path)
    if foreign:
        raise CacheError(f"{path} is {foreign}, not a latency table")
    data = read_file(path, limit=TABLE_LIMIT, what="latency table", error=CacheError)
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise CacheError(f"latency table {path} is damaged: not JSON ({reason(e)})") from None
    if not isinstance(raw, dict):
        raise CacheError(f"latency table {path} is damaged: a JSON {type(raw).__name__}, not an object")
    entries = {}
    for key, value in raw.items():
        timing = _timing(value)
        if timing is None or not _is_key(key):
            raise CacheError(
                f"latency table {path} is damaged: entry {reprlib.repr(key)} holds {reprlib.repr(value)}, not a timing"
            )
        entries[key] = timing
    return entries


def _foreign(path: Path) -> str | None:
    """What is at `path` where it is neither nothing nor a regular file: the cache is never read or written through
    a symbolic link (one planted there would have its target replaced by the table), nor waits on a FIFO."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"unreadable ({e.strerror or reason(e)})"
    if stat.S_ISREG(mode):
        return None
    return "a symbolic link" if stat.S_ISLNK(mode) else kind(path)


def _timing(value: object) -> Timing | None:
    """A cached entry's Timing, where it is one: three finite positive milliseconds, the median between the others."""
    if not isinstance(value, list) or len(value) != len(Timing._fields):
        return None
    if not all(type(v) in (int, float) and math.isfinite(v) and v > 0 for v in value):
        return None
    timing = Timing(*map(float, value))
    return timing if timing.min_ms <= timing.median_ms <= timing.max_ms else None


def _is_key(key: str) -> bool:
    """Whether `key` is one the table writes: "call", or a Layer's fields and its channel counts, as JSON."""
    if key == "call":
        return True
    try:
        fields = json.loads(key)
    except (ValueError, RecursionError):
        return False
    if not isinstance(fields, list) or len(fields) != len(Layer._fields) + 2:
        return False
    kind, *pairs, groups, size, inputs, outputs = fields

    def counts(values: object, least: int, length: int | None = None) -> bool:
        return (
            isinstance(values, list)
            and (length is None and len(values) <= 2 or len(values) == length)
            and all(type(v) is int and v >= least for v in values)
        )

    return (
        kind in KINDS
        and all(counts(p, 0, 2) for p in pairs)
        and counts(size, 1)
        and counts([groups, inputs, outputs], 1, 3)
        and json.dumps(fields) == key
    )


class Trial(NamedTuple):
    """One round's pruned model and its latency, measured beside the dense model's."""

    ratio: float  # pruned / dense, medians
    dense: Timing
    pruned: Timing
    predicted_ms: float
    model: nn.Module


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
    """A choice of channels to remove: units removed per group, and what the table predicts for it."""

    groups: list[Group]
    costs: list[Cost]
    layers: dict[Space, Layer]  # a cost's out space -> its layer
    table: Table
    orders: list[list[int]]  # each group's units, the least important first
    scale: float  # the dense model's measured time per millisecond of its layers' entries
    touched: list[list[int]]  # each group's costs: those whose input or output channels it holds
    holders: dict[Space, list[int]]  # each space's groups
    most: list[int]  # the most units each group can give up: FLOOR of them, and a channel a layer (coupling.removable)
    removed: list[int] = field(default_factory=list)  # how many units each group has given up
    current: list[float] = field(default_factory=list)  # each cost's table entry at `removed`
    counts: dict[tuple[int, int], dict[Space, int]] = field(default_factory=dict)  # (group, units) -> cut per space

    @classmethod
    def start(
        cls, groups: list[Group], costs: list[Cost], layers: dict[Space, Layer], table: Table,
        orders: list[list[int]], dense_ms: float,
    ) -> Choice:  # fmt: skip
        """The dense model's choice: nothing removed, the scale from its measured time."""
        spaces = [{space for cls in g.classes for space, _ in cls} for g in groups]
        holders: dict[Space, list[int]] = {}
        for g, held in enumerate(spaces):
            for space in held:
                holders.setdefault(space, []).append(g)
        touched = [[i for i, c in enumerate(costs) if c.out in held or c.inp in held] for held in spaces]
        full = sum(table.ms(layers[c.out], c.in_channels, c.out_channels) for c in costs)
        # The rest of the model shrinks with its layers: in onnxruntime's profile of ResNet-56 at batch 1 the adds,
        # ReLUs and layout reorders took 0.9 of 3.0 ms, and the reorders doubled in number once pruned. A fixed rest
        # put a floor under the prediction (1.06 ms, 0.5x) that the model, measured, did not have.
        scale = dense_ms / full if full > 0 else 1.0
        most = [
            min(removable(g, order), len(order) - max(1, math.ceil(FLOOR * len(order))))
            for g, order in zip(groups, orders, strict=True)
        ]
        choice = cls(groups, costs, layers, table, orders, scale, touched, holders, most)
        choice.reset()
        return choice

    def reset(self) -> None:
        """Back to the dense model."""
        self.removed = [0] * len(self.groups)
        self.current = [self._ms(i, self.removed) for i in range(len(self.costs))]

    def set(self, g: int, n: int) -> None:
        """Group g gives up its n least important units."""
        self.removed[g] = n
        for i in self.touched[g]:
            self.current[i] = self._ms(i, self.removed)

    def cut(self) -> dict[Space, list[int]]:
        """The channels removed."""
        return removal(self.groups, [order[:n] for order, n in zip(self.orders, self.removed, strict=True)])

    def predict(self, g: int | None = None, n: int = 0) -> float:
        """Milliseconds the table predicts for the choice, or for it with group g giving up n units instead."""
        total = sum(self.current)
        if g is not None:
            trial = list(self.removed)
            trial[g] = n
            total += sum(self._ms(i, trial) - self.current[i] for i in self.touched[g])
        return self.scale * total

    def _ms(self, i: int, removed: list[int]) -> float:
        """Cost i's table entry with these units removed."""
        c = self.costs[i]
        return self.table.ms(
            self.layers[c.out], c.in_channels - self._cut(c.inp, removed), c.out_channels - self._cut(c.out, removed)
        )

    def _cut(self, space: Space, removed: list[int]) -> int:
        """How many channels of `space` these units removed take."""
        total = 0
        for g in self.holders.get(space, ()):
            key = (g, removed[g])
            if key not in self.counts:
                chosen = removal([self.groups[g]], [self.orders[g][: removed[g]]])
                self.counts[key] = {s: len(idxs) for s, idxs in chosen.items()}
            total += self.counts[key].get(space, 0)
        return total


def next_aim(tried: list[Trial], dense_ms: float, ratio: float) -> float:
    """The predicted milliseconds at which the measured ratio should be `ratio`: on the least-squares line through
    the trials' (predicted, measured) ratios where it rises, else by the last trial's proportion; kept between the
    nearest trials above and below `ratio`, or within a factor of 2 of the last where all lie on one side (a line
    through checks that all ran slow extrapolated ResNet-56 at onnxruntime batch 1 to 861 parameters)."""
    xs = [t.predicted_ms / dense_ms for t in tried]
    ys = [t.ratio for t in tried]
    aim = tried[-1].predicted_ms * ratio / tried[-1].ratio
    if len(set(xs)) > 1:
        slope, intercept = statistics.linear_regression(xs, ys)
        if slope > 0:
            aim = dense_ms * (ratio - intercept) / slope
    above = [t.predicted_ms for t in tried if t.ratio > ratio]
    below = [t.predicted_ms for t in tried if t.ratio <= ratio]
    low = max(below) if below and above else tried[-1].predicted_ms / 2
    high = min(above) if below and above else tried[-1].predicted_ms * 2
    return min(max(aim, low), high) if low <= high else aim  # noise can order the trials wrongly: then no bounds


def fraction_for(choice: Choice, goal_ms: float, progress: bool = False) -> float:
    """The least fraction of every group's units whose choice the table predicts at `goal_ms` or less (1 where none
    does): bisection on the uniform removal, then a few steps below it with the channels given back, which only
    make a choice faster (each give-back measures the counts it tries: REFINE of them, not BISECTIONS). One fraction
    for all: CHIP scores rank the channels of a layer, not layers against each other (ResNet-56, onnxruntime, batch
    64, 0.5x: a greedy choice by score lost per ms saved left stage 1 with 3 of 16 channels, 11.4 % top-1 after
    BatchNorm re-estimation, against 51.4 % for the FLOPs-matched uniform pruning)."""
    bar = tqdm(total=BISECTIONS + REFINE, desc="latency table", unit="step", disable=not progress)
    low, high = 0.0, 1.0
    for steps, given_back in ((BISECTIONS, False), (REFINE, True)):
        low = 0.0
        for _ in range(steps):
            middle = (low + high) / 2
            choose(choice, middle, goal_ms) if given_back else _uniform(choice, middle)
            if choice.predict() <= goal_ms:
                high = middle
            else:
                low = middle
            bar.update()
    bar.close()
    return high


def choose(choice: Choice, fraction: float, goal_ms: float) -> None:
    """Every group gives up `fraction` of its units, then takes back units while the table predicts `goal_ms` or
    less, or no time added."""
    _uniform(choice, fraction)
    _give_back(choice, goal_ms)


def _uniform(choice: Choice, fraction: float) -> None:
    """Each group gives up `fraction` of its units (rounded; at most the units it can give up)."""
    choice.reset()
    for g, group in enumerate(choice.groups):
        n = min(round(fraction * len(group.units)), choice.most[g])
        if n:
            choice.set(g, n)


def _returns(units: int, removed: int) -> set[int]:
    """The smaller removals a group tries: one unit fewer, the kept count rounded up to a multiple of 2, 4, ... 32
    (SIMD widths are powers of two; the table says which, if any, pays), or 1/4, 1/2, 3/4 or all of the removed."""
    kept = units - removed
    counts = {kept + 1, *(-(-kept // a) * a for a in ALIGNMENTS), *(kept + removed * k // 4 for k in range(1, 5))}
    return {units - c for c in counts if kept < c <= units}


def _give_back(choice: Choice, goal_ms: float) -> None:
    """Return units, to the counts _returns tries (each a table entry per layer it touches), the one adding the least
    predicted time per unit first, while the prediction stays at `goal_ms` or less, or does not grow. A count the
    hardware runs fast can take less time than a smaller one (onnxruntime, batch 64: a 3x3 conv from 16 to 16 channels
    at 32x32 took 1.9 ms, to 8 channels 2.8 ms): those returns go first. One fraction for all groups moves in coarse
    steps; this spends what is left of the goal group by group."""
    current = choice.predict()
    while True:
        best: tuple[float, int, int, float] | None = None  # (ms added per unit returned, group, count, ms)
        for g, removed in enumerate(choice.removed):
            for n in _returns(len(choice.groups[g].units), removed):
                ms = choice.predict(g, n)
                rate = (ms - current) / (choice.removed[g] - n)
                if ms <= max(goal_ms, current) and (best is None or rate < best[0]):
                    best = (rate, g, n, ms)
        if best is None:
            return
        _, g, n, current = best
        choice.set(g, n)
