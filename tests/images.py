"""Synthetic image folders and model files for the tests."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from chipprune.files.modelfile import CIFAR10_CLASSES, ModelFile
from chipprune.models import create_model


def write_image_folder(root: Path, per_split: dict[str, int], seed: int = 0) -> Path:
    """root/<split>/<class>/<i>.png: random 32×32 RGB PNGs, per_split[split] per CIFAR-10 class."""
    rng = np.random.default_rng(seed)
    for split, n in per_split.items():
        for c in CIFAR10_CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def make_workdir(root: Path, per_split: dict[str, int]) -> Path:
    """root/data (write_image_folder) and root/r20.pt, a ResNet-20 model file with seeded random weights."""
    write_image_folder(root / "data", per_split)
    torch.manual_seed(0)
    ModelFile("resnet20", create_model("resnet20"), (0.5,) * 3, (0.25,) * 3, list(CIFAR10_CLASSES)).save(
        root / "r20.pt"
    )
    return root


CLASSES = {"train": {"dog": 2, "ant": 3, "cat": 2}, "test": {"cat": 1, "ant": 2, "dog": 1}}
Expected = dict[str, tuple[torch.Tensor, torch.Tensor]]  # split -> (uint8 images [N, 3, H, W], labels [N])


def make_tree(root: Path, layout: dict[str, dict[str, int]] = CLASSES, size: tuple[int, int] = (8, 6)) -> Expected:
    """Write root/<split>/<class>/<k>.png (size: width, height) of random pixels; what loading must give."""
    rng = np.random.default_rng(0)
    expected = {}
    for split, counts in layout.items():
        images, labels = [], []
        for label, cls in enumerate(sorted(counts)):
            (root / split / cls).mkdir(parents=True)
            for k in range(counts[cls]):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{k:02d}.png")
                images.append(torch.from_numpy(pixels).permute(2, 0, 1))
                labels.append(label)
        expected[split] = (torch.stack(images), torch.tensor(labels))
    return expected


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG of uint16 pixels [H, W, 1 or 3] (grey or RGB), written by hand: Pillow writes 16-bit grey only."""
    import struct
    import zlib

    h, w, c = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))  # filter 0 before each row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
