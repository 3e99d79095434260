"""Training throughput of chipprune's loop against a plain PyTorch loop (the authors' recipe), side by side.

    python benchmarks/train_speed.py [--arch resnet56] [--sparsity S] [--batch-size 256] [--steps N] [--device D]

plain: the CHIP authors' CIFAR-10 loop. A Dataset turns one uint8 image at a time into a PIL image, pads it by 4,
crops 32 x 32 at random, flips it with probability 1/2, converts and normalizes it (torchvision's RandomCrop,
RandomHorizontalFlip, ToTensor, Normalize, written out without torchvision); a DataLoader (shuffled, --workers
processes, 1 as theirs) batches them; float32 forward and backward, loss.item() every step.
chipprune: chipprune.train.fit on the same images and model: the uint8 images on the device, cropped and flipped
there in batched tensor ops; with bf16 autocast, channels_last and torch.compile where the device is a GPU.

Each configuration trains two epochs of --steps batches of random images; the second one is timed (the first pays
for compilation and warm-up). Epochs/minute are for CIFAR-10's 50,000 training images."""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from chipprune.data import ImageSplit
from chipprune.distributed import Place
from chipprune.modelfile import CIFAR10_CLASSES, NORMALIZATIONS, ModelFile
from chipprune.models import RegistryModel, create_model
from chipprune.sparsity import widths
from chipprune.train import PRESETS, fit

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
    amp: str,
    channels_last: bool,
    compile: bool,
    arch: str,
) -> float:
    """Images/s of the second epoch of chipprune's loop."""
    cfg = replace(PRESETS["paper-cifar"], epochs=2, batch_size=batch_size, warmup_epochs=0, amp=amp)
    mf = ModelFile(arch, model, MEAN, STD, list(CIFAR10_CLASSES))
    with tempfile.TemporaryDirectory() as run:
        history = fit(
            mf,
            split,
            None,
            cfg,
            Path(run),
            place=Place(device=device),
            channels_last=channels_last,
            compile=compile,
            progress=False,
        )
    return history[-1]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet56")
    parser.add_argument("--sparsity", help="prune the model to these rates first, e.g. paper-1 (default: dense)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, help="batches per epoch (default: 100 on a GPU, 8 on a CPU)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader processes of the plain loop")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    steps = args.steps or (100 if gpu else 8)
    g = torch.Generator().manual_seed(0)
    n = steps * args.batch_size
    split = ImageSplit(
        list(CIFAR10_CLASSES),
        torch.randint(0, 10, (n,), generator=g),
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
    )
    torch.manual_seed(0)
    model = create_model(args.arch, widths(args.arch, args.sparsity) if args.sparsity else None)
    name = args.arch + (f" at {args.sparsity}" if args.sparsity else "")
    print(
        f"{name}, batch {args.batch_size}, {steps} steps per epoch, {args.device} "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}"
    )

    rows = [
        (
            "plain PyTorch loop: DataLoader, per-image transforms, fp32",
            plain(copy.deepcopy(model), split, args.batch_size, args.workers, device),
        ),
        (
            "chipprune: data on the device, batched augmentation, fp32",
            fast(copy.deepcopy(model), split, args.batch_size, device, "off", False, False, args.arch),
        ),
    ]
    if gpu:
        rows += [
            (
                "chipprune + bf16 autocast + channels_last",
                fast(copy.deepcopy(model), split, args.batch_size, device, "bf16", True, False, args.arch),
            ),
            (
                "chipprune + bf16 autocast + channels_last + torch.compile",
                fast(copy.deepcopy(model), split, args.batch_size, device, "bf16", True, True, args.arch),
            ),
        ]
    base = rows[0][1]
    print(f"{'':60s} {'images/s':>10s} {'speed-up':>9s} {'epochs/min':>11s}")
    for label, rate in rows:
        print(f"{label:60s} {rate:10.0f} {rate / base:8.2f}x {60 * rate / CIFAR_TRAIN_IMAGES:11.2f}")


if __name__ == "__main__":
    main()
