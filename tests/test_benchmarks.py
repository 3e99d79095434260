"""The prepared GPU suite, run as its dry run: every step at toy sizes on the CPU."""

import json
import subprocess
from pathlib import Path

from images import write_image_folder

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_suite_dry_run_runs_every_step(tmp_path):
    write_image_folder(tmp_path / "data", {"train": 8, "test": 2})
    out = tmp_path / "out"
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out), "--dry-run", "--data", str(tmp_path / "data")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    failed = [s["step"] for s in steps if s["rc"]]
    assert done.returncode == 0 and not failed, f"{failed}: {done.stderr[-2000:]}"
    assert [s["step"] for s in steps] == ["recovery", "train_speed", "latency", "ci_speed", "same_batches"]
    rows = [json.loads(line) for line in (out / "recovery" / "runs.jsonl").read_text().splitlines()]
    recovered = {(r["criterion"], r["seed"]) for r in rows if r["stage"] == "recovered"}
    assert recovered == {("parent", 0), ("chip", 0), ("l1", 0), ("chip", 1), ("l1", 1)}
    assert {(r["criterion"], r["seed"], r["stage"]) for r in rows if r["stage"] != "recovered"} == {
        (c, s, stage) for c in ("chip", "l1") for s in (0, 1) for stage in ("pruned", "bn")
    }
    for name in ("chip-s0", "parent-s0"):
        config = json.loads((out / "runs" / "ft" / name / "config.json").read_text())
        assert config["teacher"]["path"] == str((ROOT / "results" / "recovery" / "parent.safetensors").resolve())
    loops = {r["loop"] for r in json.loads((out / "train_speed.json").read_text())}
    assert loops == {"plain fp32", "chipprune fp32", "chipprune auto", "chipprune auto + teacher"}
    assert {r["runtime"] for r in json.loads((out / "latency.json").read_text())} == {
        "eager",
        "torchscript",
        "onnxruntime",
    }


def test_the_gpu_suite_refuses_unknown_options(tmp_path):
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path), "--bogus"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "unknown option --bogus" in done.stderr
