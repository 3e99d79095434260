"""Fine-tuning and training from scratch: one loop for one process or many (torchrun), resumable exactly.

A run is a folder: config.json, metrics.jsonl (a line per epoch), last.pt (a model file with the training state),
best.pt (the best test top-1 so far) and curves.png. The data order and augmentation of epoch e depend on (seed, e)
alone and the learning rate on the step alone, so a run resumed from last.pt goes on exactly as if it had not
stopped. Under torchrun each batch is split among the processes (DistributedDataParallel); rank 0 writes."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..data import ImageSplit, load_split
from ..data.sources import MissingSplit
from ..files.fileio import atomic_write, save_json, sha256, stale_temps
from ..files.modelfile import ModelFile, load_checkpoint, load_model
from ..models import RegistryModel
from .distributed import LOCAL, Place, all_reduce, barrier, broadcast_buffers, on_any
from .evaluate import evaluate
from .precision import FLOAT32, Precision
from .runs import (
    RUN_FILES,
    Identity,
    LossWatch,
    Stopped,
    check_compile,
    check_identity,
    identity,
    refuse_previous,
    run_lock,
    until,
)

LOG_EVERY = 10  # steps between progress-bar updates: each one waits for the device
HISTORY_NEEDS = ("epoch", "lr", "train_loss", "train_top1", "test_top1")  # what a resumed run reads of each epoch
SHA256 = re.compile("[0-9a-f]{64}")


# Distillation defaults, chosen by a short comparison on the CHIP-pruned ResNet-56 (paper-1): docs/training.md.
KD_WEIGHT = 0.9
KD_TEMPERATURE = 4.0


class TrainError(ValueError):
    """A training run that cannot start or go on as asked."""


class Teacher(NamedTuple):
    """The model a fine-tuning distills from, and the file it came from."""

    model_file: ModelFile
    path: Path
    sha256: str


def load_teacher(spec: str, student: ModelFile) -> Teacher:
    """The teacher named by `--teacher`: a model file, or "parent": the file the student was pruned from, as long as
    it is still there unchanged. It must take the same inputs and give the same classes as the student."""
    path = _parent(student) if spec == "parent" else Path(spec)
    teacher = load_model(path)
    compared = {
        "input size": (teacher.input_size, student.input_size),
        "normalization": ((teacher.mean, teacher.std), (student.mean, student.std)),
        "classes": (teacher.classes, student.classes),
    }
    differs = [f"{what} {_shown(a)} (the student's: {_shown(b)})" for what, (a, b) in compared.items() if a != b]
    if differs:
        raise TrainError(
            f"the teacher {path} takes other inputs or gives other classes than the model it teaches: "
            + ", ".join(differs)
        )
    return Teacher(teacher, path, sha256(path))


def _shown(value: object) -> str:
    """A value in at most 60 characters: a long list of class names cut."""
    text = str(value)
    return text if len(text) <= 60 else text[:59] + "…"


def _parent(student: ModelFile) -> Path:
    """The file the student was pruned from, as its meta records it, if it is still there unchanged."""
    student_path = student.path or "the model"
    pruned = student.meta.get("pruned")
    if pruned is None or (isinstance(pruned, dict) and "parent_path" not in pruned):
        raise TrainError(f"{student_path} records no parent (it was not pruned by chip prune): give --teacher FILE")
    record = pruned if isinstance(pruned, dict) else {}
    path, digest = record.get("parent_path"), record.get("parent_sha256")
    if not (isinstance(path, str) and path and isinstance(digest, str) and SHA256.fullmatch(digest)):
        raise TrainError(f"{student_path}: damaged model file: its meta records no valid parent path and SHA-256")
    if not Path(path).is_file() or sha256(path) != digest:
        raise TrainError(f"the parent of {student_path}, {path}, is gone or has changed since: give --teacher FILE")
    return Path(path)


@dataclass(frozen=True)
class Tally:
    """An epoch's sums over all the processes so far: loss x images, top-1 hits, images, seconds of training."""

    loss: float = 0.0
    hits: float = 0.0
    images: float = 0.0
    seconds: float = 0.0


class StepSums(NamedTuple):
    """This process's sums over the epoch's steps so far, kept on the device: reading one waits for the device."""

    loss: Tensor  # loss x images
    hits: Tensor
    images: Tensor

    @classmethod
    def starting_at(cls, tally: Tally, device: torch.device) -> StepSums:
        """Sums that start from a tally's (its seconds are counted apart)."""
        values = (tally.loss, tally.hits, tally.images)
        return cls(*(torch.tensor(v, dtype=torch.float64, device=device) for v in values))

    def add(self, loss: Tensor, logits: Tensor, labels: Tensor) -> None:
        """Add one micro-batch's mean loss and hits."""
        self.loss.add_(loss.detach().double() * len(labels))
        self.hits.add_((logits.argmax(1) == labels).sum())
        self.images.add_(len(labels))

    def reduced(self, place: Place, seconds: float) -> Tally:
        """The sums of all the processes, as numbers (one all-reduce)."""
        packed = torch.stack(list(self))
        all_reduce(packed, place)
        loss, hits, images = packed.tolist()
        return Tally(loss, hits, images, seconds)


@dataclass(frozen=True)
class Config:
    """What a run's weights depend on: a resumed run must have the same."""

    epochs: int
    batch_size: int  # the global batch: split among the processes, then into `accum` micro-batches
    lr: float  # the peak, reached at the end of warm-up
    momentum: float
    weight_decay: float
    label_smoothing: float
    warmup_epochs: float
    seed: int = 0
    train_subset: int | None = None
    accum: int = 1
    amp: str = "off"  # resolved: bf16, fp16 or off (precision.choose turns --amp auto into one of them)
    sync_bn: bool = False
    teacher: str | None = None  # SHA-256 of the model file distilled from, if any
    kd_weight: float = 0.0  # A in A*T^2*KL(teacher || student at T) + (1 - A)*cross-entropy
    kd_temperature: float = 1.0  # T


PRESETS = {
    # The authors' code and README; the paper's text says 300 epochs at batch 128 (docs/training.md).
    "paper-cifar": Config(
        epochs=400, batch_size=256, lr=0.01, momentum=0.9, weight_decay=0.005, label_smoothing=0.0, warmup_epochs=5
    ),
    "paper-imagenet": Config(
        epochs=180, batch_size=256, lr=0.01, momentum=0.99, weight_decay=1e-4, label_smoothing=0.1, warmup_epochs=5
    ),
    "baseline-cifar": Config(
        epochs=200, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, label_smoothing=0.0, warmup_epochs=0
    ),
}


def load_data(
    source: str, val_source: str | None, subset: int | None, seed: int, place: Place, ignore_class_names: bool = False
) -> tuple[ImageSplit, ImageSplit | None]:
    """The train split (a seeded subset of it, if asked) and the evaluation split, if there is one, with the same
    classes (or, with `ignore_class_names`, as many, matched by position)."""
    train = load_split(source, "train", progress=place.is_main)
    if subset is not None:
        if subset > len(train) and place.is_main:
            warnings.warn(
                f"asked for {subset} training images, the train split has {len(train)}: using them all", stacklevel=2
            )
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:subset].sort().values
        train = replace(
            train,
            labels=train.labels[idx],
            images=None if train.images is None else train.images[idx],
            paths=None if train.paths is None else [train.paths[i] for i in idx.tolist()],
            spans=None if train.spans is None else train.spans[idx],
        )
    try:
        test = load_split(val_source or source, "test", progress=place.is_main)
    except MissingSplit as e:  # a damaged split is an error, not a reason to train without evaluation
        if val_source:
            raise
        if place.is_main:
            warnings.warn(f"no evaluation split ({e}): training without evaluation, so no best.pt", stacklevel=2)
        return train, None
    if test.classes != train.classes:
        if not ignore_class_names or len(test.classes) != len(train.classes):
            raise TrainError(
                f"the evaluation split's classes differ from the train split's: {val_source or source}"
                + ("" if ignore_class_names else " (--ignore-class-names matches as many by position)")
            )
        if place.is_main:
            warnings.warn("matching the evaluation split's classes to the train split's by position", stacklevel=2)
    return train, test


def lr_at(step: int, cfg: Config, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step `step` (from 0): linear warm-up to cfg.lr, then cosine decay to 0."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    decay = cfg.epochs * steps_per_epoch - warmup
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, decay)))


def fit(
    mf: ModelFile,
    train: ImageSplit,
    test: ImageSplit | None,
    cfg: Config,
    run: Path,
    *,
    resume: bool = False,
    place: Place = LOCAL,
    precision: Precision = FLOAT32,
    compile: bool = False,
    workers: int = 0,
    progress: bool = True,
    provenance: dict[str, Any] | None = None,
    teacher: nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Train mf's model on `train`, evaluating on `test` after each epoch, in the run folder; the metrics per epoch.
    With a teacher (cfg.teacher names its file), the loss distills from its logits (distillation_loss)."""
    steps = _checked(train, cfg, place, precision, compile, teacher)
    with run_lock(run, place.is_main):  # one process at a time in a run folder
        ident = identity(provenance, mf.arch, mf.mean, mf.std, train, test)  # a resume must match it
        mf, state = _start(mf, cfg, run, resume, ident, steps, place)
        if place.is_main:
            print(f"precision: {precision.describe()}", file=sys.stderr)
            _remove_stale_temps(run)
            save_json(
                _run_config(provenance, cfg, place, precision, compile, train, test, steps, state), run / "config.json"
            )
        loop = _Loop.prepare(mf, teacher, state, cfg, run, place, precision, compile, steps, workers, progress)
        train, test = _to(train, place.device), None if test is None else _to(test, place.device)
        with _stop_requests() as stop_asked:
            for epoch in range(len(state["history"]) + 1, cfg.epochs + 1):
                done = loop.train_epoch(epoch, train, stop_asked)
                loop.end_epoch(epoch, done, test, stop_asked)
        if place.is_main:
            plot_curves(state["history"], run / "curves.png")
        barrier(place)  # the others wait for rank 0's writes: torchrun ends every process once one has exited
    return cast(list[dict[str, Any]], state["history"])


def _checked(
    train: ImageSplit, cfg: Config, place: Place, precision: Precision, compile: bool, teacher: nn.Module | None
) -> int:
    """The steps per epoch, once the run's settings are found to go together."""
    if (teacher is None) != (cfg.teacher is None):
        raise TrainError("a teacher model and cfg.teacher (its file's SHA-256) go together")
    if precision.amp != cfg.amp:
        raise TrainError(f"the precision's autocast ({precision.amp}) is not the run's ({cfg.amp})")
    steps = len(train) // cfg.batch_size  # per epoch: the last partial batch is dropped
    if steps == 0:
        raise TrainError(f"the train split has {len(train)} images, fewer than one batch of {cfg.batch_size}")
    if cfg.batch_size % (place.world * cfg.accum):
        raise TrainError(
            f"the batch of {cfg.batch_size} does not split into {place.world} processes x {cfg.accum} micro-batches"
        )
    if cfg.sync_bn and place.world > 1 and place.device.type == "cpu":
        raise TrainError("--sync-bn needs GPUs: torch's SyncBatchNorm does not run on CPU")
    check_compile(compile, place.device)
    return steps


def _start(
    mf: ModelFile, cfg: Config, run: Path, resume: bool, ident: Identity, steps: int, place: Place
) -> tuple[ModelFile, dict[str, Any]]:
    """The model and the training state to start from: the run's last checkpoint on --resume, else fresh ones."""
    last = run / "last.pt"
    if resume and last.exists():
        return _resume(last, cfg, ident, steps, place.device)
    if last.exists():
        raise TrainError(f"{run} already holds a run: --resume to continue it, or choose another --out-dir")
    refuse_previous(run)
    if resume and place.is_main:  # one command line for the first start and every restart
        print(f"--resume: no {last} yet, starting the run", file=sys.stderr)
    return mf, {"step": 0, "history": [], "best_top1": None, "partial": Tally(), "identity": ident._asdict()}


def _run_config(
    provenance: dict[str, Any] | None, cfg: Config, place: Place, precision: Precision, compile: bool,
    train: ImageSplit, test: ImageSplit | None, steps: int, state: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """What config.json records of a run (and of each restart: its start_step)."""
    return {
        **(provenance or {}),
        "config": asdict(cfg),
        "processes": place.world,
        "device": str(place.device),
        "channels_last": precision.channels_last,
        "precision": precision.why,
        "compile": compile,
        "train_images": len(train),
        "test_images": len(test) if test else None,
        "steps_per_epoch": steps,
        "start_step": state["step"],
        "torch": torch.__version__,
    }


class _Trained(NamedTuple):
    """An epoch's training: its sums over every process, the seconds before this start and when this start began."""

    sums: Tally
    before: float
    began: float


@dataclass
class _Loop:
    """The model on its device, its optimizer and scaler, and the state a checkpoint saves, epoch by epoch."""

    mf: ModelFile
    model: RegistryModel
    net: nn.Module  # the model as the steps call it: wrapped in DDP or compiled where asked
    teacher: nn.Module | None
    opt: torch.optim.SGD
    scaler: torch.amp.GradScaler
    state: dict[str, Any]
    cfg: Config
    run: Path
    place: Place
    precision: Precision
    steps: int
    workers: int
    progress: bool

    @classmethod
    def prepare(
        cls, mf: ModelFile, teacher: nn.Module | None, state: dict[str, Any], cfg: Config, run: Path, place: Place,
        precision: Precision, compile: bool, steps: int, workers: int, progress: bool,
    ) -> _Loop:  # fmt: skip
        """The model, teacher and optimizer on the device, restored from `state` where it is a checkpoint's."""
        device = place.device
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one input shape all run: let cuDNN time its algorithms once
        model = cast(RegistryModel, mf.model.to(device))
        if cfg.sync_bn and place.world > 1:
            model = cast(RegistryModel, nn.SyncBatchNorm.convert_sync_batchnorm(model))
        if precision.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # untyped in torch
        if teacher is not None:  # frozen, in eval mode: its BatchNorm statistics are the dense parent's
            teacher = teacher.to(device).eval().requires_grad_(False)
            if precision.channels_last:
                teacher = teacher.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # untyped
        opt, scaler = _optimizer(model, cfg), _scaler(cfg, device)
        if "optimizer" in state:  # resuming: the hyperparameters are cfg's (checked equal), the momentum the file's
            opt.load_state_dict({**state.pop("optimizer"), "param_groups": opt.state_dict()["param_groups"]})
            scaler.load_state_dict(state.pop("scaler"))
            _set_rng_states(state.pop("rng"), device)
        net: nn.Module = model
        if place.world > 1:
            net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if compile:
            net = cast(nn.Module, torch.compile(net))
        return cls(mf, model, net, teacher, opt, scaler, state, cfg, run, place, precision, steps, workers, progress)

    def save(self, path: Path, training: dict[str, Any] | None) -> None:
        """Write the model (and the training state, for last.pt) with what it was trained for so far."""
        state = self.state
        trained = {"epochs": len(state["history"]), "step": state["step"], "run": self.run.name,
                   "best_top1": state["best_top1"]}  # fmt: skip
        dataclasses.replace(self.mf, model=self.model, meta={**self.mf.meta, "trained": trained}).save(path, training)

    def checkpoint(self) -> None:
        """Save last.pt: everything to go on exactly from here."""
        self.save(self.run / "last.pt", _training_state(self.state, self.cfg, self.opt, self.scaler, self.place.device))

    def stop(self, partial: Tally, epoch: int) -> NoReturn:
        """Save last.pt with the epoch's sums so far, say where, and stop (every process: KeyboardInterrupt)."""
        self.state["partial"] = partial
        if self.place.is_main:
            self.checkpoint()
            print(f"stopped: saved {self.run / 'last.pt'} at epoch {epoch}, step {self.state['step']}; continue with "
                  "--resume", file=sys.stderr)  # fmt: skip
        barrier(self.place)  # no process may exit (and have torchrun end the others) before the save
        raise KeyboardInterrupt

    def train_epoch(self, epoch: int, train: ImageSplit, stop_asked: Callable[[], bool]) -> _Trained:
        """One epoch's steps (the rest of one cut short), stopping with a checkpoint where a stop is asked."""
        cfg, place, state, steps = self.cfg, self.place, self.state, self.steps
        start = state["step"] - (epoch - 1) * steps  # > 0 when resuming an epoch cut short
        # Rank 0 carries the sums of an epoch cut short; every process adds its own, summed at the end.
        sums = StepSums.starting_at(state["partial"] if place.is_main else Tally(), place.device)
        before, began = state["partial"].seconds, time.perf_counter()
        stream = self.mf.batches(
            train, cfg.batch_size, train=True, shuffle=True, seed=cfg.seed * 1_000_000 + epoch, workers=self.workers,
            drop_last=True, start=start, rank=place.rank, world=place.world, device=place.device,
        )  # fmt: skip
        bar = tqdm(stream, desc=f"epoch {epoch}/{cfg.epochs}", total=steps, initial=start, unit="step",
                   disable=not self.progress or not place.is_main)  # fmt: skip
        self.net.train()
        watch = LossWatch(place.device)  # the first step of a non-finite loss, if any
        for done, (x, y) in enumerate(bar, 1):
            if self.precision.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            lr = lr_at(state["step"], cfg, steps)
            _step(self.net, self.teacher, self.opt, self.scaler, x, y, lr, cfg, self.precision, sums)
            state["step"] += 1
            watch.see(sums.loss, state["step"])
            if done % LOG_EVERY == 0:
                rate = done * cfg.batch_size / (time.perf_counter() - began)
                bar.set_postfix_str(f"loss {float(sums.loss / sums.images):.3f}, {rate:.0f} img/s")
                if place.world == 1:
                    watch.check(epoch, steps)
            if on_any(stop_asked(), place):
                partial = sums.reduced(place, before + time.perf_counter() - began)
                watch.check(epoch, steps, partial.loss)  # no checkpoint of non-finite weights
                self.stop(partial, epoch)
        bar.close()
        epoch_sums = sums.reduced(place, before + time.perf_counter() - began)
        watch.check(epoch, steps, epoch_sums.loss)
        return _Trained(epoch_sums, before, began)

    def end_epoch(self, epoch: int, trained: _Trained, test: ImageSplit | None, stop_asked: Callable[[], bool]) -> None:
        """Evaluate, add the epoch to the history, and save last.pt, best.pt where it is the best, metrics.jsonl."""
        cfg, state, sums = self.cfg, self.state, trained.sums
        try:
            top1, top5 = _evaluate(self.model, test, self.mf, cfg.batch_size, self.workers, self.place,
                                   self.precision, self.progress, stop_asked)  # fmt: skip
        except Stopped:  # asked during the evaluation: saved as at the epoch's last step, evaluated on resume
            self.stop(sums, epoch)
        state["history"].append({
            "epoch": epoch,
            "lr": lr_at(epoch * self.steps - 1, cfg, self.steps),
            "train_loss": sums.loss / sums.images,
            "train_top1": 100 * sums.hits / sums.images,
            "test_top1": top1,
            "test_top5": top5,
            "images_per_s": sums.images / sums.seconds,
            "seconds": trained.before + time.perf_counter() - trained.began,
        })  # fmt: skip
        best = top1 is not None and (state["best_top1"] is None or top1 > state["best_top1"])
        if best:
            state["best_top1"] = top1
        state["partial"] = Tally()
        if self.place.is_main:
            self.checkpoint()
            if best:
                self.save(self.run / "best.pt", None)
            lines = "".join(json.dumps(h) + "\n" for h in state["history"])
            atomic_write(self.run / "metrics.jsonl", lines.encode())


def _remove_stale_temps(run: Path) -> None:
    """Delete the half-written temp files that a process killed while writing a run file left behind."""
    for name in RUN_FILES:
        for tmp in stale_temps(run / name):
            tmp.unlink(missing_ok=True)


def _to(split: ImageSplit, device: torch.device) -> ImageSplit:
    """An in-memory split with its images and labels on `device`; a lazy one as it is, for its loader processes."""
    if split.images is None:
        return split
    return replace(split, images=split.images.to(device), labels=split.labels.to(device))


def distillation_loss(logits: Tensor, teacher_logits: Tensor | None, labels: Tensor, cfg: Config) -> Tensor:
    """Cross-entropy; with teacher logits, A*T^2*KL(teacher || student, both at temperature T) + (1 - A)*cross-entropy
    (Hinton et al. 2015: T^2 keeps the soft term's gradients on the scale of the hard one's)."""
    hard = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
    if teacher_logits is None:
        return hard
    t = cfg.kd_temperature
    student, target = (F.log_softmax(z.float() / t, dim=1) for z in (logits, teacher_logits))
    soft = F.kl_div(student, target, log_target=True, reduction="batchmean")
    return cfg.kd_weight * t * t * soft + (1 - cfg.kd_weight) * hard


def _step(
    net: nn.Module,
    teacher: nn.Module | None,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x: Tensor,
    y: Tensor,
    lr: float,
    cfg: Config,
    precision: Precision,
    sums: StepSums,
) -> None:
    """One optimizer step on a batch, its micro-batches' gradients added; adds the loss and hits to `sums`."""
    for group in opt.param_groups:
        group["lr"] = lr
    for xm, ym in zip(x.chunk(cfg.accum), y.chunk(cfg.accum), strict=True):
        with precision.autocast(x.device):
            logits = net(xm)
            with torch.no_grad():
                target = None if teacher is None else teacher(xm)
            loss = distillation_loss(logits, target, ym, cfg)
        scaler.scale(loss / cfg.accum).backward()
        sums.add(loss, logits, ym)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def _evaluate(
    model: nn.Module,
    test: ImageSplit | None,
    mf: ModelFile,
    batch_size: int,
    workers: int,
    place: Place,
    precision: Precision,
    progress: bool,
    stop_asked: Callable[[], bool] | None = None,
) -> tuple[float | None, float | None]:
    """Test top-1 and top-5 over all the processes' shares of the split; None without a split. In one process, a stop
    asked meanwhile ends it at once (Stopped); under torchrun the processes stop at their next step together."""
    if test is None:
        return None, None
    broadcast_buffers(model, place)  # DDP left each process with BatchNorm statistics of its own share
    stream = mf.batches(test, batch_size, workers=workers, rank=place.rank, world=place.world, device=place.device)
    if stop_asked is not None and place.world == 1:
        stream = until(stop_asked, stream)
    r = evaluate(model, stream, device=place.device, precision=precision, progress=progress and place.is_main)
    counts = torch.tensor(
        [r["top1"] * r["images"] / 100, r["top5"] * r["images"] / 100, r["images"]],
        dtype=torch.float64,
        device=place.device,
    )
    all_reduce(counts, place)
    top1, top5, images = counts.round().tolist()
    return 100 * top1 / images, 100 * top5 / images


def _resume(
    last: Path, cfg: Config, ident: Identity, steps: int, device: torch.device
) -> tuple[ModelFile, dict[str, Any]]:
    """The model and training state of a run's last checkpoint, which must be of this run (made with `cfg`, of
    identity `ident`, `steps` per epoch) and whole: every field of its training state is checked before the loop
    relies on it, each refused in the same one line."""
    mf, state = load_checkpoint(last)
    if state is None:
        raise TrainError(f"{last} is a model file without training state: nothing to resume")
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise _damaged(last, "config")
    diff = [f"{k} {saved.get(k)} (now {v})" for k, v in asdict(cfg).items() if saved.get(k) != v]
    if diff:
        raise TrainError(f"--resume: the run in {last.parent} was made with {', '.join(diff)}: give the same options")
    if not isinstance(state.get("identity"), dict | None):  # (a checkpoint of an older version has none)
        raise _damaged(last, "identity")
    check_identity(state.get("identity"), ident, last)
    history = cast(list[Any], state.get("history"))  # read by the step's check, after its own
    checks: dict[str, Callable[[Any], bool]] = {  # in order: the step against a valid history, the sums its step
        "history": lambda v: _valid_history(v, cfg.epochs),
        "step": lambda v: type(v) is int and len(history) * steps <= v <= min(len(history) + 1, cfg.epochs) * steps,
        "best_top1": lambda v: v is None or (_finite(v) and 0 <= v <= 100),
        "partial": lambda v: _valid_partial(v, (state["step"] - len(history) * steps) * cfg.batch_size),
        "optimizer": lambda v: _valid_optimizer(v, _optimizer(mf.model, cfg)),
        "scaler": lambda v: _valid_scaler(v, _scaler(cfg, device)),
        "rng": lambda v: _valid_rng(v, device),
    }
    damaged = next((name for name, valid in checks.items() if not valid(state.get(name))), None)
    if damaged is not None:
        raise _damaged(last, damaged)
    partial = state["partial"]  # checkpoints before the named record held a list [loss, hits, images, seconds]
    state["partial"] = Tally(*partial) if isinstance(partial, list) else Tally(**partial)
    state["identity"] = ident._asdict()
    return mf, state


def _damaged(last: Path, field: str) -> TrainError:
    """The refusal of a checkpoint whose training state has a damaged or missing field."""
    return TrainError(f"{last}: damaged checkpoint: its training state has no valid {field!r}")


def _finite(x: object) -> bool:
    """Whether x is a finite int or float (not a bool)."""
    try:
        return type(x) in (int, float) and math.isfinite(cast(float, x))
    except OverflowError:  # an int beyond float64
        return False


def _valid_history(history: object, epochs: int) -> bool:
    """Whether `history` is the metrics of epochs 1, 2, … (at most `epochs`), each with the numbers a run reads."""
    return (
        isinstance(history, list)
        and len(history) <= epochs
        and all(
            isinstance(h, dict)
            and h.get("epoch") == i
            and all(k in h for k in HISTORY_NEEDS)
            and all(_finite(v) or (v is None and k.startswith("test_")) for k, v in h.items())
            for i, h in enumerate(history, 1)
        )
    )


def _valid_partial(partial: object, images: int) -> bool:
    """Whether `partial` is the sums of an epoch's first `images` images (a Tally as a dict, or an older checkpoint's
    list): finite, >= 0, as many images as its steps took, no more top-1 hits than images."""
    fields = [f.name for f in dataclasses.fields(Tally)]
    if isinstance(partial, dict) and set(partial) == set(fields):
        sums = dict(partial)
    elif isinstance(partial, list) and len(partial) == len(fields):
        sums = dict(zip(fields, partial, strict=True))
    else:
        return False
    return all(_finite(v) and v >= 0 for v in sums.values()) and sums["images"] == images >= sums["hits"]


def _valid_optimizer(saved: object, fresh: torch.optim.Optimizer) -> bool:
    """Whether `saved` is an optimizer state of `fresh`'s parameters: its groups name them as `fresh`'s do, and its
    momentum buffers are finite tensors of their shapes and dtypes."""
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        return False
    groups = saved.get("param_groups")
    named = [g.get("params") if isinstance(g, dict) else None for g in groups] if isinstance(groups, list) else None
    if named != [g["params"] for g in fresh.state_dict()["param_groups"]]:
        return False
    params = [p for g in fresh.param_groups for p in g["params"]]
    return all(
        type(i) is int
        and 0 <= i < len(params)
        and isinstance(s, dict)
        and set(s) == {"momentum_buffer"}
        and _valid_buffer(s["momentum_buffer"], params[i])
        for i, s in saved["state"].items()
    )


def _valid_buffer(buffer: object, param: Tensor) -> bool:
    """Whether `buffer` can be the momentum of `param`: none yet, or a finite dense tensor of its shape and dtype."""
    if buffer is None:
        return True
    return (
        isinstance(buffer, Tensor)
        and buffer.layout == torch.strided
        and (buffer.shape, buffer.dtype) == (param.shape, param.dtype)
        and bool(torch.isfinite(buffer).all())
    )


def _valid_scaler(saved: object, fresh: torch.amp.GradScaler) -> bool:
    """Whether `saved` is a state of `fresh` (empty where it is disabled): its constants, a finite positive scale."""
    ours = fresh.state_dict()
    if not isinstance(saved, dict) or set(saved) != set(ours):
        return False
    constants = ("growth_factor", "backoff_factor", "growth_interval")
    return not ours or (
        all(saved[k] == ours[k] for k in constants)
        and _finite(saved["scale"])
        and saved["scale"] > 0
        and type(saved["_growth_tracker"]) is int
        and 0 <= saved["_growth_tracker"] < ours["growth_interval"]
    )


def _valid_rng(rng: object, device: torch.device) -> bool:
    """Whether `rng` holds the CPU generator's state (and, optionally, a CUDA one's), each one that the generator of
    this run's device takes."""
    if not isinstance(rng, dict) or "cpu" not in rng or not set(rng) <= {"cpu", "cuda"}:
        return False
    used = {"cpu": torch.device("cpu"), **({"cuda": device} if device.type == "cuda" else {})}
    try:
        for name, where in used.items():
            if name in rng:
                torch.Generator(where).set_state(rng[name])  # a throwaway generator: refuses a damaged state
    except (RuntimeError, TypeError):
        return False
    return all(isinstance(t, Tensor) and t.dtype == torch.uint8 for t in rng.values())


def _optimizer(model: nn.Module, cfg: Config) -> torch.optim.SGD:
    """The run's optimizer of `model`'s parameters."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _scaler(cfg: Config, device: torch.device) -> torch.amp.GradScaler:
    """The run's loss scaler: enabled for fp16 autocast alone."""
    return torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")


def _training_state(
    state: dict[str, Any], cfg: Config, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, device: torch.device
) -> dict[str, Any]:
    """All a checkpoint needs to go on exactly: tensors, numbers, strings, lists and dicts only."""
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return {
        **state,
        "partial": asdict(state["partial"]),
        "config": asdict(cfg),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng,
    }


def _set_rng_states(rng: dict[str, Tensor], device: torch.device) -> None:
    """Restore the global random generators saved by _training_state."""
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


@contextmanager
def _stop_requests() -> Iterator[Callable[[], bool]]:
    """Within, SIGTERM and SIGINT ask the loop to stop after its current step; yields whether one has."""
    asked = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: asked.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield asked.is_set
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss, top-1 and learning rate per epoch, as a PNG."""
    from matplotlib.figure import Figure  # here: a second of start-up only the end of a run needs
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    loss, top1, lr = fig.subplots(1, 3)
    loss.plot(epochs, [h["train_loss"] for h in history], marker=".")
    loss.set(title="train loss", xlabel="epoch")
    top1.plot(epochs, [h["train_top1"] for h in history], marker=".", label="train (augmented)")
    if any(h["test_top1"] is not None for h in history):
        top1.plot(epochs, [h["test_top1"] for h in history], marker=".", label="test")
    top1.set(title="top-1 (%)", xlabel="epoch")
    top1.legend()
    lr.plot(epochs, [h["lr"] for h in history], marker=".")
    lr.set(title="learning rate (end of epoch)", xlabel="epoch")
    for ax in (loss, top1, lr):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write(path, buffer.getvalue())
