"""Training throughput of chipprune's loop against a plain PyTorch loop (the authors' recipe), side by side, for the
dense ResNet-56 and pruned ones (benchmarks/resnet56_configs.py).

    python benchmarks/train_speed.py [--configs dense,paper-1,...] [--batch-size 256] [--steps N] [--device D]

plain: the CHIP authors' CIFAR-10 loop. A Dataset turns one uint8 image at a time into a PIL image, pads it by 4,
crops 32 x 32 at random, flips it with probability 1/2, converts and normalizes it (torchvision's RandomCrop,
RandomHorizontalFlip, ToTensor, Normalize, written out without torchvision); a DataLoader (shuffled, --workers
processes, 1 as theirs) batches them; float32 forward and backward, loss.item() every step.
chipprune: chipprune.training.loop.fit on the same images and model: the uint8 images on the device, cropped and flipped
there in batched tensor ops; in float32, and with --amp auto (bf16 autocast + channels_last where the device computes
bf16 natively); with a dense teacher (distillation) for --teacher-configs; with torch.compile on a GPU.

Each configuration trains two epochs of --steps batches of random images; the second one is timed (the first pays
for compilation and warm-up). Epochs/minute are for CIFAR-10's 50,000 training images."""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from chipprune.data import ImageSplit
from chipprune.files.modelfile import CIFAR10_CLASSES, NORMALIZATIONS, ModelFile
from chipprune.models import RegistryModel, create_model
from chipprune.profile import count_flops
from chipprune.training.distributed import Place
from chipprune.training.loop import PRESETS, fit
from chipprune.training.precision import Precision, choose
from resnet56_configs import CONFIGS, configs

CIFAR_TRAIN_IMAGES = 50_000
MEAN, STD = NORMALIZATIONS["cifar"]


class PerImage(Dataset):
    """CIFAR-10 as torchvision serves it to the authors' code: one augmented, normalized image at a time."""

    def __init__(self, images: np.ndarray, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img = ImageOps.expand(Image.fromarray(self.images[i]), border=4, fill=0)
        top, left = np.random.randint(0, 9, 2)
        img = img.crop((left, top, left + 32, top + 32))
        if np.random.rand() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
        return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1), self.labels[i]


def plain(model: nn.Module, split: ImageSplit, batch_size: int, workers: int, device: torch.device) -> float:
    """Images/s of the second epoch of the plain loop."""
    assert split.images is not None
    loader = DataLoader(
        PerImage(split.images.permute(0, 2, 3, 1).numpy(), split.labels),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
    )
    cfg = PRESETS["paper-cifar"]
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    for _ in range(2):
        began, images = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()
            images += len(y)
    return images / (time.perf_counter() - began)


def fast(
    model: RegistryModel,
    split: ImageSplit,
    batch_size: int,
    device: torch.device,
    precision: Precision,
    compile: bool = False,
    teacher: nn.Module | None = None,
) -> float:
    """Images/s of the second epoch of chipprune's loop (with a teacher, distilling from it)."""
    cfg = replace(
        PRESETS["paper-cifar"],
        epochs=2,
        batch_size=batch_size,
        warmup_epochs=0,
        amp=precision.amp,
        teacher=None if teacher is None else "benchmark",
        kd_weight=0.5,
    )
    mf = ModelFile("resnet56", model, MEAN, STD, list(CIFAR10_CLASSES))
    with tempfile.TemporaryDirectory() as run:
        history = fit(
            mf,
            split,
            None,
            cfg,
            Path(run),
            place=Place(device=device),
            precision=precision,
            compile=compile,
            progress=False,
            teacher=teacher,
        )
    return history[-1]["images_per_s"]


class Row(NamedTuple):
    """One measurement: configuration, loop, images/s."""

    config: str
    loop: str
    images_per_s: float


def measure(args: argparse.Namespace, split: ImageSplit, device: torch.device) -> list[Row]:
    """Every configuration in the plain fp32 loop and in chipprune's with --amp auto; the teacher's cost; compile."""
    auto = choose("auto", None, device)
    fp32 = choose("off", None, device)
    dense = create_model("resnet56")
    rows = []
    for name in configs(args.configs):
        torch.manual_seed(0)
        model = create_model("resnet56", CONFIGS[name].widths())
        rows.append(Row(name, "plain fp32", plain(copy.deepcopy(model), split, args.batch_size, args.workers, device)))
        if name == "dense":
            rows.append(Row(name, "chipprune fp32", fast(copy.deepcopy(model), split, args.batch_size, device, fp32)))
        rows.append(Row(name, "chipprune auto", fast(copy.deepcopy(model), split, args.batch_size, device, auto)))
        if name in args.teacher_configs.split(","):
            rate = fast(copy.deepcopy(model), split, args.batch_size, device, auto, teacher=copy.deepcopy(dense))
            rows.append(Row(name, "chipprune auto + teacher", rate))
        if name == "dense" and device.type == "cuda":
            rate = fast(copy.deepcopy(model), split, args.batch_size, device, auto, compile=True)
            rows.append(Row(name, "chipprune auto + compile", rate))
        print(f"  measured {name}", file=sys.stderr, flush=True)
    return rows


def report(rows: list[Row], auto: Precision) -> None:
    """The table: images/s, speed-up over the plain fp32 dense loop and over chipprune's dense loop, epochs/min."""
    plain_dense = next(r.images_per_s for r in rows if (r.config, r.loop) == ("dense", "plain fp32"))
    auto_dense = next(r.images_per_s for r in rows if (r.config, r.loop) == ("dense", "chipprune auto"))
    print(f"auto = {auto.describe()}")
    print("| configuration | FLOPs | loop | images/s | vs plain fp32 dense | vs chipprune auto dense | epochs/min |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        flops = count_flops(create_model("resnet56", CONFIGS[r.config].widths()), 32) / 1e6
        print(
            f"| {r.config} | {flops:.1f} M | {r.loop} | {r.images_per_s:.0f} | {r.images_per_s / plain_dense:.2f}x "
            f"| {r.images_per_s / auto_dense:.2f}x | {60 * r.images_per_s / CIFAR_TRAIN_IMAGES:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="configurations of resnet56_configs.py")
    parser.add_argument("--teacher-configs", default="paper-1,paper-1 round-to 16", help="also timed with --teacher")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, help="batches per epoch (default: 100 on a GPU, 8 on a CPU)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader processes of the plain loop")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)
    steps = args.steps or (100 if device.type == "cuda" else 8)
    g = torch.Generator().manual_seed(0)
    n = steps * args.batch_size
    split = ImageSplit(
        list(CIFAR10_CLASSES),
        torch.randint(0, 10, (n,), generator=g),
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
    )
    print(
        f"ResNet-56, batch {args.batch_size}, {steps} steps per epoch, {args.device} "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}"
    )
    rows = measure(args, split, device)
    report(rows, choose("auto", None, device))
    if args.json:
        Path(args.json).write_text(json.dumps([r._asdict() for r in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
