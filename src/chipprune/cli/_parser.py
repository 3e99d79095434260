"""The `chip` command line's options: one function per subcommand, each a table of options."""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from .. import __version__
from ..criteria import CRITERIA
from ..deploy.export import FORMATS
from ..deploy.quantize import INT8, METHODS
from ..pruning.budgets import ALLOCATIONS, RESIDUAL_MODES, RUNTIMES
from ..pruning.latency import Runner
from ..training.loop import KD_TEMPERATURE, KD_WEIGHT, PRESETS, Config
from ..training.precision import AMP_CHOICES
from ._arguments import OneLineParser, arch, device, model_kwargs, non_negative, number, opset, positive, seed
from ._commands import (
    ProfileTiming,
    cmd_eval,
    cmd_export,
    cmd_finetune,
    cmd_import,
    cmd_profile,
    cmd_prune,
    cmd_score,
    cmd_train,
)

DESCRIPTION = "The `chip` command: profile, import, score, prune, evaluate, fine-tune and train CNNs with CHIP."


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = OneLineParser(prog="chip", description=DESCRIPTION, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"chipprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _profile(sub, fmt)
    _export(sub, fmt)
    _import(sub, fmt)
    _score(sub, fmt)
    _prune(sub, fmt)
    _eval(sub, fmt)
    _finetune(sub, fmt)
    _train(sub, fmt)
    return parser


def _profile(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """`chip profile`: its options."""
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
    timing, hidden = ProfileTiming(), argparse.SUPPRESS  # given without --latency: refused
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


def _export(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """`chip export`: its options."""
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
    p.add_argument("--json", action="store_true", help="print the result as JSON to stdout")
    q = p.add_argument_group("int8: onnxruntime's static quantization, checked on test images before it is kept")
    q.add_argument("--int8", action="store_true", help="write an int8 model (with --format onnx and --data)")
    hidden = argparse.SUPPRESS  # given without --int8: refused
    q.add_argument("--data", default=hidden, help="calibrate on its train split, check on its test (default: none)")
    q.add_argument("--calibration-images", type=positive, default=hidden,
                   help=f"seeded training images to calibrate on (default: {INT8.calibration_images})")  # fmt: skip
    q.add_argument("--calibration-method", choices=METHODS, default=hidden,
                   help=f"how activation ranges are chosen (default: {INT8.method})")  # fmt: skip
    q.add_argument("--check-images", type=positive, default=hidden,
                   help=f"seeded test images the int8 model is checked on (default: {INT8.check_images})")  # fmt: skip
    q.add_argument("--int8-tolerance", type=number(0, 100), default=hidden,
                   help=f"top-1 points the int8 model may lose (default: {INT8.tolerance:g})")  # fmt: skip
    q.add_argument("--seed", type=seed, default=hidden, help=f"picks the images used (default: {INT8.seed})")
    q.add_argument("--ignore-class-names", action="store_true", default=hidden,
                   help="take classes of other names, matched by position (default: off)")  # fmt: skip
    p.set_defaults(sized_by="--batch-size")
    p.set_defaults(run=cmd_export)


def _import(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """`chip import`: its options."""
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


def _score(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """`chip score`: its options."""
    p = sub.add_parser("score", help="score every prunable channel on calibration images", formatter_class=fmt)
    p.add_argument("model", help="a chipprune model file")
    p.add_argument("--out", required=True, help="the scores JSON to write")
    _add_scoring_options(p, data_required=False)
    p.set_defaults(run=cmd_score)


def _prune(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """`chip prune`: its options."""
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
        help="with --flops-target or --ratio: rank all groups' channels together (--allocate global)",
    )
    p.add_argument(
        "--allocate",
        choices=ALLOCATIONS,
        default=argparse.SUPPRESS,
        help="with --flops-target, --ratio or --latency-target, how the cut is spread over the groups: uniform (one "
        "ratio for every group), global (one ranking of all groups' scores, as --global; not with --latency-target) "
        "or, with --flops-target or --latency-target, sensitivity (each group's width chosen by its measured loss when "
        "pruned alone; needs --data; docs/any-cnn.md, Budgets) (default: uniform)",
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
        type=non_negative,
        default=0,
        metavar="B",
        help="after pruning, re-estimate BatchNorm statistics on B training batches of --batch-size "
        "(train mode, no weight update; needs --data); 0: keep the parent's",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON to stdout")
    _add_scoring_options(p, data_required=False)
    p.set_defaults(run=cmd_prune)


def _eval(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """`chip eval`: its options."""
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


def _finetune(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """`chip finetune`: its options."""
    p = sub.add_parser("finetune", help="fine-tune a (pruned) model file; also under torchrun", formatter_class=fmt)
    p.add_argument("model", help="a chipprune model file (with --resume, the run's last.pt holds the weights)")
    _add_training_options(p, "the architecture's: paper-cifar, paper-imagenet for 224-px ones")
    _add_teacher_options(p)
    p.set_defaults(run=cmd_finetune)


def _train(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """`chip train`: its options."""
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
