"""The `chip` command: profile, import, score, prune, evaluate, fine-tune and train CNNs with CHIP."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm import tqdm

from .. import __version__
from ..calibrate import CalibrationError, recalibrate_bn, score_layers
from ..criteria import CRITERIA, ActivationCriterion, get_criterion
from ..data import DataError, ImageSplit, load_split
from ..deploy.export import FORMATS, ExportError, export
from ..files.fileio import OutputError, check_output, sha256
from ..files.modelfile import ModelFile, ModelFileError, import_weights, library_model, load_model, parse_normalization
from ..files.scores import ScoresError, read_scores, write_scores
from ..models import RegistryModel, create_model, external, get_arch, rewidth
from ..profile import count_flops, count_params
from ..pruning import sparsity
from ..pruning.graph import group_importance, prune_model, prune_to_latency
from ..pruning.latency import RUNTIMES, Runner
from ..pruning.registry import RESIDUAL_MODES, prune
from ..training.distributed import Place, distributed, launched
from ..training.evaluate import evaluate
from ..training.loop import (
    KD_TEMPERATURE,
    KD_WEIGHT,
    PRESETS,
    Config,
    Teacher,
    TrainError,
    fit,
    load_data,
    load_teacher,
)
from ..training.precision import AMP_CHOICES, choose
from ..training.runs import RunError, check_run_folder
from ._arguments import (
    OneLineParser,
    arch,
    device,
    memory_reason,
    model_kwargs,
    non_negative,
    number,
    opset,
    out_of_memory,
    positive,
    quiet_stdout,
    seed,
)


class UsageError(ValueError):
    """A request the command cannot carry out as given."""


def main(argv: list[str] | None = None) -> int:
    """Run the command line; exit code 2 with one line on stderr for bad input."""
    args = build_parser().parse_args(argv)

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        tqdm.write(f"chip {args.command}: warning: {message}", file=sys.stderr)  # above any progress bar

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show  # one plain line, as errors are
            args.run(args)
            sys.stdout.flush()  # here, where a closed pipe is caught
    except (
        UsageError,
        ModelFileError,
        DataError,
        CalibrationError,
        sparsity.SparsityError,
        TrainError,
        ExportError,
        OutputError,
        ScoresError,
        RunError,
    ) as e:
        if os.environ.get("CHIP_DEBUG"):
            raise
        print(f"chip {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"chip {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        quiet_stdout()
        print(f"chip {args.command}: error: stdout was closed before all the output was written", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e) or os.environ.get("CHIP_DEBUG"):
            raise
        # sized_by: the option that sized the work, set beside it; none where no option did (import)
        advice = f": try a smaller {args.sized_by}" if getattr(args, "sized_by", None) else ""
        print(f"chip {args.command}: error: {memory_reason(e)}{advice}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = OneLineParser(prog="chip", description=__doc__, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"chipprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "profile", help="parameters and FLOPs of a model file or of an architecture at a sparsity", formatter_class=fmt
    )
    p.add_argument("model", nargs="?", help="a chipprune model file (instead of --arch)")
    p.add_argument("--arch", type=arch, help="a registry architecture, or torchvision:NAME or timm:NAME")
    _add_source_options(p)
    p.add_argument("--sparsity", help="rates ('[0.]+[0.15]*2+[0.4]*27', '0,0.1,…') or a preset ('paper-1')")
    p.add_argument(
        "--round-to",
        type=positive,
        metavar="N",
        help="with --sparsity: each width rounded to the nearest multiple of N, at least N (a layer narrower than N "
        "keeps its width)",
    )
    p.add_argument("--latency", action="store_true", help="also measure eval-mode latency on --device")
    timing, hidden = _ProfileTiming(), argparse.SUPPRESS  # given without --latency: refused
    sizes = ",".join(map(str, timing.batch_sizes))
    p.add_argument(
        "--batch-sizes", type=_batch_sizes, default=hidden, help=f"with --latency: the batches timed (default: {sizes})"
    )
    p.add_argument("--threads", type=positive, default=hidden, help="with --latency: CPU threads (default: torch's)")
    p.add_argument(
        "--repeats",
        type=positive,
        default=hidden,
        help=f"with --latency: timed runs per batch size, after 3 warm-up runs (default: {timing.repeats})",
    )
    p.add_argument(
        "--device", type=device, default=hidden, help=f"with --latency: the torch device (default: {timing.device})"
    )
    p.add_argument("--json", action="store_true", help="print JSON to stdout")
    p.set_defaults(run=cmd_profile)

    p = sub.add_parser(
        "export",
        help="ONNX or TorchScript, checked against PyTorch",
        formatter_class=fmt,
        description="The exported model takes float32 RGB images in [0, 1], [B, 3, H, W], as input "
        "`images`; the model file's normalization is built in. Output `logits`.",
    )
    p.add_argument("model", help="a chipprune model file")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--opset", type=opset, default=17, help="ONNX opset")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", type=positive, default=1, help="the batch size the model is traced with")
    batch.add_argument("--dynamic-batch", action="store_true", help="ONNX: any batch size")
    p.set_defaults(sized_by="--batch-size")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("import", help="convert third-party weights into a chipprune model file", formatter_class=fmt)
    p.add_argument(
        "--arch", required=True, type=arch, help="the architecture: a registry name, torchvision:NAME or timm:NAME"
    )
    p.add_argument(
        "--weights",
        help="a state_dict (.pt/.pth, or .safetensors), or a dict holding one under 'state_dict'; a library model "
        "without it has random weights",
    )
    p.add_argument("--pretrained", action="store_true", help="a library model: its library's weights (downloads)")
    p.add_argument("--out", required=True, help="the model file to write (.pt, or .safetensors)")
    p.add_argument(
        "--normalize",
        help="input normalization the weights were trained with: imagenet, cifar, or m1,m2,m3:s1,s2,s3 (default: "
        "the library's for a library model, else imagenet)",
    )
    _add_source_options(p)
    p.set_defaults(run=cmd_import)

    p = sub.add_parser("score", help="score every prunable channel on calibration images", formatter_class=fmt)
    p.add_argument("model", help="a chipprune model file")
    p.add_argument("--out", required=True, help="the scores JSON to write")
    _add_scoring_options(p, data_required=False)
    p.set_defaults(run=cmd_score)

    p = sub.add_parser("prune", help="remove the lowest-scored channels: a smaller dense model", formatter_class=fmt)
    p.add_argument("model", help="a chipprune model file")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--sparsity", help="rates or a preset, as the paper's lists (registry architectures)")
    budget.add_argument(
        "--ratio",
        type=number(0, 1, below=True),
        metavar="R",
        help="remove this fraction of the channels of every group (dependency-graph pruning)",
    )
    budget.add_argument(
        "--flops-target",
        type=number(0, 1, above=True),
        metavar="F",
        help="keep this fraction of the FLOPs (within 2 %%): dependency-graph pruning, every conv "
        "group at one ratio (see docs/any-cnn.md)",
    )
    budget.add_argument(
        "--latency-target",
        type=number(0, 1, above=True),
        metavar="F",
        help="run in at most F x the dense model's measured latency on --runtime (docs/performance.md)",
    )
    hidden = argparse.SUPPRESS  # given without --latency-target: refused
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=hidden,
        help=f"with --latency-target: what it is timed on (default: {Runner.runtime})",
    )
    p.add_argument(
        "--latency-batch-size",
        type=positive,
        default=hidden,
        metavar="B",
        help=f"with --latency-target: the batch timed (default: {Runner.batch_size})",
    )
    p.add_argument(
        "--threads", type=positive, default=hidden, help="with --latency-target: CPU threads (default: torch's)"
    )
    p.add_argument(
        "--repeats",
        type=positive,
        default=hidden,
        help="with --latency-target: timed runs per table entry, after 3 warm-up runs (3x that per whole-model check) "
        f"(default: {Runner.repeats})",
    )
    p.add_argument(
        "--global",
        dest="global_scope",
        action="store_true",
        help="with --flops-target or --ratio: rank all groups' channels together",
    )
    p.add_argument(
        "--round-to",
        type=positive,
        metavar="N",
        help="keep channel counts at multiples of N, at least N: with --sparsity each width rounded to the nearest, "
        "with --flops-target and --ratio each group's kept count rounded down; a layer or group narrower than N "
        "keeps its width (a warning names the groups); see docs/performance.md for what it buys",
    )
    p.add_argument("--out", required=True, help="the pruned model file to write")
    p.add_argument(
        "--scores",
        help="scores JSON from `chip score`, instead of calibration: a registry model's with --sparsity, a library "
        "model's with --flops-target or --ratio",
    )
    p.add_argument(
        "--overwrite-input", action="store_true", help="allow --out to be the input model file, which it replaces"
    )
    p.add_argument(
        "--residual",
        choices=RESIDUAL_MODES,
        default="coupled",
        help="coupled: one channel set per residual stage; paper (with --sparsity only): per block, "
        "shortcuts by position",
    )
    p.add_argument(
        "--recalibrate-bn",
        type=int,
        default=0,
        metavar="B",
        help="after pruning, re-estimate BatchNorm statistics on B training batches of --batch-size "
        "(train mode, no weight update; needs --data); 0: keep the parent's",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON to stdout")
    _add_scoring_options(p, data_required=False)
    p.set_defaults(run=cmd_prune)

    p = sub.add_parser("eval", help="top-1/top-5 accuracy on a data split", formatter_class=fmt)
    p.add_argument("model", help="a chipprune model file")
    p.add_argument("--data", required=True, help="dataset source (see README: CIFAR archive, image folder, tarball)")
    p.add_argument("--split", default="test", choices=("test", "val", "train"), help="which split")
    p.add_argument("--batch-size", type=positive, default=256, help="images per forward pass")
    p.set_defaults(sized_by="--batch-size")
    p.add_argument("--limit", type=positive, help="evaluate a seeded random sample of N images (see --seed)")
    p.add_argument("--seed", type=seed, default=0, help="picks the --limit sample")
    p.add_argument("--workers", type=non_negative, default=0, help="loader processes for large images")
    p.add_argument("--device", type=device, default=_default_device(), help="torch device")
    _add_class_names_option(p)
    _add_precision_options(p)
    p.add_argument("--json", action="store_true", help="print JSON to stdout")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("finetune", help="fine-tune a (pruned) model file; also under torchrun", formatter_class=fmt)
    p.add_argument("model", help="a chipprune model file (with --resume, the run's last.pt holds the weights)")
    _add_training_options(p, "the architecture's: paper-cifar, paper-imagenet for 224-px ones")
    _add_teacher_options(p)
    p.set_defaults(run=cmd_finetune)

    p = sub.add_parser(
        "train", help="train an architecture from scratch (a baseline), as finetune does", formatter_class=fmt
    )
    p.add_argument(
        "--arch", required=True, type=arch, help="the architecture, at full width: a registry name or library model"
    )
    p.add_argument(
        "--normalize",
        help="input normalization: imagenet, cifar, or m1,m2,m3:s1,s2,s3 (default: the library's, else imagenet)",
    )
    _add_source_options(p)
    _add_training_options(p, "baseline-cifar")
    p.set_defaults(run=cmd_train)
    return parser


def _add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-kwargs",
        type=model_kwargs,
        default={},
        metavar="JSON",
        help="a library model's constructor arguments, as '{\"num_classes\": 10}'",
    )
    p.add_argument(
        "--input-size", type=positive, metavar="N", help="a library model's input side (default: its library's)"
    )


def _add_scoring_options(p: argparse.ArgumentParser, data_required: bool) -> None:
    p.add_argument(
        "--data", required=data_required, help="dataset source; calibration images come from its train split"
    )
    p.add_argument("--criterion", choices=CRITERIA, default="chip", help="how channels are ranked")
    p.add_argument("--batches", type=positive, default=5, help="calibration batches")
    p.add_argument("--batch-size", type=positive, default=128, help="calibration batch size")
    p.set_defaults(sized_by="--batch-size")
    p.add_argument("--seed", type=seed, default=0, help="picks the calibration images; seeds the random criterion")
    p.add_argument("--workers", type=non_negative, default=0, help="loader processes for large images")
    p.add_argument("--device", type=device, default=_default_device(), help="torch device")
    _add_class_names_option(p)


def _add_class_names_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ignore-class-names",
        action="store_true",
        help="use data whose class names differ from the model's (or between splits), matched by position",
    )


def _add_training_options(p: argparse.ArgumentParser, default_preset: str) -> None:
    p.add_argument(
        "--data", required=True, help="dataset source with a train split and (unless --val-data) a test or val split"
    )
    p.add_argument("--val-data", help="dataset source of the evaluation split, if not --data")
    p.add_argument(
        "--out-dir", required=True, help="the run folder: last.pt, best.pt, metrics.jsonl, config.json, curves.png"
    )
    presets = "; ".join(f"{name}: {_preset_text(cfg)}" for name, cfg in PRESETS.items())
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=argparse.SUPPRESS,
        help=f"hyperparameters, each overridden by its option below ({presets}) (default: {default_preset})",
    )
    hyper = argparse.SUPPRESS  # unless given, the preset's
    p.add_argument("--epochs", type=positive, default=hyper, help="epochs (default: the preset's)")
    p.add_argument("--lr", type=number(0, above=True), default=hyper, help="peak learning rate (default: the preset's)")
    p.add_argument(
        "--batch-size",
        type=positive,
        default=hyper,
        help="global batch, split among torchrun processes and --accum micro-batches (default: the preset's)",
    )
    p.set_defaults(sized_by="--batch-size")
    p.add_argument("--weight-decay", type=number(0), default=hyper, help="SGD weight decay (default: the preset's)")
    p.add_argument(
        "--momentum", type=number(0, 1, below=True), default=hyper, help="SGD momentum (default: the preset's)"
    )
    p.add_argument(
        "--label-smoothing",
        type=number(0, 1, below=True),
        default=hyper,
        help="cross-entropy label smoothing (default: the preset's)",
    )
    p.add_argument(
        "--warmup-epochs",
        type=number(0),
        default=hyper,
        help="epochs of linear warm-up, per step, before the cosine decay (default: the preset's)",
    )
    p.add_argument(
        "--seed",
        type=seed,
        default=0,
        help="seeds the subset, data order and augmentation (and train's initial weights)",
    )
    p.add_argument("--train-subset", type=positive, help="train on a seeded subset of N images (quick runs)")
    p.add_argument(
        "--accum",
        type=positive,
        default=1,
        help="micro-batches per batch, gradients added: less memory; BatchNorm sees each micro-batch",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last.pt, exactly")
    _add_precision_options(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun, BatchNorm statistics over the global batch (SyncBatchNorm; GPUs only)",
    )
    p.add_argument(
        "--workers",
        type=non_negative,
        default=min(8, os.cpu_count() or 1),
        help="loader processes (per torchrun process) for large images; in-memory CIFAR needs none",
    )
    p.add_argument(
        "--device",
        type=device,
        default=_default_device(),
        help="torch device; under torchrun, cuda means each process's own GPU",
    )
    _add_class_names_option(p)


def _add_precision_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--amp",
        choices=AMP_CHOICES,
        default="auto",
        help="autocast dtype of the forward pass: auto is bf16 where the device computes it natively (CUDA; CPUs with "
        "AMX or AVX512-bf16), else off (float32); fp16 trains with loss scaling",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format for the model and its inputs (default: with autocast, and on CUDA)",
    )


def _add_teacher_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--teacher",
        metavar="MODEL",
        help="distill from this model file's logits (same classes and normalization), or 'parent': the model this "
        "one was pruned from, as recorded in it",
    )
    p.add_argument(
        "--kd-weight",
        type=number(0, 1),
        default=argparse.SUPPRESS,
        metavar="A",
        help=f"with --teacher: loss = A*T^2*KL(teacher || student at T) + (1 - A)*cross-entropy (default: {KD_WEIGHT})",
    )
    p.add_argument(
        "--kd-temperature",
        type=number(0, above=True),
        default=argparse.SUPPRESS,
        metavar="T",
        help=f"with --teacher: the softmax temperature of both models' logits (default: {KD_TEMPERATURE})",
    )


def _preset_text(cfg: Config) -> str:
    return (
        f"{cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr}, momentum {cfg.momentum}, "
        f"weight decay {cfg.weight_decay}, label smoothing {cfg.label_smoothing}, warm-up {cfg.warmup_epochs}"
    )


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, got {text!r}") from None
    if not sizes or min(sizes) < 1 or max(sizes) >= 2**31:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers below 2**31, got {text!r}")
    return sizes


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _emit(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    """JSON on stdout with --json, else a human summary."""
    print(json.dumps(result, indent=1) if getattr(args, "json", False) else text)


def _sizes(model: torch.nn.Module, base: torch.nn.Module, input_size: int) -> dict[str, Any]:
    params, flops = count_params(model), count_flops(model, input_size)
    base_params, base_flops = count_params(base), count_flops(base, input_size)
    return {
        "params": params,
        "flops": flops,
        "base_params": base_params,
        "base_flops": base_flops,
        "params_reduction": 1 - params / base_params,
        "flops_reduction": 1 - flops / base_flops,
    }


def _rounded(arch: str, rates: str, round_to: int) -> list[dict[str, int]]:
    return [r._asdict() for r in sparsity.rounding(arch, rates, round_to)]


def _rounded_text(result: dict[str, Any]) -> str:
    changes = ", ".join(f"{r['floor']}->{r['kept']} ({r['layers']} convs)" for r in result["rounded"])
    return f"round-to {result['round_to']}: paper floor -> kept: {changes or 'no change'}"


def _sizes_text(r: dict[str, Any]) -> str:
    return (
        f"params {r['params']:,} ({100 * r['params_reduction']:.1f}% fewer than {r['base_params']:,})\n"
        f"FLOPs  {r['flops']:,} ({100 * r['flops_reduction']:.1f}% fewer than {r['base_flops']:,})"
    )


class _ProfileTiming(NamedTuple):
    """How `chip profile --latency` times the model (each field an option of that name)."""

    batch_sizes: Sequence[int] = (1, 64)
    threads: int | None = None  # torch's
    repeats: int = 30
    device: str = "cpu"


def cmd_profile(args: argparse.Namespace) -> None:
    """Print params and FLOPs."""
    if (args.model is None) == (args.arch is None):
        raise UsageError("give either a model file or --arch")
    if not args.latency:
        _only_with(args, _ProfileTiming._fields, "--latency")
    if args.model:
        if args.sparsity:
            raise UsageError("--sparsity applies to --arch; a model file already has its widths")
        _no_source_options(args, "a model file has them")
        mf = load_model(args.model)
        arch, model, base, size = mf.arch, mf.model, mf.unpruned(), mf.input_size
    elif external.is_external(args.arch):
        if args.sparsity:
            raise UsageError(_SPARSITY_LIBRARY)
        mf = library_model(args.arch, args.model_kwargs, input_size=args.input_size)
        arch, model, base, size = mf.arch, mf.model, mf.model, mf.input_size
    else:
        _no_source_options(args, "they are for library models")
        arch, size = args.arch, get_arch(args.arch).input_size
        widths = sparsity.widths(arch, args.sparsity, args.round_to) if args.sparsity else None
        model, base = create_model(arch, widths), create_model(arch)
    result = {"arch": arch, **_sizes(model, base, size)}
    if args.sparsity:
        result["sparsity"] = sparsity.format_rates(sparsity.resolve(arch, args.sparsity))
    text = f"{arch}\n{_sizes_text(result)}"
    if args.round_to:
        if not args.sparsity:
            raise UsageError("--round-to applies to --arch with --sparsity")
        result["round_to"], result["rounded"] = args.round_to, _rounded(arch, args.sparsity, args.round_to)
        text += "\n" + _rounded_text(result)
    if args.latency:
        timing = _ProfileTiming(**{k: v for k, v in vars(args).items() if k in _ProfileTiming._fields})
        result["latency_ms"] = {}
        for b in timing.batch_sizes:
            with _sized_by("--batch-sizes", b):
                runner = Runner("eager", b, timing.threads, timing.device, timing.repeats)
                result["latency_ms"][b] = runner.time(model, (3, size, size))._asdict()
        result["threads"] = timing.threads or torch.get_num_threads()
        text += "".join(
            f"\nbatch {b}: {r['median_ms']:.2f} ms median ({r['min_ms']:.2f}–{r['max_ms']:.2f})"
            for b, r in result["latency_ms"].items()
        )
    _emit(args, result, text)


def cmd_export(args: argparse.Namespace) -> None:
    """Export a model file and check the result numerically."""
    if args.dynamic_batch and args.format != "onnx":
        raise UsageError("--dynamic-batch applies to --format onnx")
    check_output(args.out, [args.model])
    mf = load_model(args.model)
    try:
        error = export(
            mf, args.out, args.format, batch_size=args.batch_size, dynamic_batch=args.dynamic_batch, opset=args.opset
        )
    except ImportError as e:
        raise UsageError(f"{e}: install the export extra, pip install 'chipprune[export]'") from None
    print(f"wrote {args.out}: {args.format}, max relative error against PyTorch {error:.1e}", file=sys.stderr)


def cmd_import(args: argparse.Namespace) -> None:
    """Convert weights and save a model file."""
    check_output(args.out, [args.weights])
    if external.is_external(args.arch):
        mf = library_model(
            args.arch,
            args.model_kwargs,
            weights=args.weights,
            pretrained=args.pretrained,
            input_size=args.input_size,
            normalize=args.normalize,
        )
        if args.weights is None and not args.pretrained:
            warnings.warn("no --weights: random weights (for structure and latency studies)", stacklevel=1)
    else:
        if args.weights is None:
            raise UsageError(f"--weights is needed for {args.arch}, a registry architecture")
        if args.pretrained:
            raise UsageError("--pretrained applies to library models (torchvision:NAME, timm:NAME)")
        _no_source_options(args, "they are for library models")
        mf = import_weights(args.arch, args.weights, args.normalize or "imagenet")
    try:
        mf.save(args.out)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(
        f"wrote {args.out}: {args.arch}, {len(mf.classes)} classes, {count_params(mf.model):,} params", file=sys.stderr
    )


_SPARSITY_LIBRARY = (
    "--sparsity holds the paper's per-layer rates of the registry architectures; prune a library model with "
    "--flops-target or --ratio"
)


def _no_source_options(args: argparse.Namespace, why: str) -> None:
    """UsageError for --model-kwargs or --input-size where they do not apply."""
    given = [o for o, v in (("--model-kwargs", args.model_kwargs), ("--input-size", args.input_size)) if v]
    if given:
        raise UsageError(f"{' and '.join(given)}: not here, {why}")


def _calibration(args: argparse.Namespace, mf: ModelFile) -> Iterator[tuple[Tensor, Tensor]]:
    """The seeded calibration batches from the train split."""
    if not args.data:
        raise UsageError(f"--data is needed to score with {args.criterion}")
    train = load_split(args.data, "train")
    _check_classes(train, mf, args)
    wanted = args.batches * args.batch_size
    if len(train) < wanted:
        warnings.warn(
            f"asked for {wanted} calibration images, the train split has {len(train)}: using them all", stacklevel=2
        )
    return mf.batches(train, args.batch_size, shuffle=True, seed=args.seed, limit=wanted, workers=args.workers)


def _check_classes(split: ImageSplit, mf: ModelFile, args: argparse.Namespace) -> None:
    mf.check_classes(split.classes, ignore_names=args.ignore_class_names)


def _scores(args: argparse.Namespace, mf: ModelFile) -> tuple[dict[str, Tensor], dict[str, Any], bool]:
    """Scores of every prunable conv, computed or read from --scores, how they were made, and whether this
    process writes the results (under torchrun each process scores its share, and rank 0 writes)."""
    if getattr(args, "scores", None):
        return *_read_scores(args.scores, mf), True
    criterion = get_criterion(args.criterion, args.seed)
    with distributed(args.device) as place:
        batches_ = _calibration(args, mf) if isinstance(criterion, ActivationCriterion) else iter(())
        scores, images = score_layers(
            mf.model,
            mf.registry_model.channel_layers(),
            criterion,
            batches_,
            device=place.device,
            progress=place.writer,
        )
    how = {"criterion": criterion.name, "images": images, "seed": args.seed, "processes": place.world}
    return scores, how, place.writer


def _read_scores(path: str, mf: ModelFile) -> tuple[dict[str, Tensor], dict[str, Any]]:
    return read_scores(path, mf.arch, mf.registry_model.widths)


def cmd_score(args: argparse.Namespace) -> None:
    """Score every prunable channel and save the scores."""
    check_output(args.out, [args.model, args.data])
    mf = load_model(args.model)
    if mf.source is not None:  # a library model: its dependency groups, for --flops-target and --ratio
        if launched():
            raise UsageError("scoring a library model runs in one process; run it without torchrun")
        scores, how = _group_scores(args, mf)
        write_scores(args.out, mf.arch, how, scores, of="groups")
    else:
        scores, how, writer = _scores(args, mf)
        if not writer:
            return
        write_scores(args.out, mf.arch, how, scores)
    print(
        f"wrote {args.out}: {how['criterion']} scores of {len(scores)} {'groups' if mf.source else 'layers'}"
        + (f" from {how['images']} image{'s' * (how['images'] != 1)}" if how["images"] else ""),
        file=sys.stderr,
    )


def cmd_prune(args: argparse.Namespace) -> None:
    """Prune to a sparsity and save the smaller model."""
    if args.recalibrate_bn < 0:
        raise UsageError(f"--recalibrate-bn must be >= 0, got {args.recalibrate_bn}")
    if args.recalibrate_bn and not args.data:
        raise UsageError("--recalibrate-bn needs --data (its batches come from the train split)")
    if args.sparsity is not None and args.global_scope:
        raise UsageError("--global applies to --flops-target and --ratio")
    if args.latency_target is None:
        _only_with(args, _LATENCY_OPTIONS, "--latency-target")
    check_output(args.out, [args.scores, args.data, None if args.overwrite_input else args.model], hint=_OVERWRITE)
    mf = load_model(args.model)
    if args.latency_target is not None:
        pruned, how = _prune_latency(args, mf)
        budget = {"latency_target": args.latency_target, "runtime": how["latency"]["runtime"]}
    elif args.sparsity is None:
        pruned, how = _prune_graph(args, mf)
        budget = {
            **({"ratio": args.ratio} if args.flops_target is None else {"flops_target": args.flops_target}),
            "scope": "global" if args.global_scope else "local",
            "round_to": args.round_to,
        }
    else:
        if mf.source is not None:
            raise UsageError(_SPARSITY_LIBRARY)
        widths = sparsity.widths(mf.arch, args.sparsity, args.round_to)
        scores, how, writer = _scores(args, mf)
        if not writer:
            return
        try:
            pruned = prune(mf.registry_model, scores, widths, args.residual)
        except ValueError as e:
            raise UsageError(str(e)) from None
        budget = {
            "sparsity": sparsity.format_rates(sparsity.resolve(mf.arch, args.sparsity)),
            "residual": args.residual,
            "round_to": args.round_to,
        }
    if args.recalibrate_bn:
        train = load_split(args.data, "train")
        # Other images than the calibration's (seed + 1), without augmentation: the statistics of test-like inputs.
        stream = mf.batches(
            train,
            args.batch_size,
            shuffle=True,
            seed=args.seed + 1,
            limit=args.recalibrate_bn * args.batch_size,
            workers=args.workers,
        )
        how["recalibrated_bn_images"] = recalibrate_bn(pruned, stream, device=args.device, progress=True)
        pruned.cpu()
    path = Path(args.model)
    parent = {"parent": path.name, "parent_path": str(path.resolve()), "parent_sha256": sha256(path)}
    meta = {**mf.meta, "pruned": {**budget, **how, **parent}}
    dataclasses.replace(mf, model=pruned, meta=meta).save(args.out)
    result = {"arch": mf.arch, **budget, **how, "out": args.out, **_sizes(pruned, mf.unpruned(), mf.input_size)}
    said = ", ".join(f"{k} {v}" for k, v in budget.items() if v is not None)
    text = f"wrote {args.out}: {mf.arch}, {said}, {how['criterion']}\n" + _sizes_text(result)
    if args.sparsity and args.round_to:
        result["rounded"] = _rounded(mf.arch, args.sparsity, args.round_to)
        text += "\n" + _rounded_text(result)
    if "latency" in how:
        t = how["latency"]
        text += (
            f"\nlatency ({t['runtime']}, batch {t['batch_size']}, {t['threads']} threads): dense "
            f"{t['dense_ms']:.3f} ms, pruned {t['pruned_ms']:.3f} ms measured ({t['pruned_ms'] / t['dense_ms']:.3f}x;"
            f" predicted {t['predicted_ms']:.3f} ms) after {t['rounds']} round(s)"
        )
    _emit(args, result, text)


def _prune_latency(args: argparse.Namespace, mf: ModelFile) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model pruned to --latency-target on --runtime, and how: the scores, and the latency measured."""
    if args.residual == "paper" or args.global_scope or args.round_to:
        raise UsageError("--residual paper, --global and --round-to do not apply to --latency-target")
    if launched():
        raise UsageError("--latency-target runs in one process; run it without torchrun")
    importance, how = _graph_scores(args, mf)
    given = {field: getattr(args, option) for option, field in _LATENCY_OPTIONS.items() if option in args}
    runner = Runner(device=args.device, **given)
    with _sized_by("--latency-batch-size", runner.batch_size):
        try:
            pruned, report = prune_to_latency(
                mf.model.to(args.device),
                torch.zeros(1, 3, mf.input_size, mf.input_size, device=args.device),
                (),
                args.latency_target,
                runner,
                ignored_layers=_heads(mf.model),
                importance=importance,
                progress=True,
            )
        except ImportError as e:
            raise UsageError(f"{e}: install the export extra, pip install 'chipprune[export]'") from None
        except ValueError as e:
            raise _pruning_error(e, args) from None
    how["latency"] = {
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
    return _with_widths(pruned.cpu(), mf), how


# The options of --latency-target, by their dest, and the Runner field each sets.
_LATENCY_OPTIONS = {
    "runtime": "runtime",
    "latency_batch_size": "batch_size",
    "threads": "threads",
    "repeats": "repeats",
}


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


_OVERWRITE = " (or --overwrite-input, where it is the model file, to replace it)"


def _prune_graph(args: argparse.Namespace, mf: ModelFile) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model pruned by prune_model to --flops-target or --ratio; a registry model keeps its classifier and has
    its widths set from its convs."""
    option = "--ratio" if args.flops_target is None else "--flops-target"
    if args.residual == "paper":
        raise UsageError(
            f"--residual paper applies to --sparsity: with {option} the dependency graph couples the residual channels"
        )
    if launched():
        raise UsageError(f"{option} runs in one process; run it without torchrun")
    importance, how = _graph_scores(args, mf)
    model = mf.model.to(args.device)
    try:
        pruned = prune_model(
            model,
            torch.zeros(1, 3, mf.input_size, mf.input_size, device=args.device),
            (),
            flops_target=args.flops_target,
            pruning_ratio=args.ratio,
            scope="global" if args.global_scope else "local",
            ignored_layers=_heads(model),
            round_to=args.round_to,
            importance=importance,
        ).cpu()
    except ValueError as e:
        raise _pruning_error(e, args) from None
    return _with_widths(pruned, mf), how


def _graph_scores(args: argparse.Namespace, mf: ModelFile) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The importance of every dependency group: read from --scores, or scored on the calibration batches."""
    return read_scores(args.scores, mf.arch, None, of="groups") if args.scores else _group_scores(args, mf)


def _pruning_error(e: ValueError, args: argparse.Namespace) -> UsageError:
    """prune_model's refusal as a usage error; one of --scores' importances, as scores of another model."""
    return UsageError(f"{args.scores}: scores of another model" if "importance:" in str(e) else str(e))


def _with_widths(pruned: torch.nn.Module, mf: ModelFile) -> torch.nn.Module:
    """A graph-pruned model, a registry one with its widths read back from its convs."""
    if not isinstance(pruned, RegistryModel):
        return pruned
    try:
        return rewidth(pruned, mf.arch, len(mf.classes))
    except ValueError as e:
        raise UsageError(str(e)) from None


def _heads(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers that keep their widths beside the output layers: a registry model's Linear heads."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)] if isinstance(model, RegistryModel) else []


def _group_scores(args: argparse.Namespace, mf: ModelFile) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The importance of every dependency group's channels (chipprune.pruning.graph.group_importance) on the calibration
    batches, and how it was made."""
    criterion = get_criterion(args.criterion, args.seed)
    batches_ = _calibration(args, mf) if isinstance(criterion, ActivationCriterion) else iter(())
    images = 0

    def counted() -> Iterator[Tensor]:
        nonlocal images
        for x, _ in batches_:
            images += len(x)
            yield x

    model, size = mf.model.to(args.device), mf.input_size
    try:
        importance = group_importance(
            model,
            torch.zeros(1, 3, size, size, device=args.device),
            counted(),
            criterion=criterion,
            ignored_layers=_heads(model),
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    return importance, {"criterion": criterion.name, "images": images, "seed": args.seed}


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a model file on a split."""
    mf = load_model(args.model)
    split = load_split(args.data, args.split)
    _check_classes(split, mf, args)
    sample = args.limit is not None and args.limit < len(split)  # a seeded random sample, not the first classes
    stream = mf.batches(split, args.batch_size, limit=args.limit, shuffle=sample, seed=args.seed, workers=args.workers)
    precision = choose(args.amp, args.channels_last, torch.device(args.device))
    result = {
        "model": args.model,
        "split": args.split,
        **evaluate(mf.model, stream, device=args.device, precision=precision, progress=True),
        "precision": precision.amp,
    }
    if sample:
        result["sample"] = {"of": len(split), "seed": args.seed}
    _emit(
        args,
        result,
        f"{args.model} on {args.split}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
        f"({result['images']} images"
        + (f", a random sample of the {len(split)} with seed {args.seed}" if sample else "")
        + f"), {precision.describe()}",
    )


def cmd_finetune(args: argparse.Namespace) -> None:
    """Fine-tune a model file into a run folder."""
    mf = load_model(args.model)
    if args.teacher is None and ("kd_weight" in args or "kd_temperature" in args):
        raise UsageError("--kd-weight and --kd-temperature apply to --teacher")
    teacher = None if args.teacher is None else load_teacher(args.teacher, mf, args.model)
    check_run_folder(args.out_dir, [args.model, None if teacher is None else teacher.path, args.data, args.val_data])
    with distributed(args.device) as place:
        train, test = load_data(args.data, args.val_data, args.train_subset, args.seed, place, args.ignore_class_names)
        _check_classes(train, mf, args)
        preset = mf.finetune_preset
        about = {"command": "finetune", "model": args.model}
        if teacher is not None:
            about["teacher"] = {"path": str(teacher.path), "sha256": teacher.sha256}
        _fit(args, mf, train, test, place, preset, about, teacher)


def cmd_train(args: argparse.Namespace) -> None:
    """Train an architecture from scratch into a run folder."""
    check_run_folder(args.out_dir, [args.data, args.val_data])
    library = external.is_external(args.arch)
    if not library:
        _no_source_options(args, "they are for library models")
    mean, std = parse_normalization(args.normalize or "imagenet")
    with distributed(args.device) as place:
        train, test = load_data(args.data, args.val_data, args.train_subset, args.seed, place, args.ignore_class_names)
        torch.manual_seed(args.seed)  # the initial weights
        about = {"trained_from_scratch": args.arch}
        if library:
            kwargs = {"num_classes": len(train.classes), **args.model_kwargs}
            mf = library_model(args.arch, kwargs, input_size=args.input_size, normalize=args.normalize)
            _check_classes(train, mf, args)
            mf = dataclasses.replace(mf, classes=list(train.classes), meta=about)
        else:
            model = create_model(args.arch, None, len(train.classes))
            mf = ModelFile(args.arch, model, mean, std, train.classes, about)
        _fit(args, mf, train, test, place, "baseline-cifar", {"command": "train", "arch": args.arch})


def _fit(
    args: argparse.Namespace,
    mf: ModelFile,
    train: ImageSplit,
    test: ImageSplit | None,
    place: Place,
    default_preset: str,
    about: dict[str, Any],
    teacher: Teacher | None = None,
) -> None:
    """Run the training loop with the options of finetune and train; print where its results are."""
    preset = getattr(args, "preset", default_preset)
    precision = choose(args.amp, args.channels_last, place.device)
    fields = {f.name for f in dataclasses.fields(Config)} - {"amp", "teacher", "kd_weight", "kd_temperature"}
    cfg = dataclasses.replace(PRESETS[preset], **{k: v for k, v in vars(args).items() if k in fields})
    cfg = dataclasses.replace(cfg, amp=precision.amp)
    if teacher is not None:
        weight, temperature = getattr(args, "kd_weight", KD_WEIGHT), getattr(args, "kd_temperature", KD_TEMPERATURE)
        cfg = dataclasses.replace(cfg, teacher=teacher.sha256, kd_weight=weight, kd_temperature=temperature)
    run = Path(args.out_dir)
    history = fit(
        mf,
        train,
        test,
        cfg,
        run,
        resume=args.resume,
        place=place,
        precision=precision,
        compile=args.compile,
        workers=args.workers,
        about={**about, "data": args.data, "val_data": args.val_data, "preset": preset},
        teacher=None if teacher is None else teacher.model_file.model,
    )
    if place.writer:
        h = history[-1]
        score = "no evaluation" if h["test_top1"] is None else f"test top-1 {h['test_top1']:.2f}%"
        print(
            f"wrote {run}/last.pt after epoch {h['epoch']} ({score}); per-epoch metrics in {run}/metrics.jsonl",
            file=sys.stderr,
        )


if __name__ == "__main__":
    sys.exit(main())
