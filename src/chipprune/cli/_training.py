"""`chip finetune` and `chip train`: a run folder from a model file or an architecture."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .. import api
from ..models import external
from ..training.loop import KD_TEMPERATURE, KD_WEIGHT, PRESETS, Config
from ._arguments import UsageError


def cmd_finetune(args: argparse.Namespace) -> None:
    """Fine-tune a model file into a run folder."""
    if args.teacher is None and ("kd_weight" in args or "kd_temperature" in args):
        raise UsageError("--kd-weight and --kd-temperature apply to --teacher")
    mf = api.load_model(args.model)
    preset = getattr(args, "preset", None) or mf.finetune_preset
    config = _config(args, preset)
    if args.teacher is not None:
        weight, temperature = getattr(args, "kd_weight", KD_WEIGHT), getattr(args, "kd_temperature", KD_TEMPERATURE)
        config = dataclasses.replace(config, kd_weight=weight, kd_temperature=temperature)
    run = api.finetune(mf, args.data, args.out_dir, config, teacher=args.teacher, preset=preset,
                       val_data=args.val_data, ignore_class_names=args.ignore_class_names, resume=args.resume,
                       execution=_execution(args))  # fmt: skip
    _wrote(run)


def cmd_train(args: argparse.Namespace) -> None:
    """Train an architecture from scratch into a run folder."""
    if not external.is_external(args.arch):
        given = [o for o, v in (("--model-kwargs", args.model_kwargs), ("--input-size", args.input_size)) if v]
        if given:
            raise UsageError(f"{' and '.join(given)}: not here, they are for library models")
    preset = getattr(args, "preset", "baseline-cifar")
    run = api.train(
        args.arch, args.data, args.out_dir, _config(args, preset), model_kwargs=args.model_kwargs,
        input_size=args.input_size, normalize=args.normalize, preset=preset, val_data=args.val_data,
        ignore_class_names=args.ignore_class_names, resume=args.resume, execution=_execution(args),
    )  # fmt: skip
    _wrote(run)


def _config(args: argparse.Namespace, preset: str) -> Config:
    """The preset with the options given on the command line (distillation's apart: they go with a teacher)."""
    fields = {f.name for f in dataclasses.fields(Config)} - {"amp", "teacher", "kd_weight", "kd_temperature"}
    return dataclasses.replace(PRESETS[preset], **{k: v for k, v in vars(args).items() if k in fields})


def _execution(args: argparse.Namespace) -> api.Execution:
    return api.Execution(args.device, args.amp, args.channels_last, args.compile, args.workers)


def _wrote(run: api.Run) -> None:
    """Say where the run's results are (the main process only)."""
    if run.is_main:
        h = run.history[-1]
        score = "no evaluation" if h["test_top1"] is None else f"test top-1 {h['test_top1']:.2f}%"
        print(f"wrote {run.last} after epoch {h['epoch']} ({score}); per-epoch metrics in {run.out_dir}/metrics.jsonl",
              file=sys.stderr)  # fmt: skip
