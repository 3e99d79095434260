"""`chip finetune` and `chip train`: a run folder from a model file or an architecture."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

from ..data import ImageSplit
from ..files.modelfile import ModelFile, library_model, load_model, parse_normalization
from ..models import create_model, external
from ..training.distributed import Place, distributed
from ..training.loop import KD_TEMPERATURE, KD_WEIGHT, PRESETS, Config, Teacher, fit, load_data, load_teacher
from ..training.precision import choose
from ..training.runs import check_run_folder
from ._arguments import UsageError


def cmd_finetune(args: argparse.Namespace) -> None:
    """Fine-tune a model file into a run folder."""
    mf = load_model(args.model)
    if args.teacher is None and ("kd_weight" in args or "kd_temperature" in args):
        raise UsageError("--kd-weight and --kd-temperature apply to --teacher")
    teacher = None if args.teacher is None else load_teacher(args.teacher, mf, args.model)
    check_run_folder(args.out_dir, [args.model, None if teacher is None else teacher.path, args.data, args.val_data])
    with distributed(args.device) as place:
        train, test = load_data(args.data, args.val_data, args.train_subset, args.seed, place, args.ignore_class_names)
        mf.check_classes(train.classes, ignore_names=args.ignore_class_names)
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
        given = [o for o, v in (("--model-kwargs", args.model_kwargs), ("--input-size", args.input_size)) if v]
        if given:
            raise UsageError(f"{' and '.join(given)}: not here, they are for library models")
    mean, std = parse_normalization(args.normalize or "imagenet")
    with distributed(args.device) as place:
        train, test = load_data(args.data, args.val_data, args.train_subset, args.seed, place, args.ignore_class_names)
        torch.manual_seed(args.seed)  # the initial weights
        about = {"trained_from_scratch": args.arch}
        if library:
            kwargs = {"num_classes": len(train.classes), **args.model_kwargs}
            mf = library_model(args.arch, kwargs, input_size=args.input_size, normalize=args.normalize)
            mf.check_classes(train.classes, ignore_names=args.ignore_class_names)
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
