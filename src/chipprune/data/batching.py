"""Normalized, optionally shuffled and augmented batches of an ImageSplit, without torchvision."""

from __future__ import annotations

import math
import traceback
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .sources import SMALL, DataError, ImageSplit, open_image

PAD = 4  # in-memory train crops come from the image zero-padded by PAD pixels on each side
SCALE = (0.08, 1.0)  # random-resized-crop area range, as a fraction of the image
RATIO = (3 / 4, 4 / 3)  # random-resized-crop aspect-ratio range (width / height)
LAZY_SIZE = 224  # the input size of lazily read images where none is given
T = TypeVar("T")

_told: weakref.WeakSet[ImageSplit] = weakref.WeakSet()  # splits whose resizing was told: one warning each


class Batches(Iterator[T]):
    """An iterator of batches that knows how many it yields (so that progress bars show a total)."""

    def __init__(self, batches: Iterator[T], count: int) -> None:
        self._batches, self._count = batches, count

    def __iter__(self) -> Batches[T]:
        return self

    def __next__(self) -> T:
        return next(self._batches)

    def __len__(self) -> int:
        return self._count


def batches(
    data: ImageSplit,
    batch_size: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool = False,
    shuffle: bool = False,
    seed: int = 0,
    limit: int | None = None,
    workers: int = 0,
    image_size: int | None = None,
    drop_last: bool = False,
    start: int = 0,
    rank: int = 0,
    world: int = 1,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of (normalized float32 images [B, 3, H, W], int64 labels [B]) on `device`: shuffled, augmented, limited.

    Order and augmentation depend on `seed` alone. With `world` processes, each batch is split among them and this
    yields rank `rank`'s share; `start` skips the first batches (to resume an epoch).

    `image_size` is the side of the model's square input. In-memory images of another size are resized to it (one
    warning per split); None keeps them as they are. Lazily read images are resized and center-cropped to it (224
    if None), randomly for training, as on ImageNet; but for a CIFAR-size input (<= SMALL px), images of its size are
    used as they are and others resized to it (one warning per split), with the in-memory images' augmentation."""
    if batch_size < 1 or (limit is not None and limit < 0):
        raise ValueError(f"batch_size must be >= 1 and limit >= 0, got {batch_size} and {limit}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (R, G, B), got {len(mean)} and {len(std)}")
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    order = (torch.randperm(len(data), generator=g) if shuffle else torch.arange(len(data)))[:limit]
    spans = _spans(len(order), batch_size, drop_last, start, rank, world)
    if data.images is not None:
        crops = _crop_params(len(order), g, device) if train else None
        size = tuple(data.images.shape[-2:])
        resize = image_size if image_size is not None and size != (image_size, image_size) else None
        if resize and data not in _told:
            _told.add(data)
            warnings.warn(
                f"the images are {size[1]}x{size[0]} pixels, the model takes {resize}x{resize}: resizing them "
                f"(bilinear{'' if size[0] == size[1] else ', aspect ratio not kept'})",
                stacklevel=3,
            )
        raw: Iterable[tuple[Tensor, Tensor]] = _memory_batches(
            data.images.to(device), data.labels.to(device), order.to(device), crops, spans, resize
        )
    else:
        side = image_size or LAZY_SIZE
        if side <= SMALL and data.large and data not in _told:
            _told.add(data)
            warnings.warn(
                f"images over {SMALL} px (as {data.large}) are resized to the model's {side}x{side}, "
                f"images of {side}x{side} used as they are",
                stacklevel=3,
            )
        seeds = torch.randint(2**62, (len(order),), generator=g)  # one per image: the same whatever `workers`
        dataset = _LazyImages(data, order, seeds, train, side)
        loader = DataLoader(
            dataset,
            batch_sampler=[list(range(lo, hi)) for lo, hi in spans],
            num_workers=workers,
            pin_memory=device.type == "cuda",
        )
        raw = ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in _one_line_errors(loader))
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return Batches(((x.float().div_(255).sub_(m).div_(s), y) for x, y in raw), len(spans))


def share(n: int, rank: int, world: int) -> slice:
    """Rank `rank`'s part of n items split among `world` processes: contiguous, sizes differing by at most one."""
    return slice(rank * n // world, (rank + 1) * n // world)


def _spans(n: int, batch_size: int, drop_last: bool, start: int, rank: int, world: int) -> list[tuple[int, int]]:
    """Positions [lo, hi) in the order of this rank's share of each batch, from batch `start` on; none empty."""
    stop = n - n % batch_size if drop_last else n
    spans = []
    for lo in range(start * batch_size, stop, batch_size):
        part = share(min(batch_size, stop - lo), rank, world)
        if part.stop > part.start:
            spans.append((lo + part.start, lo + part.stop))
    return spans


# ---- in memory (CIFAR-size) --------------------------------------------------------------------------------


def _memory_batches(
    images: Tensor,
    labels: Tensor,
    order: Tensor,
    crops: tuple[Tensor, Tensor] | None,
    spans: list[tuple[int, int]],
    resize: int | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """uint8 batches of in-memory images, on their device; padded-cropped and flipped where `crops` are given; then
    resized to `resize` x `resize` (as float pixels, bilinear) where given."""
    for lo, hi in spans:
        idx = order[lo:hi]
        x = images[idx] if crops is None else _pad_crop_flip(images[idx], crops[0][lo:hi], crops[1][lo:hi])
        if resize is not None:
            x = F.interpolate(x.float(), size=(resize, resize), mode="bilinear", antialias=True, align_corners=False)
        yield x, labels[idx]


def _crop_params(n: int, g: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
    """Random (top, left) offsets [n, 2] into the zero-padded images, and horizontal flips [n] with probability 1/2."""
    offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=g)
    return offsets.to(device), (torch.rand(n, generator=g) < 0.5).to(device)


def _pad_crop_flip(x: Tensor, offsets: Tensor, flip: Tensor) -> Tensor:
    """H x W crops of the zero-padded images at `offsets` (top, left), flipped horizontally where `flip`."""
    n, c, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    rows = offsets[:, :1] + torch.arange(h, device=x.device)
    cols = offsets[:, 1:] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flipped crop reads its columns right to left
    return padded[
        torch.arange(n, device=x.device)[:, None, None, None],
        torch.arange(c, device=x.device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


# ---- lazy (ImageNet-size) ----------------------------------------------------------------------------------


class _LazyImages(Dataset):
    """Images of a lazy split in `order`, opened and transformed one at a time (in DataLoader workers)."""

    def __init__(self, data: ImageSplit, order: Tensor, seeds: Tensor, train: bool, size: int) -> None:
        self.data, self.order, self.seeds, self.train, self.size = data, order, seeds, train, size

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> tuple[Tensor, Tensor]:
        i = int(self.order[k])
        img = open_image(self.data, i)
        if self.size <= SMALL:  # a CIFAR-size input: its size as it is, other sizes resized to it
            if img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
            x = torch.from_numpy(np.array(img)).permute(2, 0, 1)
            if self.train:  # as in memory: a crop of the zero-padded image, and a flip
                g = torch.Generator().manual_seed(int(self.seeds[k]))
                offsets, flip = _crop_params(1, g, x.device)
                x = _pad_crop_flip(x[None], offsets, flip)[0]
            return x, self.data.labels[i]
        if self.train:
            img = _random_resized_crop_flip(img, self.size, torch.Generator().manual_seed(int(self.seeds[k])))
        else:
            img = _resize_center_crop(img, self.size)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1), self.data.labels[i]


def _one_line_errors(loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
    """The loader's batches; a DataError from a worker process is re-raised without the worker's traceback."""
    try:
        yield from loader
    except DataError as e:
        # torch's reraise makes a reference cycle: workers would live to a gc pass, then take 5 s to stop.
        traceback.clear_frames(e.__traceback__)
        lines = str(e).strip().splitlines()
        if len(lines) == 1:
            raise
        raise DataError(lines[-1].split(": ", 1)[-1]) from None  # last line: "...DataError: <message>"


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to size * 256 / 224 (256 for 224), bilinear, then crop the central square."""
    w, h = img.size
    short = size * 256 // 224
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    left, top = round((nw - size) / 2), round((nh - size) / 2)
    return img.resize((nw, nh), Image.Resampling.BILINEAR).crop((left, top, left + size, top + size))


def _random_resized_crop_flip(img: Image.Image, size: int, g: torch.Generator) -> Image.Image:
    """torchvision's RandomResizedCrop(size) then RandomHorizontalFlip(), drawing from g."""
    left, top, w, h = _crop_box(*img.size, g)
    img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if torch.rand(1, generator=g).item() < 0.5 else img


def _crop_box(width: int, height: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random crop, area in SCALE, aspect in RATIO; a central crop after 10 misses."""
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        area = width * height * torch.empty(1).uniform_(*SCALE, generator=g).item()
        ratio = math.exp(torch.empty(1).uniform_(*log_ratio, generator=g).item())
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return left, top, w, h
    if width / height < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif width / height > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h
