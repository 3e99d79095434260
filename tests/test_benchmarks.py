"""The prepared GPU suite, run as its dry run: every step at toy sizes on the CPU."""

import json
import subprocess
from pathlib import Path

import torch

from chipprune.models import create_model
from images import write_image_folder

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_suite_dry_run_runs_every_step(tmp_path):
    write_image_folder(tmp_path / "data", {"train": 8, "test": 2})
    torch.save(create_model("resnet56").state_dict(), tmp_path / "w.th")
    out = tmp_path / "out"
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out), "--dry-run", "--data", str(tmp_path / "data"),
           "--weights", str(tmp_path / "w.th")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    failed = [s["step"] for s in steps if s["rc"]]
    assert done.returncode == 0 and not failed, f"{failed}: {done.stderr[-2000:]}"
    assert [s["step"] for s in steps] == [
        "ci_speed", "train_speed", "latency", "import", "prune-chip", "finetune-chip", "prune-l1", "finetune-l1"
    ]  # fmt: skip
    loops = {r["loop"] for r in json.loads((out / "train_speed.json").read_text())}
    assert loops == {"plain fp32", "chipprune fp32", "chipprune auto", "chipprune auto + teacher"}
    assert {r["runtime"] for r in json.loads((out / "latency.json").read_text())} == {
        "eager",
        "torchscript",
        "onnxruntime",
    }
    for criterion in ("chip", "l1"):
        run = out / f"finetune-{criterion}"
        assert json.loads((run / "config.json").read_text())["teacher"]["path"] == str((out / "resnet56.pt").resolve())
        assert (run / "curves.png").exists() and len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_the_gpu_suite_refuses_unknown_options(tmp_path):
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path), "--bogus"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "unknown option --bogus" in done.stderr
