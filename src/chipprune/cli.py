"""The `chip` command: profile, import, score, prune and evaluate CNNs with CHIP."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import __version__, sparsity
from .calibrate import CalibrationError, score_layers
from .criteria import CRITERIA, ActivationCriterion, get_criterion
from .data import DataError, ImageSplit, batches, load_split
from .evaluate import evaluate
from .fileio import save_json
from .modelfile import ModelFile, ModelFileError, import_weights, load_model
from .models import ARCHS, create_model, get_arch
from .profile import count_flops, count_params
from .surgery import RESIDUAL_MODES, prune

SCORES_FORMAT = "chipprune-scores/1"


class UsageError(ValueError):
    """A request the command cannot carry out as given."""


def main(argv: list[str] | None = None) -> int:
    """Run the command line; exit code 2 with one line on stderr for bad input."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (UsageError, ModelFileError, DataError, CalibrationError, sparsity.SparsityError) as e:
        if os.environ.get("CHIP_DEBUG"):
            raise
        print(f"chip {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"chip {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="chip", description=__doc__, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"chipprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("profile", help="parameters and FLOPs of a model file or of an architecture at a sparsity",
                       formatter_class=fmt)
    p.add_argument("model", nargs="?", help="a chipprune model file (instead of --arch)")
    p.add_argument("--arch", choices=list(ARCHS), help="a registry architecture")
    p.add_argument("--sparsity", help="rates ('[0.]+[0.15]*2+[0.4]*27', '0,0.1,…') or a preset ('paper-1')")
    p.add_argument("--json", action="store_true", help="print JSON to stdout")
    p.set_defaults(run=cmd_profile)

    p = sub.add_parser("import", help="convert third-party weights into a chipprune model file", formatter_class=fmt)
    p.add_argument("--arch", required=True, choices=list(ARCHS), help="the architecture the weights are for")
    p.add_argument("--weights", required=True, help="a state_dict, or a dict holding one under 'state_dict'")
    p.add_argument("--out", required=True, help="the model file to write")
    p.add_argument("--normalize", default="imagenet",
                   help="input normalization the weights were trained with: imagenet, cifar, or m1,m2,m3:s1,s2,s3")
    p.set_defaults(run=cmd_import)

    p = sub.add_parser("score", help="score every prunable channel on calibration images", formatter_class=fmt)
    p.add_argument("model", help="a chipprune model file")
    p.add_argument("--out", required=True, help="the scores JSON to write")
    _add_scoring_options(p, data_required=False)
    p.set_defaults(run=cmd_score)

    p = sub.add_parser("prune", help="remove the lowest-scored channels: a smaller dense model", formatter_class=fmt)
    p.add_argument("model", help="a chipprune model file")
    p.add_argument("--sparsity", required=True, help="rates or a preset, as the paper's lists")
    p.add_argument("--out", required=True, help="the pruned model file to write")
    p.add_argument("--scores", help="scores JSON from `chip score` (skips calibration)")
    p.add_argument("--residual", choices=RESIDUAL_MODES, default="coupled",
                   help="coupled: one channel set per residual stage; paper: per block, shortcuts by position")
    p.add_argument("--json", action="store_true", help="print the result as JSON to stdout")
    _add_scoring_options(p, data_required=False)
    p.set_defaults(run=cmd_prune)

    p = sub.add_parser("eval", help="top-1/top-5 accuracy on a data split", formatter_class=fmt)
    p.add_argument("model", help="a chipprune model file")
    p.add_argument("--data", required=True, help="dataset source (see README: CIFAR archive, image folder, tarball)")
    p.add_argument("--split", default="test", choices=("test", "val", "train"), help="which split")
    p.add_argument("--batch-size", type=_positive, default=256, help="images per forward pass")
    p.add_argument("--limit", type=_positive, help="evaluate only the first N images")
    p.add_argument("--workers", type=int, default=0, help="loader processes for large images")
    p.add_argument("--device", default=_default_device(), help="torch device")
    p.add_argument("--json", action="store_true", help="print JSON to stdout")
    p.set_defaults(run=cmd_eval)
    return parser


def _add_scoring_options(p: argparse.ArgumentParser, data_required: bool) -> None:
    p.add_argument("--data", required=data_required,
                   help="dataset source; calibration images come from its train split")
    p.add_argument("--criterion", choices=CRITERIA, default="chip", help="how channels are ranked")
    p.add_argument("--batches", type=_positive, default=5, help="calibration batches")
    p.add_argument("--batch-size", type=_positive, default=128, help="calibration batch size")
    p.add_argument("--seed", type=int, default=0, help="picks the calibration images; seeds the random criterion")
    p.add_argument("--workers", type=int, default=0, help="loader processes for large images")
    p.add_argument("--device", default=_default_device(), help="torch device")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _emit(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    """JSON on stdout with --json, else a human summary."""
    print(json.dumps(result, indent=1) if getattr(args, "json", False) else text)


def _sizes(model: torch.nn.Module, base: torch.nn.Module, input_size: int) -> dict[str, Any]:
    params, flops = count_params(model), count_flops(model, input_size)
    base_params, base_flops = count_params(base), count_flops(base, input_size)
    return {"params": params, "flops": flops, "base_params": base_params, "base_flops": base_flops,
            "params_reduction": 1 - params / base_params, "flops_reduction": 1 - flops / base_flops}


def _sizes_text(r: dict[str, Any]) -> str:
    return (f"params {r['params']:,} ({100 * r['params_reduction']:.1f}% fewer than {r['base_params']:,})\n"
            f"FLOPs  {r['flops']:,} ({100 * r['flops_reduction']:.1f}% fewer than {r['base_flops']:,})")


def cmd_profile(args: argparse.Namespace) -> None:
    """Print params and FLOPs."""
    if (args.model is None) == (args.arch is None):
        raise UsageError("give either a model file or --arch")
    if args.model:
        if args.sparsity:
            raise UsageError("--sparsity applies to --arch; a model file already has its widths")
        mf = load_model(args.model)
        arch, model = mf.arch, mf.model
        num_classes = len(mf.classes)
    else:
        arch = args.arch
        num_classes = get_arch(arch).num_classes
        widths = sparsity.widths(arch, args.sparsity) if args.sparsity else None
        model = create_model(arch, widths)
    result = {"arch": arch, **_sizes(model, create_model(arch, None, num_classes), get_arch(arch).input_size)}
    if args.sparsity:
        result["sparsity"] = sparsity.format_rates(sparsity.resolve(arch, args.sparsity))
    _emit(args, result, f"{arch}\n{_sizes_text(result)}")


def cmd_import(args: argparse.Namespace) -> None:
    """Convert weights and save a model file."""
    mf = import_weights(args.arch, args.weights, args.normalize)
    mf.save(args.out)
    print(f"wrote {args.out}: {args.arch}, {len(mf.classes)} classes, "
          f"{count_params(mf.model):,} params", file=sys.stderr)


def _calibration(args: argparse.Namespace, mf: ModelFile) -> Iterator[tuple[Tensor, Tensor]]:
    """The seeded calibration batches from the train split."""
    if not args.data:
        raise UsageError(f"--data is needed to score with {args.criterion}")
    train = load_split(args.data, "train")
    _check_classes(train, mf)
    wanted = args.batches * args.batch_size
    if len(train) < wanted:
        print(f"warning: asked for {wanted} calibration images, the train split has {len(train)}: using them all",
              file=sys.stderr)
    return batches(train, args.batch_size, mean=mf.mean, std=mf.std, shuffle=True, seed=args.seed, limit=wanted,
                   workers=args.workers, image_size=get_arch(mf.arch).input_size)


def _check_classes(split: ImageSplit, mf: ModelFile) -> None:
    if len(split.classes) != len(mf.classes):
        raise UsageError(f"the data has {len(split.classes)} classes, the model {len(mf.classes)}")


def _scores(args: argparse.Namespace, mf: ModelFile) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Scores of every prunable conv, computed or read from --scores, and how they were made."""
    layers = mf.model.channel_layers()  # type: ignore[operator]
    if getattr(args, "scores", None):
        return _read_scores(args.scores, mf)
    criterion = get_criterion(args.criterion, args.seed)
    batches_ = _calibration(args, mf) if isinstance(criterion, ActivationCriterion) else iter(())
    scores, images = score_layers(mf.model, layers, criterion, batches_, device=args.device, progress=True)
    return scores, {"criterion": criterion.name, "images": images, "seed": args.seed}


def _read_scores(path: str, mf: ModelFile) -> tuple[dict[str, Tensor], dict[str, Any]]:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read scores JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != SCORES_FORMAT:
        raise UsageError(f"{path}: not a scores file written by `chip score`")
    widths = mf.model.widths
    layers = d.get("layers", {})
    for conv, c in widths.items():
        if not isinstance(layers.get(conv), list) or len(layers[conv]) != c:
            raise UsageError(f"{path}: no scores for the {c} channels of {conv}; were they made for another model?")
    scores = {conv: torch.tensor(layers[conv], dtype=torch.float64) for conv in widths}
    return scores, {k: d[k] for k in ("criterion", "images", "seed") if k in d}


def cmd_score(args: argparse.Namespace) -> None:
    """Score every prunable channel and save the scores."""
    mf = load_model(args.model)
    scores, how = _scores(args, mf)
    save_json({"format": SCORES_FORMAT, "arch": mf.arch, **how,
               "layers": {conv: s.tolist() for conv, s in scores.items()}}, args.out)
    print(f"wrote {args.out}: {how['criterion']} scores of {len(scores)} layers"
          + (f" from {how['images']} images" if how["images"] else ""), file=sys.stderr)


def cmd_prune(args: argparse.Namespace) -> None:
    """Prune to a sparsity and save the smaller model."""
    mf = load_model(args.model)
    widths = sparsity.widths(mf.arch, args.sparsity)
    scores, how = _scores(args, mf)
    try:
        pruned = prune(mf.model, scores, widths, args.residual)
    except ValueError as e:
        raise UsageError(str(e)) from None
    rates = sparsity.format_rates(sparsity.resolve(mf.arch, args.sparsity))
    meta = {**mf.meta, "pruned": {"sparsity": rates, "residual": args.residual, **how,
                                  "parent": Path(args.model).name}}
    ModelFile(mf.arch, pruned, mf.mean, mf.std, mf.classes, meta).save(args.out)
    result = {"arch": mf.arch, "sparsity": rates, "residual": args.residual, **how, "out": args.out,
              **_sizes(pruned, create_model(mf.arch, None, len(mf.classes)), get_arch(mf.arch).input_size)}
    _emit(args, result, f"wrote {args.out}: {mf.arch} at {rates}, {how['criterion']}, residual {args.residual}\n"
          + _sizes_text(result))


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a model file on a split."""
    mf = load_model(args.model)
    split = load_split(args.data, args.split)
    _check_classes(split, mf)
    stream = batches(split, args.batch_size, mean=mf.mean, std=mf.std, limit=args.limit, workers=args.workers,
                     image_size=get_arch(mf.arch).input_size)
    result = {"model": args.model, "split": args.split,
              **evaluate(mf.model, stream, device=args.device, progress=True)}
    _emit(args, result, f"{args.model} on {args.split}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
          f"({result['images']} images)")


if __name__ == "__main__":
    sys.exit(main())
