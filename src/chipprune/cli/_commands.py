"""The `chip` commands: each reads its options, makes one call of the library (chipprune.api) and prints."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

from .. import api
from .._memory import memory_reason, out_of_memory
from ..deploy.quantize import INT8
from ..files.fileio import check_output
from ..models import external
from ..pruning.budgets import CLI, Allocate, Budget, Flops, Latency, Ratio, Sparsity
from ..training.distributed import launched
from . import _render as render
from ._arguments import UsageError
from ._training import cmd_finetune, cmd_train

__all__ = ["cmd_eval", "cmd_export", "cmd_finetune", "cmd_import", "cmd_profile", "cmd_prune", "cmd_score",
           "cmd_train"]  # fmt: skip


class ProfileTiming(NamedTuple):
    """How `chip profile --latency` times the model (each field an option of that name)."""

    batch_sizes: Sequence[int] = (1, 64)
    threads: int | None = None  # torch's
    repeats: int = 30
    device: str = "cpu"


def cmd_profile(args: argparse.Namespace) -> None:
    """Print params and FLOPs (and latency)."""
    if (args.model is None) == (args.arch is None):
        raise UsageError("give either a model file or --arch")
    if not args.latency:
        _only_with(args, ProfileTiming._fields, "--latency")
    if args.model:
        if args.sparsity:
            raise UsageError("--sparsity applies to --arch; a model file already has its widths")
        _no_source_options(args, "a model file has them")
        mf = api.load_model(args.model)
    else:
        if not external.is_external(args.arch):
            _no_source_options(args, "they are for library models")
        mf = api.architecture(args.arch, sparsity_spec=args.sparsity, round_to=args.round_to,
                              model_kwargs=args.model_kwargs, input_size=args.input_size, spelling=CLI)  # fmt: skip
    if args.round_to and not args.sparsity:
        raise UsageError("--round-to applies to --arch with --sparsity")
    timing = ProfileTiming(**{k: v for k, v in vars(args).items() if k in ProfileTiming._fields})
    batch_sizes = timing.batch_sizes if args.latency else ()
    with _sized_by("--batch-sizes", max(batch_sizes, default=1)):
        profile = api.profile(mf, batch_sizes=batch_sizes, threads=timing.threads, device=timing.device,
                              repeats=timing.repeats)  # fmt: skip
    render.emit(args, *render.profile(profile, args.sparsity, args.round_to))


_INT8_OPTIONS = {"calibration_images": "calibration_images", "calibration_method": "method",
                 "check_images": "check_images", "int8_tolerance": "tolerance", "seed": "seed",
                 "ignore_class_names": "ignore_class_names"}  # fmt: skip


def cmd_export(args: argparse.Namespace) -> None:
    """Export a model file and check the result numerically (an int8 one: on test images)."""
    if args.dynamic_batch and args.format != "onnx":
        raise UsageError("--dynamic-batch applies to --format onnx")
    if not args.int8:
        _only_with(args, ["data", *_INT8_OPTIONS], "--int8")
    elif args.format != "onnx" or "data" not in args:
        raise UsageError("--int8 writes ONNX from images: give --format onnx and --data")
    check_output(args.out, [args.model])
    mf = api.load_model(args.model)
    try:
        if args.int8:
            options = INT8._replace(**{_INT8_OPTIONS[k]: v for k, v in vars(args).items() if k in _INT8_OPTIONS})
            report = api.export_int8(mf, args.out, args.data, options, opset=args.opset)
            render.emit_stderr(args, *render.int8(args.out, report))
            return
        error = api.export(mf, args.out, args.format, batch_size=args.batch_size, dynamic_batch=args.dynamic_batch,
                           opset=args.opset)  # fmt: skip
    except ImportError as e:
        raise UsageError(f"{e}: install the export extra, pip install 'chipprune[export]'") from None
    render.emit_stderr(args, *render.exported(args.out, args.format, error))


def cmd_import(args: argparse.Namespace) -> None:
    """Convert weights and save a model file."""
    check_output(args.out, [args.weights])
    library = external.is_external(args.arch)
    if not library:
        _no_source_options(args, "they are for library models")
    mf = api.import_model(args.arch, args.weights, pretrained=args.pretrained, normalize=args.normalize,
                          model_kwargs=args.model_kwargs, input_size=args.input_size)  # fmt: skip
    if library and args.weights is None and not args.pretrained:
        warnings.warn("no --weights: random weights (for structure and latency studies)", stacklevel=1)
    try:
        mf.save(args.out)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(render.imported(args.out, mf), file=sys.stderr)


def cmd_score(args: argparse.Namespace) -> None:
    """Score every prunable channel and save the scores."""
    check_output(args.out, [args.model, args.data])
    mf = api.load_model(args.model)
    if mf.source is not None and launched():  # a library model: its dependency groups
        raise UsageError("scoring a library model runs in one process; run it without torchrun")
    scores = api.score(mf, _calibration(args), criterion=args.criterion, seed=args.seed, device=args.device,
                       progress=True, spelling=CLI)  # fmt: skip
    if scores.is_main:
        scores.save(args.out, mf.arch)
        print(render.scored(args.out, scores), file=sys.stderr)


def cmd_prune(args: argparse.Namespace) -> None:
    """Prune to a budget and save the smaller model."""
    budget = _budget(args)
    check_output(args.out, [args.scores, args.data, None if args.overwrite_input else args.model], hint=_OVERWRITE)
    mf = api.load_model(args.model)
    sized = _sized_by("--latency-batch-size", budget.batch_size) if isinstance(budget, Latency) else None
    with sized or contextlib.nullcontext():
        pruned = api.prune(mf, budget, scores=args.scores, calibration=_calibration(args), criterion=args.criterion,
                           residual=args.residual, recalibrate_bn=args.recalibrate_bn, seed=args.seed,
                           device=args.device, progress=True, spelling=CLI)  # fmt: skip
    if pruned.is_main:
        pruned.model_file.save(args.out)
        render.emit(args, *render.pruned(pruned, args.out))


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a model file on a split."""
    mf = api.load_model(args.model)
    metrics = api.evaluate(mf, args.data, split=args.split, batch_size=args.batch_size, limit=args.limit,
                           seed=args.seed, device=args.device, amp=args.amp, channels_last=args.channels_last,
                           workers=args.workers, ignore_class_names=args.ignore_class_names, progress=True)  # fmt: skip
    render.emit(args, *render.evaluated(args.model, args.split, args.seed, metrics))


def _budget(args: argparse.Namespace) -> Budget:
    """The budget that `chip prune`'s options ask for (argparse lets exactly one of the four through)."""
    allocate: Allocate | None = getattr(args, "allocate", None)
    if args.sparsity is not None and (args.global_scope or allocate):
        raise UsageError("--global applies to --flops-target and --ratio, --allocate to those and --latency-target")
    if args.latency_target is None:
        _only_with(args, _LATENCY_OPTIONS, "--latency-target")
    if args.sparsity is not None:
        return Sparsity(args.sparsity, args.round_to)
    if args.latency_target is not None:
        if args.residual == "paper" or args.global_scope or args.round_to or allocate == "global":
            raise UsageError(
                "--residual paper, --global (--allocate global) and --round-to do not apply to --latency-target"
            )
        given = {field: getattr(args, dest) for dest, field in _LATENCY_OPTIONS.items() if dest in args}
        return Latency(args.latency_target, **given, allocate=allocate or "uniform")
    if args.global_scope and allocate not in (None, "global"):
        raise UsageError(f"--global is --allocate global: give one of them, not --allocate {allocate} too")
    allocate = allocate or ("global" if args.global_scope else "uniform")
    if args.ratio is not None:
        return Ratio(args.ratio, allocate, args.round_to)
    return Flops(args.flops_target, allocate, args.round_to)


# The options of --latency-target, by their dest, and the Latency field each sets.
_LATENCY_OPTIONS = {"runtime": "runtime", "latency_batch_size": "batch_size", "threads": "threads",
                    "repeats": "repeats"}  # fmt: skip
_OVERWRITE = " (or --overwrite-input, where it is the model file, to replace it)"


def _calibration(args: argparse.Namespace) -> api.Calibration | None:
    """Calibration images from --data's train split, as the scoring options say."""
    if not args.data:
        return None
    return api.Calibration(args.data, args.batches, args.batch_size, args.workers, args.ignore_class_names)


def _no_source_options(args: argparse.Namespace, why: str) -> None:
    """UsageError for --model-kwargs or --input-size where they do not apply."""
    given = [o for o, v in (("--model-kwargs", args.model_kwargs), ("--input-size", args.input_size)) if v]
    if given:
        raise UsageError(f"{' and '.join(given)}: not here, {why}")


def _only_with(args: argparse.Namespace, dests: Iterable[str], option: str) -> None:
    """UsageError naming the options among `dests` (given without a default) that were given: they apply to `option`,
    which was not."""
    given = ["--" + dest.replace("_", "-") for dest in dests if dest in args]
    if given:
        raise UsageError(f"{' and '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to {option}")


@contextlib.contextmanager
def _sized_by(option: str, size: int) -> Iterator[None]:
    """Running out of memory inside is a UsageError that advises a smaller `option`, the one that sized the work,
    where it is above 1."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e) or os.environ.get("CHIP_DEBUG"):
            raise
        raise UsageError(memory_reason(e) + (f": try a smaller {option}" if size > 1 else "")) from None
