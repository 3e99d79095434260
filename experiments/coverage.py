"""prune_model on every torchvision classification model and one model of every timm CNN family, with random weights,
beside Torch-Pruning's own pruner on the same model in the same run.

    python experiments/coverage.py [--size 224] [--log results/coverage/coverage-224.jsonl] [--only NAME ...]
    python experiments/coverage.py --latency --size 64   # -> results/coverage/latency-64.jsonl

Each model runs in a forked process of its own (a hang is cut at --timeout seconds): prune_model(flops_target=0.5)
with CHIP on one random image, then Torch-Pruning 1.6.1's MetaPruner with MagnitudeImportance at pruning_ratio 0.3 (the
classifier ignored). With --latency, on a sample of the families instead: prune_to_latency at 0.5 of the dense
latency, timed in eager PyTorch, one thread, 3 runs per table entry (9 per whole-model check), a table of its own. One
JSON line per model goes to --log; a rerun skips the models logged. The markdown table is written into
docs/any-cnn.md between the coverage (or latency) markers of the input size."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from chipprune.models.external import TIMM_FAMILIES

# The smallest member of every covered timm family, larger members of two (CI prunes the smaller ones), and two
# transformers, for the one-line error that names the attention they cannot be pruned through.
TIMM = [*TIMM_FAMILIES.values(), "cspdarknet53", "nfnet_l0", "vit_tiny_patch16_224", "mobilevit_xs"]
# The latency row's sample: the three families whose groups span several layers (ShuffleNet's channel-shuffled stages,
# MixNet's split convs, RexNet's partial residuals), where the latency table once asked for a conv of 0 outputs, and
# one family of each other kind of block (plain and bottleneck residuals, inverted residuals with squeeze-excitation,
# concatenations, grouped convs, split attention, ConvNeXt blocks, deep aggregation).
LATENCY = [
    "tv:shufflenet_v2_x0_5",
    "timm:mixnet_s",
    "timm:rexnet_100",
    "tv:resnet18",
    "tv:mobilenet_v3_small",
    "tv:squeezenet1_1",
    "tv:googlenet",
    "tv:regnet_y_400mf",
    "timm:efficientnet_b0",
    "timm:ghostnet_050",
    "timm:resnest14d",
    "timm:convnext_atto",
    "timm:dla46_c",
]
LATENCY_TARGET = 0.5


def models() -> list[str]:
    """Every torchvision classification builder, then the timm families."""
    import torchvision

    return [f"tv:{n}" for n in torchvision.models.list_models(module=torchvision.models)] + [f"timm:{n}" for n in TIMM]


def build(name: str, size: int) -> Any:
    """The model with random weights and 10 classes."""
    source, arch = name.split(":")
    if source == "tv":
        import torchvision

        extra = {"aux_logits": False, "init_weights": True} if arch in ("googlenet", "inception_v3") else {}
        extra |= {"image_size": size} if arch.startswith("vit_") else {}
        return torchvision.models.get_model(arch, weights=None, num_classes=10, **extra)
    import timm

    return timm.create_model(
        arch, pretrained=False, num_classes=10, **({"img_size": size} if arch.startswith("vit_") else {})
    )


def one(name: str, size: int, part: str) -> dict:
    """One model's row: `part` "chip" (prune_model) or "tp" (Torch-Pruning alone)."""
    import torch

    from chipprune.profile import count_macs, count_params
    from chipprune.pruning.graph import prune_model

    torch.manual_seed(0)
    size = max(size, 96) if "inception" in name else size  # its stem needs 75 pixels at least
    model = build(name, size).eval()
    x = torch.randn(1, 3, size, size)
    try:
        row: dict = {"params": count_params(model), "flops": count_macs(model, x)}
    except RuntimeError as e:  # maxvit_t's windows need 224 pixels
        return {"status": f"the unpruned model does not run at {size}x{size}: {str(e).strip().splitlines()[0]}"}
    start = time.time()
    try:
        if part == "chip":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pruned = prune_model(model, x, [x], flops_target=0.5)
            coarse = [str(w.message) for w in caught if "allow no point" in str(w.message)]
            row["note"] = coarse[0] if coarse else ""
        elif part == "latency":
            pruned, row["latency"] = _latency(model, x)
        else:
            pruned = _torch_pruning(model, x)
        row["seconds"] = round(time.time() - start, 1)
        with torch.no_grad():
            out, ref = pruned.eval()(x), model(x)
        row |= {
            "params_after": count_params(pruned),
            "flops_after": count_macs(pruned, x),
            "status": "OK" if out.shape == ref.shape else f"output {tuple(out.shape)} != {tuple(ref.shape)}",
        }
    except Exception as e:  # the row records any failure
        row |= {
            "seconds": round(time.time() - start, 1),
            "status": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
        }
    return row


def _latency(model: Any, x: Any) -> tuple[Any, dict]:
    """prune_to_latency at LATENCY_TARGET (eager, one thread, 3 runs per table entry, a table of its own), and how."""
    from chipprune.pruning.graph import prune_to_latency
    from chipprune.pruning.latency import Runner

    runner = Runner("eager", threads=1, repeats=3, warmup=1)
    with tempfile.TemporaryDirectory() as cache, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned, report = prune_to_latency(model, x, [x], LATENCY_TARGET, runner, cache=cache)
    missed = [str(w.message) for w in caught if "latency_target" in str(w.message)]
    return pruned, {
        "dense_ms": report.dense.median_ms,
        "pruned_ms": report.pruned.median_ms,
        "predicted_ms": report.predicted_ms,
        "rounds": report.rounds,
        "layers_measured": report.measured_layers,
        "note": missed[0] if missed else "",
    }


def _torch_pruning(model: Any, x: Any) -> Any:
    """Torch-Pruning alone: MetaPruner, L2 magnitude, ratio 0.3, the output layer ignored."""
    import torch_pruning as tp
    from torch import nn

    last = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)][-1:]
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.3, ignored_layers=last
    )
    pruner.step()
    return model


def run(name: str, size: int, timeout: int, parts: tuple[str, ...] = ("chip", "tp")) -> dict:
    """The parts of one model's row (chip, tp; or latency), each in a child process forked from this one (torch
    already imported); tp's keys prefixed."""
    context = multiprocessing.get_context("fork")
    row: dict = {"model": name, "size": size}
    for part in parts:
        results = context.Queue()
        child = context.Process(target=_child, args=(name, size, part, results))
        child.start()
        try:
            result = results.get(timeout=timeout)
        except queue.Empty:
            result = {"status": f"unfinished after {timeout} s", "seconds": timeout}
        child.join(5)
        if child.is_alive():
            child.kill()
        row |= {f"tp_{k}" if part == "tp" else k: v for k, v in result.items()}
    return row


def _child(name: str, size: int, part: str, results: Any) -> None:
    """One part of a row, put on `results` (a crash is a row too)."""
    try:
        results.put(one(name, size, part))
    except BaseException as e:  # the model could not even be built
        results.put({"status": f"{type(e).__name__}: {str(e).strip()[:200]}"})


def table(rows: list[dict]) -> str:
    """The markdown coverage table."""
    lines = [
        "| model | params | GFLOPs | GFLOPs after | s to prune | status | Torch-Pruning alone (ratio 0.3) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        after = f"{r['flops_after'] / 1e9:.3f} ({r['flops_after'] / r['flops']:.3f})" if "flops_after" in r else ""
        status = r["status"] + (f" ({r['note']})" if r.get("note") else "")
        tp_status = r.get("tp_status", "")
        tp_status = "prunes" if tp_status == "OK" else tp_status
        lines.append(
            f"| {r['model']} | {r.get('params', 0) / 1e6:.1f} M | {r.get('flops', 0) / 1e9:.3f} | {after} "
            f"| {r.get('seconds', '')} | {status.replace('|', '/')} | {tp_status.replace('|', '/')} |"
        )
    return "\n".join(lines)


def latency_table(rows: list[dict]) -> str:
    """The markdown table of the latency row."""
    lines = [
        "| model | params | GFLOPs | GFLOPs after | latency after: measured (predicted) x dense | dense ms | checks "
        "| s to prune | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        after = f"{r['flops_after'] / 1e9:.3f} ({r['flops_after'] / r['flops']:.3f})" if "flops_after" in r else ""
        t = r.get("latency")
        ratio = f"{t['pruned_ms'] / t['dense_ms']:.3f} ({t['predicted_ms'] / t['dense_ms']:.3f})" if t else ""
        dense, rounds = (f"{t['dense_ms']:.2f}", t["rounds"]) if t else ("", "")
        status = r["status"] + (" (missed: measured above the target)" if t and t["note"] else "")
        lines.append(
            f"| {r['model']} | {r.get('params', 0) / 1e6:.1f} M | {r.get('flops', 0) / 1e9:.3f} | {after} | {ratio} "
            f"| {dense} | {rounds} | {r.get('seconds', '')} | {status.replace('|', '/')} |"
        )
    return "\n".join(lines)


def publish(text: str, doc: Path, marker: str) -> None:
    """Replace the table between the markers `<!-- marker -->` and `<!-- /marker -->` in `doc`."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    head, rest = doc.read_text().split(start, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--log", default=None, help="default: results/coverage/coverage-SIZE.jsonl")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per model and part")
    parser.add_argument("--only", nargs="*", help="these models (tv:NAME, timm:NAME) only")
    parser.add_argument("--latency", action="store_true", help="the latency row, on its sample of the families")
    parser.add_argument("--doc", default="docs/any-cnn.md")
    args = parser.parse_args()
    import timm  # noqa: F401  imported once, before the children fork
    import torch
    import torchvision  # noqa: F401

    torch.set_num_threads(1)  # one thread per child: forking a process that runs OpenMP teams can hang
    kind = "latency" if args.latency else "coverage"
    log = Path(args.log or f"results/coverage/{kind}-{args.size}.jsonl")
    log.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(ln)["model"] for ln in log.read_text().splitlines()} if log.exists() else set()
    for name in args.only or (LATENCY if args.latency else models()):
        if name not in done:
            row = run(name, args.size, args.timeout, ("latency",) if args.latency else ("chip", "tp"))
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            beside = "" if args.latency else f"; Torch-Pruning: {row.get('tp_status')}"
            print(f"{name}: {row['status']} ({row.get('seconds')} s){beside}", flush=True)
    rows = [json.loads(ln) for ln in log.read_text().splitlines()]
    publish((latency_table if args.latency else table)(rows), Path(args.doc), f"{kind} {args.size}")


if __name__ == "__main__":
    main()
