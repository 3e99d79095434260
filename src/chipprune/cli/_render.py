"""What the `chip` commands print: a text summary, or with --json the result as JSON on stdout."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .. import api
from ..files.modelfile import ModelFile
from ..profile import count_params
from ..pruning import sparsity

Shown = tuple[dict[str, Any], str]  # (the --json result, the text)


def emit(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    """JSON on stdout with --json, else the text summary."""
    print(json.dumps(result, indent=1) if getattr(args, "json", False) else text)


def emit_stderr(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    """JSON on stdout with --json, else the text summary on stderr (a command whose output is a file)."""
    if getattr(args, "json", False):
        print(json.dumps(result, indent=1))
    else:
        print(text, file=sys.stderr)


def exported(out: str, fmt: str, error: float) -> Shown:
    """`chip export`: the file and its check against PyTorch."""
    result = {"out": out, "format": fmt, "max_relative_error": error}
    return result, f"wrote {out}: {fmt}, max relative error against PyTorch {error:.1e}"


def int8(out: str, r: api.Int8Report) -> Shown:
    """`chip export --int8`: the file, its check against the float model, and its size."""
    result = {"out": out, "format": "onnx", "int8": True, **r._asdict()}
    text = (f"wrote {out}: int8 onnx, {r.bytes:,} bytes ({r.float_bytes:,} as float); top-1 on {r.check_images} test "
            f"images {r.int8_top1:.2f} % (float {r.float_top1:.2f} %, same class on {r.agreement:.1f} %); calibrated "
            f"on {r.calibration_images} training images ({r.method})")  # fmt: skip
    return result, text


def sizes_text(r: dict[str, Any]) -> str:
    """Parameters and FLOPs against the unpruned architecture's."""
    return (
        f"params {r['params']:,} ({100 * r['params_reduction']:.1f}% fewer than {r['base_params']:,})\n"
        f"FLOPs  {r['flops']:,} ({100 * r['flops_reduction']:.1f}% fewer than {r['base_flops']:,})"
    )


def rounded_text(result: dict[str, Any]) -> str:
    """The kept counts --round-to changed."""
    changes = ", ".join(f"{r['floor']}->{r['kept']} ({r['layers']} convs)" for r in result["rounded"])
    return f"round-to {result['round_to']}: paper floor -> kept: {changes or 'no change'}"


def profile(p: api.Profile, rates: str | None, round_to: int | None) -> Shown:
    """`chip profile`: sizes, the rates asked, and the latency measured."""
    result: dict[str, Any] = {"arch": p.arch, **p.sizes.fields()}
    if rates:
        result["sparsity"] = sparsity.format_rates(sparsity.resolve(p.arch, rates))
    text = f"{p.arch}\n{sizes_text(result)}"
    if rates and round_to:
        result["round_to"] = round_to
        result["rounded"] = [r._asdict() for r in sparsity.rounding(p.arch, rates, round_to)]
        text += "\n" + rounded_text(result)
    if p.latency_ms is not None:
        result["latency_ms"], result["threads"] = p.latency_ms, p.threads
        text += "".join(
            f"\nbatch {b}: {r['median_ms']:.2f} ms median ({r['min_ms']:.2f}–{r['max_ms']:.2f})"
            for b, r in p.latency_ms.items()
        )
    return result, text


def imported(out: str, mf: ModelFile) -> str:
    """`chip import`: what was written."""
    return f"wrote {out}: {mf.arch}, {len(mf.classes)} classes, {count_params(mf.model):,} params"


def scored(out: str, scores: api.Scores) -> str:
    """`chip score`: what was written."""
    images = scores.provenance["images"]
    return (
        f"wrote {out}: {scores.provenance['criterion']} scores of {len(scores.values)} "
        f"{'groups' if scores.of == 'groups' else 'layers'}"
        + (f" from {images} image{'s' * (images != 1)}" if images else "")
    )


def pruned(p: api.Pruned, out: str) -> Shown:
    """`chip prune`: the budget, the scores' record, the sizes, and what round_to and the latency search did."""
    report, arch = p.report, p.model_file.arch
    result = {"arch": arch, **report.asked, **report.provenance, "out": out, **report.sizes.fields()}
    asked = ", ".join(f"{k} {v}" for k, v in report.asked.items() if v is not None)
    text = f"wrote {out}: {arch}, {asked}, {report.provenance['criterion']}\n" + sizes_text(result)
    if report.rounded is not None:
        result["rounded"] = report.rounded
        text += "\n" + rounded_text(result)
    if "latency" in report.provenance:
        t = report.provenance["latency"]
        text += (
            f"\nlatency ({t['runtime']}, batch {t['batch_size']}, {t['threads']} threads): dense "
            f"{t['dense_ms']:.3f} ms, pruned {t['pruned_ms']:.3f} ms measured ({t['pruned_ms'] / t['dense_ms']:.3f}x;"
            f" predicted {t['predicted_ms']:.3f} ms) after {t['rounds']} round(s)"
        )
    return result, text


def evaluated(model: str, split: str, seed: int, m: api.Metrics) -> Shown:
    """`chip eval`: top-1 and top-5, over how many images, in what precision."""
    result: dict[str, Any] = {"model": model, "split": split, "top1": m.top1, "top5": m.top5, "images": m.images,
                              "precision": m.precision.amp}  # fmt: skip
    if m.sample_of is not None:
        result["sample"] = {"of": m.sample_of, "seed": seed}
    sample = f", a random sample of the {m.sample_of} with seed {seed}" if m.sample_of is not None else ""
    text = (
        f"{model} on {split}: top-1 {m.top1:.2f}%  top-5 {m.top5:.2f}%  ({m.images} images{sample}), "
        f"{m.precision.describe()}"
    )
    return result, text
