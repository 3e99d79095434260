"""Figures and markdown tables of the ResNet-56 study from the raw logs in results/reproduce/ (written by reproduce.py).

    python experiments/plots.py [--dir results/reproduce]

Writes accuracy_vs_flops.png, kept_channels.png, ci_distributions.png, calibration_size.png, stability.png and
tables.md into the same folder; a figure whose log is missing is skipped with a note."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CRITERIA = ["chip", "hrank", "l1", "random"]
COLORS = {"chip": "tab:red", "hrank": "tab:blue", "l1": "tab:green", "random": "tab:gray"}
MARKERS = {"chip": "o", "hrank": "s", "l1": "^", "random": "x"}
STAGES = {
    "a": "right after pruning",
    "b": "after BatchNorm re-estimation (4 x 128 images)",
    "c": "after 1 epoch on 5,000 images (19 steps)",
}
CONFIG_ORDER = ["paper-2", "paper-1", "inner-only"]
PAPER = {  # Sui et al. 2021, Table 1 (ResNet-56, CIFAR-10): top-1 % and FLOPs reduction
    "baseline": 93.26,
    "paper-1": (94.16, 47.4),
    "paper-2": (92.05, 72.3),
}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(s) for s in path.read_text().splitlines() if s.strip()] if path.exists() else []


def baselines(d: Path) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["arch"], r["stage"]): r for r in read_jsonl(d / "baselines.jsonl")}


def grouped(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], list[dict[str, Any]]]:
    """(config, mode, criterion, stage) -> rows (the seeds of random)."""
    out: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[(r["config"], r["mode"], r["criterion"], r["stage"])].append(r)
    return out


def fmt_top1(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "–"
    vals = [r["top1"] for r in rows]
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ({min(vals):.2f}–{max(vals):.2f})"


# --------------------------------------------------------------------------- figures


def plot_accuracy(d: Path, rows: list[dict[str, Any]], base: dict[tuple[str, str], dict[str, Any]]) -> None:
    g = grouped(rows)
    dense = base.get(("resnet56", "adapted"))
    dense_flops = (
        json.loads((d / "configs.json").read_text())["dense"]["flops"] if (d / "configs.json").exists() else 125_485_696
    )
    fig, axes = plt.subplots(3, 2, figsize=(11, 12), sharex=True)
    for col, mode in enumerate(["coupled", "paper"]):
        for row, stage in enumerate("abc"):
            ax = axes[row][col]
            for crit in CRITERIA:
                xs, ys, lo, hi = [], [], [], []
                for config in CONFIG_ORDER:
                    # inner-only ran once: the two modes keep the same channels there
                    rs = g.get((config, "coupled" if config == "inner-only" else mode, crit, stage), [])
                    if not rs:
                        continue
                    vals = [r["top1"] for r in rs]
                    xs.append(rs[0]["flops"] / 1e6)
                    ys.append(statistics.mean(vals))
                    lo.append(ys[-1] - min(vals))
                    hi.append(max(vals) - ys[-1])
                if not xs:
                    continue
                label = crit + (" (mean, min–max of 3 seeds)" if crit == "random" else "")
                ax.errorbar(
                    xs,
                    ys,
                    yerr=[lo, hi] if crit == "random" else None,
                    color=COLORS[crit],
                    marker=MARKERS[crit],
                    linestyle="-",
                    alpha=0.85,
                    capsize=3,
                    label=label,
                )
            if dense:
                ax.axhline(
                    dense["top1"],
                    color="k",
                    linestyle="--",
                    linewidth=1,
                    label=f"dense, adapted ({dense['top1']:.2f} %, {dense_flops / 1e6:.1f} M)",
                )
            ax.set_title(f"residual {mode}: {STAGES[stage]}", fontsize=10)
            ax.set_ylabel("test top-1 %")
            ax.grid(alpha=0.3)
            if row == 2:
                ax.set_xlabel("FLOPs (M multiply-accumulates per image)")
    for ax in axes[:, 1]:
        ax.annotate(
            "inner-only (73.4 M) is the coupled model:\nboth modes keep the same channels",
            xy=(0.3, 0.86),
            xycoords="axes fraction",
            fontsize=7,
            color="0.3",
        )
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle("ResNet-56 on JPEG CIFAR-10: paper-2 (34.2 M), paper-1 (65.2 M), inner-only (73.4 M)", fontsize=11)
    fig.tight_layout()
    fig.savefig(d / "accuracy_vs_flops.png", dpi=110)
    plt.close(fig)


def plot_kept(d: Path) -> None:
    configs = json.loads((d / "configs.json").read_text())
    names = list(configs["dense"]["widths"])
    fig, ax = plt.subplots(figsize=(14, 4.5))
    x = range(len(names))
    dense = configs["dense"]["widths"]
    ax.bar(x, [dense[n] for n in names], width=0.9, color="none", edgecolor="k", linewidth=0.6, label="dense")
    for i, (name, color) in enumerate((("inner-only", "tab:green"), ("paper-1", "tab:red"), ("paper-2", "tab:blue"))):
        w = configs[name]["widths"]
        ax.bar([k - 0.28 + 0.28 * i for k in x], [w[n] for n in names], width=0.28, color=color, label=name)
    ax.set_xticks(list(x))
    ax.set_xticklabels([n.replace("layer", "L").replace(".conv", ".c") for n in names], rotation=90, fontsize=6)
    ax.set_ylabel("kept output channels")
    ax.set_title("Kept channels per conv layer (stem, then per block: inner conv c1, output conv c2)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(d / "kept_channels.png", dpi=110)
    plt.close(fig)


def plot_ci(d: Path) -> None:
    scores = json.loads((d / "scores" / "chip.json").read_text())
    layers = scores["layers"]
    names = list(layers)
    fig, ax = plt.subplots(figsize=(14, 5))
    colors = ["tab:orange" if ".conv1" in n else "tab:purple" for n in names]
    parts = ax.boxplot([layers[n] for n in names], patch_artist=True, widths=0.6, flierprops={"markersize": 2})
    for patch, color in zip(parts["boxes"], colors, strict=True):
        patch.set_facecolor(color)
        patch.set_alpha(0.5)
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels([n.replace("layer", "L").replace(".conv", ".c") for n in names], rotation=90, fontsize=6)
    ax.set_ylabel("channel independence (symlog)")
    ax.set_title(
        f"CI of every channel per layer, adapted ResNet-56, {scores.get('images')} calibration images "
        "(orange: blocks' inner convs, purple: stem and block outputs)",
        fontsize=10,
    )
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(d / "ci_distributions.png", dpi=110)
    plt.close(fig)


def plot_calibration(d: Path) -> None:
    rows = read_jsonl(d / "calibration_size.jsonl")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, config in zip(axes, ["paper-1", "inner-only"], strict=True):
        for stage, color in (("a", "tab:red"), ("b", "tab:blue")):
            rs = [r for r in rows if r["config"] == config and r["stage"] == stage]
            ns = sorted({r["images"] for r in rs})
            if not ns:
                continue
            for r in rs:
                ax.scatter(r["images"], r["top1"], color=color, marker="o" if r["seed"] == 0 else "x", s=18)
            means = [statistics.mean(r["top1"] for r in rs if r["images"] == n) for n in ns]
            ax.plot(ns, means, color=color, label=STAGES[stage].replace(" (4 x 128 images)", ""))
        ax.set_xscale("log")
        ax.set_xticks([16, 64, 128, 640, 2560])
        ax.set_xticklabels(["16", "64", "128", "640", "2560"])
        ax.set_xlabel("calibration images (o seed 0, x seed 1; line: mean)")
        ax.set_title(f"CHIP, {config} (coupled)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test top-1 %")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(d / "calibration_size.png", dpi=110)
    plt.close(fig)


def plot_stability(d: Path) -> None:
    st = json.loads((d / "stability.json").read_text())
    fig, ax = plt.subplots(figsize=(13, 4))
    names: list[str] = []
    for crit, color in (("chip", "tab:red"), ("hrank", "tab:blue")):
        if crit not in st["criteria"]:
            continue
        layers = st["criteria"][crit]["layers"]
        names = list(layers)
        x = range(len(names))
        ax.plot(
            x,
            [layers[n]["mean"] for n in names],
            color=color,
            marker="o",
            markersize=3,
            label=f"{crit}: mean over the 6 pairs of sets",
        )
        ax.plot(x, [layers[n]["min"] for n in names], color=color, linestyle=":", label=f"{crit}: min")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace("layer", "L").replace(".conv", ".c") for n in names], rotation=90, fontsize=6)
    ax.set_ylabel("Spearman correlation")
    ax.set_title(f"Ranking stability: {st['sets']} disjoint calibration sets of {st['images_per_set']} images")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(d / "stability.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- tables


def tables(d: Path, rows: list[dict[str, Any]], base: dict[tuple[str, str], dict[str, Any]]) -> str:
    out = []
    out.append("### Baselines\n\n| network | stage | epochs | top-1 % | top-5 % | wall s |\n|---|---|---|---|---|---|")
    for (arch, stage), r in sorted(base.items(), key=lambda kv: (kv[0][0] != "resnet56", kv[0][1] != "imported")):
        out.append(
            f"| {arch} | {stage} | {r.get('epochs', '')} | {r['top1']:.2f} | {r['top5']:.2f} | {r['wall_s']:.0f} |"
        )
    g = grouped(rows)
    out.append(
        "\n### Top-1 % per configuration, residual mode and criterion\n\n"
        "random: mean (min–max) of seeds 0, 1, 2. a: right after pruning; b: after `--recalibrate-bn 4`; "
        "c: after the short fine-tuning (from the stage-a model).\n\n"
        "| config | mode | FLOPs (fewer) | params | criterion | a | b | c |\n|---|---|---|---|---|---|---|---|"
    )
    for config in ["paper-1", "paper-2", "inner-only"]:
        for mode in ["coupled", "paper"]:
            for crit in CRITERIA:
                rs = {s: g.get((config, mode, crit, s), []) for s in "abc"}
                any_row = next((v[0] for v in rs.values() if v), None)
                if any_row is None:
                    continue
                flops = f"{any_row['flops'] / 1e6:.1f} M ({100 * any_row['flops_reduction']:.1f} %)"
                cells = " | ".join(fmt_top1(rs[s]) for s in "abc")
                out.append(f"| {config} | {mode} | {flops} | {any_row['params']:,} | {crit} | {cells} |")
    cal = read_jsonl(d / "calibration_size.jsonl")
    if cal:
        out.append(
            "\n### Calibration-size ablation (CHIP, coupled): top-1 %, seed 0 / seed 1\n\n"
            "| config | images | a: right after pruning | b: after BN re-estimation |\n|---|---|---|---|"
        )
        for config in ["paper-1", "inner-only"]:
            for n in sorted({r["images"] for r in cal}):
                cells = []
                for stage in "ab":
                    vals = [
                        f"{r['top1']:.2f}"
                        for r in sorted(cal, key=lambda r: r["seed"])
                        if r["config"] == config and r["images"] == n and r["stage"] == stage
                    ]
                    cells.append(" / ".join(vals) or "–")
                out.append(f"| {config} | {n} | {cells[0]} | {cells[1]} |")
    if (d / "stability.json").exists():
        st = json.loads((d / "stability.json").read_text())
        out.append(
            f"\n### Ranking stability ({st['sets']} disjoint sets of {st['images_per_set']} images)\n\n"
            "| criterion | layers | mean ρ (all layers) | median of per-layer mean | lowest per-layer mean "
            "| lowest pair | wall s |\n|---|---|---|---|---|---|---|"
        )
        for crit, v in st["criteria"].items():
            means = {n: x["mean"] for n, x in v["layers"].items() if x["mean"] is not None}
            mins = [x["min"] for x in v["layers"].values() if x["min"] is not None]
            worst = min(means, key=lambda n: means[n])
            out.append(
                f"| {crit} | {len(means)} | {statistics.mean(means.values()):.3f} | "
                f"{statistics.median(means.values()):.3f} | {means[worst]:.3f} ({worst}) | {min(mins):.3f} | "
                f"{v['wall_s']:.0f} |"
            )
    if (d / "latency.json").exists():
        lat = json.loads((d / "latency.json").read_text())
        out.append(latency_table(lat))
    out.append(timing_table(d, rows))
    return "\n".join(out) + "\n"


def latency_table(lat: dict[str, Any]) -> str:
    env = lat["environment"]
    lines = [
        f"\n### CPU latency ({env['cpu']}, {env['cores']} cores, torch {env['torch']}, {lat['repeats']} timed runs)\n",
        "| config | mode | threads | FLOPs ratio | batch 1 ms | speed-up | batch 64 ms | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    dense = {r["threads"]: r for r in lat["rows"] if r["config"] == "dense"}
    for r in lat["rows"]:
        ms = {int(k): v for k, v in latency_ms(r).items()}
        dms = {int(k): v for k, v in latency_ms(dense[r["threads"]]).items()}
        ratio = r["flops"] / dense[r["threads"]]["flops"]
        lines.append(
            f"| {r['config']} | {r['mode']} | {r['threads']} | {ratio:.3f} | {ms[1]:.2f} | "
            f"{dms[1] / ms[1]:.2f}× | {ms[64]:.1f} | {dms[64] / ms[64]:.2f}× |"
        )
    return "\n".join(lines)


def latency_ms(r: dict[str, Any]) -> dict[str, float]:
    """Median milliseconds per batch size from a `chip profile --latency --json` result."""
    return {k: v["median_ms"] for k, v in r["latency_ms"].items()}


def timing_table(d: Path, rows: list[dict[str, Any]]) -> str:
    lines = [
        "\n### Wall time (1 thread, shared 2-core machine)\n",
        "| what | runs | total min | per run s |",
        "|---|---|---|---|",
    ]

    def add(name: str, walls: list[float]) -> None:
        if walls:
            lines.append(f"| {name} | {len(walls)} | {sum(walls) / 60:.1f} | {statistics.mean(walls):.0f} |")

    for r in read_jsonl(d / "baselines.jsonl"):
        add(
            f"baseline {r['arch']} {r['stage']} ({'chip finetune' if r['stage'] == 'adapted' else 'chip eval'})",
            [r["wall_s"]],
        )
    add("chip score (chip, hrank)", [r["wall_s"] for r in read_jsonl(d / "scores.jsonl")])
    add("stage a: chip prune + chip eval", [r["wall_s"] for r in rows if r["stage"] == "a"])
    add("stage b: chip prune --recalibrate-bn 4 + chip eval", [r["wall_s"] for r in rows if r["stage"] == "b"])
    add("stage c: chip finetune (19 steps + test eval)", [r["wall_s"] for r in rows if r["stage"] == "c"])
    cal = read_jsonl(d / "calibration_size.jsonl")
    add("calibration: chip score", [r["score_wall_s"] for r in cal if r["score_wall_s"]])
    add("calibration: chip prune + chip eval", [r["wall_s"] for r in cal])
    if (d / "stability.json").exists():
        st = json.loads((d / "stability.json").read_text())
        for crit, v in st["criteria"].items():
            add(f"stability: {crit} scores of 4 x 640 images", [v["wall_s"]])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="results/reproduce")
    d = Path(parser.parse_args().dir)
    rows = read_jsonl(d / "runs.jsonl")
    base = baselines(d)
    figures = [
        ("accuracy_vs_flops", lambda: plot_accuracy(d, rows, base), rows),
        ("kept_channels", lambda: plot_kept(d), (d / "configs.json").exists()),
        ("ci_distributions", lambda: plot_ci(d), (d / "scores" / "chip.json").exists()),
        ("calibration_size", lambda: plot_calibration(d), (d / "calibration_size.jsonl").exists()),
        ("stability", lambda: plot_stability(d), (d / "stability.json").exists()),
    ]
    for name, fn, available in figures:
        if available:
            fn()
            print(f"wrote {d / name}.png", file=sys.stderr)
        else:
            print(f"skipped {name}: its log is missing", file=sys.stderr)
    (d / "tables.md").write_text(tables(d, rows, base))
    print(f"wrote {d / 'tables.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
