"""The library: what every `chip` command does, as functions of model files (docs/api.md).

    mf = load_model("r56.pt")
    scores = score(mf, my_loader)                       # any iterable of input batches or (inputs, targets) pairs
    pruned = prune(mf, Flops(0.5), scores=scores)       # or Sparsity("paper-1"), Ratio(0.3), Latency(0.5)
    pruned.model_file.save("r56-half.pt")

Calibration is chipprune's own data (a path as `--data` takes: its train split, seeded batches) or the caller's
iterable. Errors are typed: ModelFileError, DataError, BudgetError, ScoresError, … (all ValueErrors but
CalibrationError and ExportError, RuntimeErrors)."""

from __future__ import annotations

import dataclasses
import itertools
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .calibrate import recalibrate_bn as reestimate_bn
from .calibrate import score_layers
from .criteria import ActivationCriterion, get_criterion
from .data import ImageSplit, load_split
from .deploy.export import export as export_checked
from .deploy.quantize import INT8, Int8Options, Int8Report, quantize
from .files.fileio import sha256
from .files.modelfile import ModelFile, ModelFileError, import_weights, library_model, load_model, parse_normalization
from .files.scores import Of, read_scores, write_scores
from .models import RegistryModel, create_model, external, get_arch, rewidth
from .profile import count_flops, count_params
from .pruning import budgets, sparsity
from .pruning.budgets import API, Budget, BudgetError, Flops, Latency, Ratio, Sparsity, Spelling
from .pruning.graph import group_importance, prune_model, prune_to_latency
from .pruning.latency import Runner
from .pruning.registry import prune as prune_registry
from .pruning.sensitivity import SENSITIVITY_IMAGES, Sample, prune_by_sensitivity, sensitivity_curves, split_sample
from .training.distributed import distributed, launched
from .training.evaluate import evaluate as evaluate_batches
from .training.loop import KD_WEIGHT, PRESETS, Config, TrainError, fit, load_data, load_teacher
from .training.precision import Precision, choose
from .training.runs import check_run_folder


@dataclass(frozen=True)
class Calibration:
    """Where calibration images come from: chipprune's data (`source` a path as `--data` takes; its train split,
    `batches` seeded batches of `batch_size`) or the caller's iterable of input batches or (inputs, targets) pairs
    (then the other fields are not used)."""

    source: str | os.PathLike[str] | Iterable[Any]
    batches: int = 5
    batch_size: int = 128
    workers: int = 0
    ignore_class_names: bool = False

    def pairs(self, mf: ModelFile, seed: int, count: int | None = None, skip: int = 0) -> Iterator[tuple[Tensor, Any]]:
        """(inputs, targets) batches: chipprune's data shuffled by `seed`, `count` batches (default: `batches`) after
        the first `skip`; or the caller's, inputs alone paired with None."""
        count = self.batches if count is None else count
        if not isinstance(self.source, str | os.PathLike):
            return (_pair(b) for b in itertools.islice(self.source, skip, skip + count))
        train = load_split(self.source, "train")
        mf.check_classes(train.classes, ignore_names=self.ignore_class_names)
        wanted = (skip + count) * self.batch_size
        if skip == 0 and count == self.batches and len(train) < wanted:
            warnings.warn(
                f"asked for {wanted} calibration images, the train split has {len(train)}: using them all",
                stacklevel=3,
            )
        return mf.batches(train, self.batch_size, shuffle=True, seed=seed, limit=wanted, start=skip,
                          workers=self.workers)  # fmt: skip


def _pair(batch: Any) -> tuple[Tensor, Any]:
    """A batch of the caller's as (inputs, targets or None)."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], Tensor):
        return batch[0], batch[1] if len(batch) > 1 else None
    raise BudgetError(f"a calibration batch is a tensor or an (inputs, targets) pair, got a {type(batch).__name__}")


def _calibration(given: Calibration | str | os.PathLike[str] | Iterable[Any] | None) -> Calibration | None:
    return given if isinstance(given, Calibration) or given is None else Calibration(given)


class Scores(NamedTuple):
    """Per-channel scores of every prunable conv of a registry model (of "convs", for a Sparsity budget) or of every
    dependency group (of "groups", for the others), and how they were made."""

    values: dict[str, Tensor]
    of: Of
    provenance: dict[str, Any]  # criterion, images, seed (and processes, for convs)
    is_main: bool = True  # under torchrun: whether this process writes the results

    def save(self, path: str | os.PathLike[str], arch: str) -> None:
        """Write them as a scores file (JSON) of `arch`."""
        write_scores(path, arch, self.provenance, self.values, of=self.of)


def load_scores(path: str | os.PathLike[str], mf: ModelFile, of: Of = "convs") -> Scores:
    """The scores in a file written by Scores.save (or `chip score`), checked against `mf`."""
    widths = mf.registry_model.widths if of == "convs" else None
    values, provenance = read_scores(path, mf.arch, widths, of=of)
    return Scores(values, of, provenance)


def score(
    mf: ModelFile,
    calibration: Calibration | str | os.PathLike[str] | Iterable[Any] | None = None,
    *,
    criterion: str = "chip",
    of: Of | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    spelling: Spelling = API,
) -> Scores:
    """Score every prunable channel: per registry conv, or per dependency group (the default for library models).
    `seed` picks the calibration images of chipprune's data and seeds the random criterion."""
    chosen = get_criterion(criterion, seed)
    source = _calibration(calibration)
    if isinstance(chosen, ActivationCriterion) and source is None:
        raise BudgetError(f"{spelling.data} is needed to score with {chosen.name}")
    if (of or ("groups" if mf.source else "convs")) == "groups":
        return _group_scores(mf, chosen, source, seed, device)
    with distributed(device) as place:
        pairs = source.pairs(mf, seed) if isinstance(chosen, ActivationCriterion) and source else iter(())
        layers = mf.registry_model.channel_layers()
        shown = progress and place.is_main
        values, images = score_layers(mf.model, layers, chosen, pairs, device=place.device, progress=shown)
    provenance = {"criterion": chosen.name, "images": images, "seed": seed, "processes": place.world}
    return Scores(values, "convs", provenance, place.is_main)


def _group_scores(mf: ModelFile, criterion: Any, source: Calibration | None, seed: int, device: str) -> Scores:
    """The importance of every dependency group's channels on the calibration batches."""
    pairs = source.pairs(mf, seed) if isinstance(criterion, ActivationCriterion) and source else iter(())
    images = 0

    def inputs() -> Iterator[Tensor]:
        nonlocal images
        for x, _ in pairs:
            images += len(x)
            yield x

    model = mf.model.to(device)
    values = group_importance(model, _example(mf, device), inputs(), criterion=criterion, ignored_layers=_heads(model))
    return Scores(values, "groups", {"criterion": criterion.name, "images": images, "seed": seed})


class Sizes(NamedTuple):
    """Parameters and FLOPs (multiply-accumulates of conv and linear layers, one image) of a model and its
    unpruned architecture."""

    params: int
    macs: int
    base_params: int
    base_macs: int

    @classmethod
    def of(cls, model: nn.Module, base: nn.Module, input_size: int) -> Sizes:
        """Count both models."""
        macs = count_flops(model, input_size), count_flops(base, input_size)
        return cls(count_params(model), macs[0], count_params(base), macs[1])

    def fields(self) -> dict[str, Any]:
        """As `--json` prints them."""
        return {"params": self.params, "flops": self.macs, "base_params": self.base_params,
                "base_flops": self.base_macs, "params_reduction": 1 - self.params / self.base_params,
                "flops_reduction": 1 - self.macs / self.base_macs}  # fmt: skip


class PruneReport(NamedTuple):
    """What was asked, how the channels were scored, and what was reached."""

    asked: dict[str, Any]  # the budget, as `--json` prints it
    provenance: dict[str, Any]  # the scores', the BatchNorm re-estimation's and the latency search's record
    sizes: Sizes
    rounded: list[dict[str, int]] | None  # a Sparsity's kept counts changed by round_to


class Pruned(NamedTuple):
    """The pruned model file (its meta records how), and the report."""

    model_file: ModelFile
    report: PruneReport
    is_main: bool = True  # under torchrun: whether this process writes the model


def prune(
    mf: ModelFile,
    budget: Budget,
    *,
    scores: Scores | str | os.PathLike[str] | None = None,
    calibration: Calibration | str | os.PathLike[str] | Iterable[Any] | None = None,
    criterion: str = "chip",
    residual: str = "coupled",
    recalibrate_bn: int = 0,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    spelling: Spelling = API,
) -> Pruned:
    """A smaller dense model within `budget`, its channels chosen by `scores` (or a scores file; else scored on
    `calibration` by `criterion`); BatchNorm re-estimated on `recalibrate_bn` batches of other images where asked."""
    source = _calibration(calibration)
    processes = int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1
    budgets.check(budget, library=mf.source is not None, residual=residual, calibration=source is not None,
                  recalibrate_bn=recalibrate_bn, processes=processes, spelling=spelling)  # fmt: skip
    if isinstance(budget, Sparsity):
        sparsity.widths(mf.arch, budget.spec, budget.round_to)  # a wrong spec is refused before the scoring pass
    of: Of = "convs" if isinstance(budget, Sparsity) else "groups"
    if isinstance(scores, str | os.PathLike):
        scores = load_scores(scores, mf, of)
    if scores is None:
        scores = score(mf, source, criterion=criterion, of=of, seed=seed, device=device, progress=progress,
                       spelling=spelling)  # fmt: skip
    elif scores.of != of:
        raise BudgetError(f"{spelling.scores}: scores of {scores.of}, where {spelling.kinds[type(budget)]} needs {of}")
    if not scores.is_main:
        return Pruned(mf, PruneReport({}, {}, Sizes(0, 0, 0, 0), None), is_main=False)
    model, asked, provenance = _pruned(mf, budget, scores, source, residual, seed, device, progress, spelling)
    if recalibrate_bn:
        assert source is not None  # budgets.check
        # Other images than the calibration's (seed + 1), without augmentation: the statistics of test-like inputs.
        batches = source.pairs(mf, seed + 1, count=recalibrate_bn)
        provenance["recalibrated_bn_images"] = reestimate_bn(model, batches, device=device, progress=progress)
        model.cpu()
    meta = {**mf.meta, "pruned": {**asked, **provenance, **_parent(mf)}}
    pruned = dataclasses.replace(mf, model=model, meta=meta, path=None)
    rounded = _rounded(mf.arch, budget) if isinstance(budget, Sparsity) else None
    sizes = Sizes.of(model, mf.unpruned(), mf.input_size)
    return Pruned(pruned, PruneReport(asked, provenance, sizes, rounded))


def _pruned(
    mf: ModelFile, budget: Budget, scores: Scores, source: Calibration | None, residual: str, seed: int,
    device: str, progress: bool, spelling: Spelling,
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The model pruned within the budget, the budget as asked, and the record of how."""
    provenance = dict(scores.provenance)
    if isinstance(budget, Sparsity):
        widths = sparsity.widths(mf.arch, budget.spec, budget.round_to)
        model = _refused(lambda: prune_registry(mf.registry_model, scores.values, widths, residual), spelling)
        asked = {"sparsity": sparsity.format_rates(sparsity.resolve(mf.arch, budget.spec)), "residual": residual,
                 "round_to": budget.round_to}  # fmt: skip
        return model, asked, provenance
    base = mf.model.to(device)
    sample = None
    if isinstance(budget, Flops | Latency) and budget.allocate == "sensitivity":
        assert source is not None  # budgets.check
        sample = _sensitivity_sample(mf, source, seed, spelling)
    if isinstance(budget, Latency):
        model, provenance["latency"] = _latency_pruned(mf, base, budget, scores, sample, device, progress, spelling)
        target = {"latency_target": budget.fraction, "runtime": budget.runtime, "allocate": budget.allocate}
        return _with_widths(model.cpu(), mf), target, provenance
    if sample is not None:
        assert isinstance(budget, Flops)
        model = _sensitivity_pruned(mf, base, budget, scores, sample, device, progress)
    else:
        model = _refused(lambda: prune_model(
            base, _example(mf, device), (), flops_target=budget.fraction if isinstance(budget, Flops) else None,
            pruning_ratio=budget.ratio if isinstance(budget, Ratio) else None,
            scope="global" if budget.allocate == "global" else "local", ignored_layers=_heads(base),
            round_to=budget.round_to, importance=scores.values), spelling)  # fmt: skip
    target = {"ratio": budget.ratio} if isinstance(budget, Ratio) else {"flops_target": budget.fraction}
    scope = {"scope": "global" if budget.allocate == "global" else "local"}
    allocate = {"allocate": budget.allocate} if budget.allocate == "sensitivity" else {}
    return _with_widths(model.cpu(), mf), {**target, **scope, **allocate, "round_to": budget.round_to}, provenance


def _latency_pruned(
    mf: ModelFile, base: nn.Module, budget: Latency, scores: Scores, sample: Sample | None, device: str,
    progress: bool, spelling: Spelling,
) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """The model pruned to a measured latency (its widths by the sensitivity curves measured on `sample`, where one
    is given), and the record of the search."""
    runner = Runner(budget.runtime, budget.batch_size, budget.threads, device, budget.repeats)
    curves = None
    if sample is not None:
        measured = sensitivity_curves(
            base, _example(mf, device), scores.values, sample, criterion=str(scores.provenance["criterion"]),
            ignored_layers=_heads(base), model_id=_model_id(mf), progress=progress,
        )  # fmt: skip
        curves = {c.root: c.curve(measured.dense) for c in measured.groups}
    model, report = _refused(lambda: prune_to_latency(
        base, _example(mf, device), (), budget.fraction, runner, ignored_layers=_heads(base),
        importance=scores.values, curves=curves, progress=progress), spelling)  # fmt: skip
    return model, {
        "dense_ms": report.dense.median_ms,
        "dense_spread_ms": [report.dense.min_ms, report.dense.max_ms],
        "pruned_ms": report.pruned.median_ms,
        "pruned_spread_ms": [report.pruned.min_ms, report.pruned.max_ms],
        "predicted_ms": report.predicted_ms,
        "target_ms": report.target_ms,
        "rounds": report.rounds,
        "layers_measured": report.measured_layers,
        "runtime": runner.runtime,
        "threads": runner.threads or torch.get_num_threads(),
        "batch_size": runner.batch_size,
    }


def _sensitivity_sample(mf: ModelFile, source: Calibration, seed: int, spelling: Spelling) -> Sample:
    """The images the sensitivity curves are measured on: the calibration images right after the scored ones
    (results/sensitivity: 256 to re-estimate BatchNorm, 1,024 to measure the loss), or a fifth and four fifths of
    fewer where the data holds fewer (with a warning)."""
    per_batch = source.batch_size if isinstance(source.source, str | os.PathLike) else 1
    batches = list(source.pairs(mf, seed, count=-(-SENSITIVITY_IMAGES // per_batch), skip=source.batches))
    if any(y is None for _, y in batches):
        raise BudgetError(f"allocating by sensitivity needs labels: {spelling.data} batches as (inputs, targets)")
    images = sum(len(x) for x, _ in batches)
    if images < 2:
        raise BudgetError(
            f"allocating by sensitivity needs calibration images after the scored ones ({SENSITIVITY_IMAGES} by "
            f"default), and {spelling.data} holds {images} more"
        )
    if images >= SENSITIVITY_IMAGES:
        return split_sample(batches)
    warnings.warn(
        f"measuring the sensitivity curves on the {images} calibration images after the scored ones, not "
        f"{SENSITIVITY_IMAGES}: the curves are noisier",
        stacklevel=2,
    )
    recalibration = max(1, images // 5)
    return split_sample(batches, recalibration, images - recalibration)


def _sensitivity_pruned(
    mf: ModelFile, base: nn.Module, budget: Flops, scores: Scores, sample: Sample, device: str, progress: bool
) -> nn.Module:
    """The model pruned to a FLOPs budget with each group's width chosen by its sensitivity measured on `sample`."""
    result = prune_by_sensitivity(
        base, _example(mf, device), scores.values, sample, budget.fraction, round_to=budget.round_to,
        criterion=str(scores.provenance["criterion"]), ignored_layers=_heads(base), model_id=_model_id(mf),
        progress=progress,
    )  # fmt: skip
    return result.model


def _model_id(mf: ModelFile) -> str | None:
    """What names the model in the sensitivity cache: its file's SHA-256, where it has a file."""
    return sha256(mf.path) if mf.path is not None else None


def _refused(make: Any, spelling: Spelling) -> Any:
    """`make()`, its ValueError a BudgetError (one of the scores' importances: scores of another model)."""
    try:
        return make()
    except BudgetError:
        raise
    except ValueError as e:
        foreign = "importance:" in str(e)  # an importance that fits no group of this model
        raise BudgetError(f"{spelling.scores}: scores of another model" if foreign else str(e)) from None


def _parent(mf: ModelFile) -> dict[str, Any]:
    """Where a pruned model came from, where its file is known (a teacher of `--teacher parent`)."""
    if mf.path is None:
        return {}
    return {"parent": mf.path.name, "parent_path": str(mf.path.resolve()), "parent_sha256": sha256(mf.path)}


def _rounded(arch: str, budget: Sparsity) -> list[dict[str, int]] | None:
    return [r._asdict() for r in sparsity.rounding(arch, budget.spec, budget.round_to)] if budget.round_to else None


def _example(mf: ModelFile, device: str) -> Tensor:
    return torch.zeros(1, 3, mf.input_size, mf.input_size, device=device)


def _heads(model: nn.Module) -> list[nn.Module]:
    """The layers that keep their widths beside the output layers: a registry model's Linear heads."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)] if isinstance(model, RegistryModel) else []


def _with_widths(model: nn.Module, mf: ModelFile) -> nn.Module:
    """A graph-pruned model, a registry one with its widths read back from its convs."""
    if not isinstance(model, RegistryModel):
        return model
    try:
        return rewidth(model, mf.arch, len(mf.classes))
    except ValueError as e:
        raise BudgetError(str(e)) from None


class Metrics(NamedTuple):
    """Top-1 and top-5 accuracy (percent) on a split, over how many images, in what precision."""

    top1: float
    top5: float
    images: int
    precision: Precision  # the autocast and memory format it ran in, and why
    sample_of: int | None  # the split's size, where a seeded sample of it was evaluated


def evaluate(
    mf: ModelFile,
    data: str | os.PathLike[str] | Iterable[tuple[Tensor, Tensor]],
    *,
    split: str = "test",
    batch_size: int = 256,
    limit: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    amp: str = "auto",
    channels_last: bool | None = None,
    workers: int = 0,
    ignore_class_names: bool = False,
    progress: bool = False,
) -> Metrics:
    """Top-1/top-5 of the model on a split of chipprune's data (`limit`: a seeded random sample of that many) or
    on the caller's (inputs, targets) batches."""
    precision = choose(amp, channels_last, torch.device(device))
    sample_of = None
    if isinstance(data, str | os.PathLike):
        images = load_split(data, split)
        mf.check_classes(images.classes, ignore_names=ignore_class_names)
        sampled = limit is not None and limit < len(images)  # a seeded random sample, not the first classes
        sample_of = len(images) if sampled else None
        data = mf.batches(images, batch_size, limit=limit, shuffle=sampled, seed=seed, workers=workers)
    result = evaluate_batches(mf.model, data, device=device, precision=precision, progress=progress)
    return Metrics(result["top1"], result["top5"], int(result["images"]), precision, sample_of)


class Profile(NamedTuple):
    """A model's size against its unpruned architecture, and its measured latency per batch size (ms)."""

    arch: str
    sizes: Sizes
    latency_ms: dict[int, dict[str, float]] | None
    threads: int | None


def architecture(
    arch: str,
    *,
    sparsity_spec: str | None = None,
    round_to: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    input_size: int | None = None,
    spelling: Spelling = API,
) -> ModelFile:
    """A model file of an architecture with random weights: a registry one at full width or at the paper's rates
    (`sparsity_spec`, kept counts at multiples of `round_to`), or a library model."""
    if external.is_external(arch):
        if sparsity_spec:  # refused: a library model has no paper rates
            budgets.check(Sparsity(sparsity_spec), library=True, residual="coupled", calibration=False,
                          recalibrate_bn=0, spelling=spelling)  # fmt: skip
        return library_model(arch, model_kwargs, input_size=input_size)
    widths = sparsity.widths(arch, sparsity_spec, round_to) if sparsity_spec else None
    classes = [f"class_{i}" for i in range(get_arch(arch).num_classes)]
    return ModelFile(arch, create_model(arch, widths), (0.0,) * 3, (1.0,) * 3, classes)


def profile(
    mf: ModelFile, *, batch_sizes: Iterable[int] = (), threads: int | None = None, device: str = "cpu",
    repeats: int = 30,
) -> Profile:  # fmt: skip
    """Parameters and FLOPs of the model against its unpruned architecture; with `batch_sizes`, its eval-mode
    latency at each, measured with `threads` CPU threads."""
    sizes = Sizes.of(mf.model, mf.unpruned(), mf.input_size)
    size = mf.input_size
    latency = {b: Runner("eager", b, threads, device, repeats).time(mf.model, (3, size, size))._asdict()
               for b in batch_sizes}  # fmt: skip
    return Profile(mf.arch, sizes, latency or None, (threads or torch.get_num_threads()) if latency else None)


def import_model(
    arch: str,
    weights: str | os.PathLike[str] | None = None,
    *,
    pretrained: bool = False,
    normalize: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    input_size: int | None = None,
) -> ModelFile:
    """A model file from third-party weights (a registry architecture), or a library model (`timm:NAME`,
    `torchvision:NAME`) with random, local or its library's (`pretrained`: downloaded) weights."""
    if external.is_external(arch):
        return library_model(arch, model_kwargs, weights=weights, pretrained=pretrained, input_size=input_size,
                             normalize=normalize)  # fmt: skip
    if weights is None:
        raise ModelFileError(f"--weights is needed for {arch}, a registry architecture")
    if pretrained:
        raise ModelFileError("--pretrained applies to library models (torchvision:NAME, timm:NAME)")
    return import_weights(arch, weights, normalize or "imagenet")


def export(
    mf: ModelFile, out: str | os.PathLike[str], fmt: str, *, batch_size: int = 1, dynamic_batch: bool = False,
    opset: int = 17,
) -> float:  # fmt: skip
    """Write the model as ONNX or TorchScript, checked against PyTorch first; the largest relative error."""
    return export_checked(mf, out, fmt, batch_size=batch_size, dynamic_batch=dynamic_batch, opset=opset)


def export_int8(
    mf: ModelFile, out: str | os.PathLike[str], data: str | os.PathLike[str], options: Int8Options = INT8,
    *, batch_size: int = 64, opset: int = 17,
) -> Int8Report:  # fmt: skip
    """Write the model as int8 ONNX (onnxruntime's static quantization), calibrated on a seeded sample of the train
    split of `data` and kept only if its top-1 on a seeded sample of the test split is within `options.tolerance`
    points of the float model's."""
    train_split, test = load_split(data, "train"), load_split(data, "test")
    for split in (train_split, test):
        mf.check_classes(split.classes, ignore_names=options.ignore_class_names)
    calibration = (x for x, _ in _unit_images(mf, train_split, options.calibration_images, options.seed, batch_size))
    check = _unit_images(mf, test, options.check_images, options.seed, batch_size)
    return quantize(mf, out, calibration, check, method=options.method, tolerance=options.tolerance, opset=opset)


def _unit_images(
    mf: ModelFile, split: ImageSplit, count: int, seed: int, batch_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """A seeded random sample of `count` images of the split, in [0, 1] as an exported model takes them."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (mf.mean, mf.std))
    for x, y in mf.batches(split, batch_size, limit=count, shuffle=True, seed=seed):
        yield x * std + mean, y


class Run(NamedTuple):
    """A training run's folder and its metrics per epoch (the main process's; under torchrun the others get none)."""

    out_dir: Path
    history: list[dict[str, Any]]
    is_main: bool = True

    @property
    def last(self) -> Path:
        """The model file and training state after the last epoch (what --resume continues)."""
        return self.out_dir / "last.pt"

    @property
    def best(self) -> Path:
        """The model file of the epoch of best test top-1."""
        return self.out_dir / "best.pt"

    @property
    def top1(self) -> float | None:
        """Test top-1 after the last epoch; None without an evaluation split."""
        return self.history[-1]["test_top1"] if self.history else None


@dataclass(frozen=True)
class Execution:
    """How a run executes: its weights do not depend on these, its speed does."""

    device: str = "cpu"
    amp: str = "auto"  # auto: bf16 where the device computes it natively, else float32; or bf16, fp16, off
    channels_last: bool | None = None  # None: where the precision profits from it
    compile: bool = False
    workers: int = 0
    progress: bool = True


def finetune(
    model: ModelFile | str | os.PathLike[str],
    data: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: Config | None = None,
    *,
    teacher: str | os.PathLike[str] | None = None,
    preset: str | None = None,
    val_data: str | os.PathLike[str] | None = None,
    ignore_class_names: bool = False,
    resume: bool = False,
    execution: Execution = Execution(),
) -> Run:
    """Fine-tune `model` (a model file, or its path) on the train split of `data` into the run folder `out_dir` with
    `config` (default: the model's fine-tuning preset), distilled from `teacher` (a model file, or "parent": the file
    it was pruned from) where given, with config.kd_weight and config.kd_temperature."""
    mf = model if isinstance(model, ModelFile) else load_model(model)
    chosen = None if teacher is None else load_teacher(os.fspath(teacher), mf)
    check_run_folder(out_dir, [mf.path, None if chosen is None else chosen.path, data, val_data])
    preset = preset or (None if config else mf.finetune_preset)
    config = config or PRESETS[mf.finetune_preset]
    provenance: dict[str, Any] = {"command": "finetune", "model": None if mf.path is None else str(mf.path)}
    if chosen is not None:
        if config.kd_weight <= 0:
            raise TrainError(f"a teacher needs a distillation weight above 0 (config.kd_weight; chip's: {KD_WEIGHT})")
        provenance["teacher"] = {"path": str(chosen.path.resolve()), "sha256": chosen.sha256}
        config = dataclasses.replace(config, teacher=chosen.sha256)

    def made(train: ImageSplit) -> ModelFile:
        mf.check_classes(train.classes, ignore_names=ignore_class_names)
        return mf

    return _run(made, data, out_dir, config, provenance, preset, val_data, ignore_class_names, resume, execution,
                None if chosen is None else chosen.model_file.model)  # fmt: skip


def train(
    arch: str,
    data: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: Config | None = None,
    *,
    model_kwargs: dict[str, Any] | None = None,
    input_size: int | None = None,
    normalize: str | None = None,
    preset: str | None = None,
    val_data: str | os.PathLike[str] | None = None,
    ignore_class_names: bool = False,
    resume: bool = False,
    execution: Execution = Execution(),
) -> Run:
    """Train the architecture `arch` (a registry name, or torchvision:NAME / timm:NAME with `model_kwargs`,
    `input_size`) from scratch on `data` into `out_dir` with `config` (default: the baseline-cifar preset), its
    head as wide as the data's classes."""
    check_run_folder(out_dir, [data, val_data])
    library = external.is_external(arch)
    if not library and (model_kwargs or input_size):
        raise TrainError("model_kwargs and input_size are for library models, not registry architectures")
    preset = preset or (None if config else "baseline-cifar")
    config = config or PRESETS["baseline-cifar"]

    def made(split: ImageSplit) -> ModelFile:
        torch.manual_seed(config.seed)  # the initial weights
        meta = {"trained_from_scratch": arch}
        if not library:
            mean, std = parse_normalization(normalize or "imagenet")
            return ModelFile(arch, create_model(arch, None, len(split.classes)), mean, std, split.classes, meta)
        kwargs = {"num_classes": len(split.classes), **(model_kwargs or {})}
        mf = library_model(arch, kwargs, input_size=input_size, normalize=normalize)
        mf.check_classes(split.classes, ignore_names=ignore_class_names)
        return dataclasses.replace(mf, classes=list(split.classes), meta=meta)

    provenance = {"command": "train", "arch": arch}
    return _run(made, data, out_dir, config, provenance, preset, val_data, ignore_class_names, resume, execution)


def _run(
    made: Any, data: str | os.PathLike[str], out_dir: str | os.PathLike[str], config: Config,
    provenance: dict[str, Any], preset: str | None, val_data: str | os.PathLike[str] | None,
    ignore_class_names: bool, resume: bool, execution: Execution, teacher: nn.Module | None = None,
) -> Run:  # fmt: skip
    """Load the splits, make the model for them (`made`), and run the training loop in the run folder."""
    with distributed(execution.device) as place:
        train_split, test = load_data(os.fspath(data), None if val_data is None else os.fspath(val_data),
                                      config.train_subset, config.seed, place, ignore_class_names)  # fmt: skip
        mf = made(train_split)
        precision = choose(execution.amp, execution.channels_last, place.device)
        record = {**provenance, "data": os.fspath(data), "val_data": val_data and os.fspath(val_data), "preset": preset}
        history = fit(
            mf, train_split, test, dataclasses.replace(config, amp=precision.amp), Path(out_dir), resume=resume,
            place=place, precision=precision, compile=execution.compile, workers=execution.workers,
            progress=execution.progress, provenance=record, teacher=teacher,
        )  # fmt: skip
    return Run(Path(out_dir), history if place.is_main else [], place.is_main)


__all__ = [
    "architecture",
    "Calibration",
    "evaluate",
    "Execution",
    "export",
    "export_int8",
    "finetune",
    "import_model",
    "Int8Options",
    "Int8Report",
    "load_model",
    "load_scores",
    "Metrics",
    "profile",
    "Profile",
    "prune",
    "Pruned",
    "PruneReport",
    "Run",
    "score",
    "Scores",
    "Sizes",
    "train",
]
