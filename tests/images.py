"""Synthetic image-folder datasets for the tests."""

from pathlib import Path

import numpy as np
from PIL import Image

from chipprune.modelfile import CIFAR10_CLASSES


def write_image_folder(root: Path, per_split: dict[str, int], seed: int = 0) -> Path:
    """root/<split>/<class>/<i>.png: random 32×32 RGB PNGs, per_split[split] per CIFAR-10 class."""
    rng = np.random.default_rng(seed)
    for split, n in per_split.items():
        for c in CIFAR10_CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root
