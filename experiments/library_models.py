"""torchvision and timm models through the documented `chip` commands, one JSON line per command.

    python experiments/library_models.py chain   # resnet50, efficientnet_b0, convnext_atto at 224 px on random images
    python experiments/library_models.py cifar   # timm:resnet18 at 32 px on ../shared/data: train, prune, fine-tune
    python experiments/library_models.py latency # resnet50, mobilenetv3 at 224 px: --latency-target

`chain`, per model: import with random weights, then a state dict saved from the library and re-imported; profile;
prune to half the FLOPs on a small ImageNet-style folder of random 256x256 JPEGs (4 classes, written once under
runs/library/); eval; fine-tune one epoch on 32 images; export to ONNX with a dynamic batch; reload the files and
compare logits. `cifar`: timm:resnet18 with 10 classes at 32 px trained from scratch for one epoch, pruned to half
its FLOPs with CHIP and fine-tuned one epoch, top-1 on the 10,000 JPEG test images after each step. `latency`: each
of LATENCY (random weights, 4 classes as the random JPEGs) pruned with `--latency-target 0.5 --runtime eager
--latency-batch-size 1 --threads 2`, scored on the random JPEGs: the latency measured, dense and pruned side by side.

Results go to results/library-models/runs.jsonl; a step already logged is skipped (runs/ holds the files)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from reproduce import append, chip, logged, metrics

RUNS = Path("runs/library")
LOG = Path("results/library-models/runs.jsonl")
CHAIN = ["torchvision:resnet50", "timm:efficientnet_b0", "timm:convnext_atto"]
LATENCY = ["torchvision:resnet50", "timm:mobilenetv3_large_100"]


def folder() -> Path:
    """4 classes of random 256x256 JPEGs, 16 train and 4 test each (seeded), written once."""
    import numpy as np
    from PIL import Image

    root = RUNS / "imagenet-style"
    if not (root / "test" / "d" / "3.jpg").exists():
        rng = np.random.default_rng(0)
        for split, n in (("train", 16), ("test", 4)):
            for c in "abcd":
                (root / split / c).mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(root / split / c / f"{i}.jpg", quality=90)
    return root


def step(key: dict[str, Any], *args: str) -> dict[str, Any] | None:
    """One chip command, logged under `key` unless it is logged already; its --json result."""
    if logged(LOG, **key):
        return None
    result, wall, line = chip(*args)
    append(LOG, {**key, "result": result, "wall_s": round(wall, 1), "commands": [line]})
    return result


def chain(arch: str) -> None:
    """Every command on one library model at its library's input size."""
    import torch

    from chipprune.models import external

    work, data = RUNS / arch.replace(":", "-"), str(folder())
    work.mkdir(parents=True, exist_ok=True)
    kwargs = ["--model-kwargs", '{"num_classes": 4}']
    step({"arch": arch, "step": "import random"}, "import", "--arch", arch, *kwargs, "--out", str(work / "random.pt"))
    weights = work / "library.pth"
    if not weights.exists():
        torch.manual_seed(0)
        torch.save(external.build(external.parse(arch, {"num_classes": 4})).state_dict(), weights)
    m, p, ft = work / "m.pt", work / "half.safetensors", work / "ft"
    step({"arch": arch, "step": "import weights"}, "import", "--arch", arch, *kwargs, "--weights", str(weights),
         "--out", str(m))  # fmt: skip
    step({"arch": arch, "step": "profile"}, "profile", str(m), "--json")
    step({"arch": arch, "step": "prune"}, "prune", str(m), "--flops-target", "0.5", "--data", data, "--batches", "2",
         "--batch-size", "8", "--out", str(p), "--json")  # fmt: skip
    step({"arch": arch, "step": "eval"}, "eval", str(p), "--data", data, "--json")
    if not logged(LOG, arch=arch, step="finetune"):
        _, wall, line = chip("finetune", str(p), "--data", data, "--epochs", "1", "--train-subset", "32",
                             "--batch-size", "16", "--out-dir", str(ft))  # fmt: skip
        append(LOG, {"arch": arch, "step": "finetune", "metrics": metrics(ft), "wall_s": round(wall, 1),
                     "commands": [line]})  # fmt: skip
    onnx = work / "half.onnx"
    step({"arch": arch, "step": "export"}, "export", str(ft / "last.pt"), "--format", "onnx", "--dynamic-batch",
         "--out", str(onnx))  # fmt: skip
    if not logged(LOG, arch=arch, step="reload"):
        append(LOG, {"arch": arch, "step": "reload", **reload(ft / "last.pt", onnx)})


def reload(model_file: Path, onnx: Path) -> dict[str, Any]:
    """The model file loaded twice (and once more from its safetensors copy): equal logits; ONNX's largest
    difference from them at batch 3 (the export was checked at batch 1)."""
    import onnxruntime as ort
    import torch

    from chipprune.files.modelfile import load_model

    first = load_model(model_file)
    copy = model_file.with_suffix(".safetensors")
    first.save(copy)
    size = first.input_size
    torch.manual_seed(0)
    x = torch.rand(3, 3, size, size)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (first.mean, first.std))
    with torch.no_grad():
        a, b, c = (mf.model.eval()((x - mean) / std) for mf in (first, load_model(model_file), load_model(copy)))
    got = torch.from_numpy(ort.InferenceSession(str(onnx)).run(None, {"images": x.numpy()})[0])
    return {"reloaded_identical": bool(torch.equal(a, b)), "safetensors_identical": bool(torch.equal(a, c)),
            "onnx_max_abs_diff": float((got - a).abs().max())}  # fmt: skip


def cifar(data: str) -> None:
    """timm:resnet18 at 32 px on the JPEG CIFAR-10: one epoch from scratch, half the FLOPs, one epoch of fine-tuning."""
    work = RUNS / "cifar-resnet18"
    arch = "timm:resnet18"
    if not logged(LOG, arch=arch, step="cifar train"):
        _, wall, line = chip("train", "--arch", arch, "--model-kwargs", '{"num_classes": 10}', "--input-size", "32",
                             "--normalize", "cifar", "--data", data, "--epochs", "1", "--out-dir",
                             str(work / "train"))  # fmt: skip
        append(LOG, {"arch": arch, "step": "cifar train", "metrics": metrics(work / "train"), "wall_s": round(wall, 1),
                     "commands": [line]})  # fmt: skip
    pruned = work / "half.pt"
    step({"arch": arch, "step": "cifar prune"}, "prune", str(work / "train" / "last.pt"), "--flops-target", "0.5",
         "--data", data, "--out", str(pruned), "--json")  # fmt: skip
    step({"arch": arch, "step": "cifar eval pruned"}, "eval", str(pruned), "--data", data, "--json")
    if not logged(LOG, arch=arch, step="cifar finetune"):
        _, wall, line = chip("finetune", str(pruned), "--data", data, "--epochs", "1", "--warmup-epochs", "0",
                             "--out-dir", str(work / "ft"))  # fmt: skip
        append(LOG, {"arch": arch, "step": "cifar finetune", "metrics": metrics(work / "ft"),
                     "wall_s": round(wall, 1), "commands": [line]})  # fmt: skip


def latency(arch: str, target: str = "0.5") -> None:
    """One library model pruned to a latency target in eager PyTorch, batch 1, 2 threads."""
    work = RUNS / arch.replace(":", "-")
    work.mkdir(parents=True, exist_ok=True)
    dense = work / "random.pt"
    step({"arch": arch, "step": "latency import"}, "import", "--arch", arch, "--model-kwargs", '{"num_classes": 4}',
         "--out", str(dense))  # fmt: skip
    step({"arch": arch, "step": f"latency {target} eager b1"}, "prune", str(dense), "--latency-target", target,
         "--runtime", "eager", "--latency-batch-size", "1", "--threads", "2", "--data", str(folder()), "--batches",
         "2", "--batch-size", "8", "--out", str(work / f"latency-{target}.pt"), "--json")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["chain", "cifar", "latency"])
    parser.add_argument("--data", default="../shared/data", help="cifar: the JPEG CIFAR-10")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    if args.step == "chain":
        for arch in CHAIN:
            chain(arch)
    elif args.step == "latency":
        for arch in LATENCY:
            latency(arch)
    else:
        cifar(args.data)
    print(f"logged in {LOG}", file=sys.stderr)


if __name__ == "__main__":
    main()
