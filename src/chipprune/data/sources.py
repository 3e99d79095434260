"""Read CIFAR-10 batches and image-folder trees (folders or tarballs) into ImageSplits; cache small images."""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import pickle
import tarfile
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from tarfile import TarInfo
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from tqdm import tqdm

from ..files.fileio import OutputError, cache_root, kind, load_reason, read_file, reason, save_torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
SPLITS = {"train": ("train",), "test": ("test", "val"), "val": ("val", "test")}  # asked split -> names to try
SMALL = 64  # images with both sides <= SMALL (and all one size) are decoded once and kept in memory
LARGE_SHARE = 0.01  # a split is read lazily once more than this share of the images decoded so far are over SMALL
CACHE_VERSION = 2  # bump when the cache layout or key changes, so old files are not read
MAX_IMAGE_BYTES = 128 << 20  # an image file (or archive member) larger than this is refused unread
MAX_CIFAR_BYTES = 256 << 20  # a CIFAR-10 python batch is about 30 MB
CONVERTED = "chipprune: converted"  # in a decoded image's info: from what it was converted to 8-bit RGB

T = TypeVar("T")


class DataError(ValueError):
    """A data source that cannot be read as asked (message is one clear line)."""


class MissingSplit(DataError):
    """A data source that is readable but has no such split (as opposed to a damaged one)."""


@dataclass(eq=False)
class ImageSplit:
    """One split of an image dataset: in memory (small images) or a list of images to open lazily."""

    classes: list[str]
    labels: Tensor
    images: Tensor | None = None
    paths: list[str] | None = None  # lazy images: files, or members of `archive`
    archive: str | None = None  # uncompressed .tar holding the lazy images
    spans: Tensor | None = None  # int64 [N, 2]: (offset, size) of each member in `archive`
    large: str | None = None  # lazy images: one of them over SMALL px, named with its size (for messages)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        kind = f"images {tuple(self.images.shape)}" if self.images is not None else "lazy"
        return f"ImageSplit({len(self)} images, {len(self.classes)} classes, {kind})"


def load_split(
    source: str | os.PathLike,
    split: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> ImageSplit:
    """Load a split: small images decoded once (later read from cache), large ones listed to open lazily."""
    if split not in SPLITS:
        raise DataError(f"split must be 'train', 'test' or 'val', got {split!r}")
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise DataError(f"no such file or folder: {path}")
    if not (path.is_dir() or path.is_file()):
        raise DataError(f"{path} is {kind(path)}: expected a folder, or a .tar/.tar.gz/.tgz archive")
    cache = _cache_file(path, split, cache_dir)
    cached = _load_cache(cache) if cache.is_file() else None
    if cached is not None:
        return cached
    data = _read(path, split, progress)
    if len(data) == 0:
        raise DataError(f"no images in the {split!r} split of {path}")
    if data.images is not None:
        _save_cache(cache, data)
    return data


def open_image(data: ImageSplit, i: int) -> Image.Image:
    """Open and decode image i of a lazy split as RGB."""
    assert data.paths is not None, "open_image needs a lazy split"
    if data.archive is None:
        return _decode(_file_bytes(Path(data.paths[i]), MAX_IMAGE_BYTES, "image"), data.paths[i])
    assert data.spans is not None
    offset, size = data.spans[i].tolist()
    with open(data.archive, "rb") as f:
        f.seek(offset)
        return _decode(f.read(size), f"{data.paths[i]} in {data.archive}")


# ---- sources -----------------------------------------------------------------------------------------------


def _read(path: Path, split: str, progress: bool) -> ImageSplit:
    """Read a split from whatever kind of source `path` is."""
    if path.is_file():
        if not path.name.lower().endswith(TAR_SUFFIXES):
            raise DataError(f"unknown format: {path} (expected a folder or a .tar/.tar.gz/.tgz archive)")
        return _read_archives([path], split, progress)
    if (path / "cifar-10-batches-py").is_dir():
        path = path / "cifar-10-batches-py"
    if (path / "batches.meta").is_file():
        files = {
            n: _file_bytes(path / n, MAX_CIFAR_BYTES, "CIFAR-10 file")
            for n in _cifar_files(split)
            if (path / n).is_file()
        }
        return _cifar(files, str(path), split)
    if any((path / s).is_dir() for s in SPLITS):
        return _read_folder(path, split, progress)
    if path.name in SPLITS:
        if path.name not in SPLITS[split]:
            raise MissingSplit(f"{path} is the {path.name!r} split, not {split!r}")
        return _read_folder(path.parent, path.name, progress)
    archives = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(TAR_SUFFIXES))
    if not archives:
        raise DataError(f"no CIFAR-10 batches, train/test/val folders or tar archives in {path}")
    return _read_archives(archives, split, progress)


def _read_folder(root: Path, split: str, progress: bool) -> ImageSplit:
    """Read ROOT/<split>/<class>/<image> files."""
    present = [s for s in SPLITS if (root / s).is_dir()]
    names = [s for s in SPLITS[split] if s in present]
    if not names:
        raise MissingSplit(f"no {split!r} split in {root} (found: {', '.join(present) or 'nothing'})")
    split_dir, other = root / names[0], _other_split(names[0], present)
    groups = {d.name: sorted(p for p in d.iterdir() if p.is_file() and _is_image(p.name)) for d in _dirs(split_dir)}
    others = {d.name for d in _dirs(root / other)} if other else None
    classes, files, labels = _flatten(groups, others, str(split_dir))
    stream = ((i, _file_bytes(p, MAX_IMAGE_BYTES, "image"), str(p)) for i, p in enumerate(files))
    images = _decode_small(stream, len(files), f"{root.name}/{names[0]}", progress)
    if isinstance(images, Tensor):
        return ImageSplit(classes, labels, images)
    return ImageSplit(classes, labels, paths=[str(p) for p in files], large=images)


def _read_archives(archives: list[Path], split: str, progress: bool) -> ImageSplit:
    """Read a split from the first of `archives` (CIFAR-10 python or image-tree tarballs) that holds it."""
    found: list[str] = []
    for path in archives:
        if path.stat().st_size == 0:
            raise DataError(f"empty archive {path} (0 bytes)")
        try:
            with tarfile.open(path) as tar:
                members = tar.getmembers()
                for m in members:
                    if m.name.startswith("/") or ".." in PurePosixPath(m.name).parts:
                        raise DataError(f"unsafe member name {m.name!r} in {path}")
                base = [PurePosixPath(m.name).name for m in members]
                if "batches.meta" in base:
                    # Read in archive order: one pass through a compressed archive.
                    needed = _cifar_files(split)
                    files = {
                        n: _member_bytes(tar, m, MAX_CIFAR_BYTES, path)
                        for n, m in zip(base, members, strict=True)
                        if n in needed
                    }
                    return _cifar(files, str(path), split)
                tree = _member_tree(members)
                names = [s for s in SPLITS[split] if s in tree]
                if names:
                    return _read_tree_archive(path, tar, tree, names[0], progress)
                found += [f"{s} in {path.name}" for s in sorted(tree)]
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise DataError(f"corrupt or truncated archive {path}: {reason(e)}") from None
    where = archives[0] if len(archives) == 1 else archives[0].parent
    raise MissingSplit(f"no {split!r} split in {where} (found: {', '.join(found) or 'no images'})")


def _member_tree(members: list[TarInfo]) -> dict[str, dict[str, list[TarInfo]]]:
    """Image members of an image-tree archive by split and class, sorted by name; one top folder allowed."""
    parts = [PurePosixPath(m.name).parts for m in members]
    tops = {p[0] for p in parts if p}
    skip = 1 if len(tops) == 1 and not tops & set(SPLITS) else 0
    tree: dict[str, dict[str, list[TarInfo]]] = {}
    for m, p in zip(members, parts, strict=True):
        p = p[skip:]
        if len(p) == 2 and m.isdir():  # a class folder: kept so that an empty one is reported
            tree.setdefault(p[0], {}).setdefault(p[1], [])
        elif len(p) == 3 and m.isfile() and _is_image(p[2]):
            tree.setdefault(p[0], {}).setdefault(p[1], []).append(m)
    for classes in tree.values():
        for ms in classes.values():
            ms.sort(key=lambda m: m.name)
    return tree


def _read_tree_archive(
    path: Path, tar: tarfile.TarFile, tree: dict[str, dict[str, list[TarInfo]]], split: str, progress: bool
) -> ImageSplit:
    """Read one split of an image-tree archive: decoded if small, else as spans of an uncompressed tar."""
    other = _other_split(split, list(tree))
    classes, members, labels = _flatten(tree[split], set(tree[other]) if other else None, f"{path}:{split}")
    # Read in archive order, so that a compressed archive is decompressed in one forward pass.
    in_order = sorted(enumerate(members), key=lambda im: im[1].offset)
    stream = ((i, _member_bytes(tar, m, MAX_IMAGE_BYTES, path), f"{m.name} in {path}") for i, m in in_order)
    images = _decode_small(stream, len(members), f"{path.name} {split}", progress)
    if isinstance(images, Tensor):
        return ImageSplit(classes, labels, images)
    try:
        tarfile.open(path, "r:").close()
    except tarfile.ReadError:
        raise DataError(
            f"images over {SMALL} px are read lazily, from a folder or an uncompressed .tar: extract {path}"
        ) from None
    for m in members:  # read later, in loader processes: refused now if it could not be read then
        _check_size(m, MAX_IMAGE_BYTES, path)
    spans = torch.tensor([[m.offset_data, m.size] for m in members], dtype=torch.int64)
    return ImageSplit(classes, labels, paths=[m.name for m in members], archive=str(path), spans=spans, large=images)


def _other_split(split: str, present: list[str]) -> str | None:
    """The split whose classes must match `split`'s: train for test/val, test or val for train."""
    return next((s for s in (("test", "val") if split == "train" else ("train",)) if s in present), None)


def _flatten(groups: dict[str, list[T]], others: set[str] | None, where: str) -> tuple[list[str], list[T], Tensor]:
    """Sorted classes, images in class order and their labels, after checking every class has images."""
    classes = sorted(groups)
    if not classes:
        raise DataError(f"no class folders in {where}")
    empty = [c for c in classes if not groups[c]]
    if empty:
        raise DataError(f"class folder {empty[0]!r} has no images in {where}")
    if others and others != set(classes):  # an other split without class folders is not comparable
        diff = sorted(others ^ set(classes))
        more = f" and {len(diff) - 5} more" if len(diff) > 5 else ""
        raise DataError(f"class folders of {where} differ from the other split's: {', '.join(diff[:5])}{more}")
    labels = torch.repeat_interleave(torch.arange(len(classes)), torch.tensor([len(groups[c]) for c in classes]))
    return classes, [x for c in classes for x in groups[c]], labels


def _dirs(folder: Path) -> list[Path]:
    """Visible subfolders of a folder."""
    return [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]


def _is_image(name: str) -> bool:
    """Whether a file name has an image extension."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _file_bytes(path: Path, limit: int, what: str) -> bytes:
    """The contents of a regular file of at most `limit` bytes."""
    return read_file(path, limit=limit, what=what, error=DataError)


def _check_size(member: TarInfo, limit: int, archive: Path) -> None:
    """Refuse an archive member that its header says is over `limit` bytes."""
    if member.size > limit:
        raise DataError(
            f"archive member {member.name} in {archive} is {member.size:,} bytes, over the {limit >> 20} MB a "
            "member may have here"
        )


def _member_bytes(tar: tarfile.TarFile, member: TarInfo, limit: int, archive: Path) -> bytes:
    """The contents of a file in an archive, refused unread if its header says it is over `limit` bytes."""
    _check_size(member, limit, archive)
    f = tar.extractfile(member)
    if f is None:
        raise DataError(f"archive member {member.name} is not a regular file")
    return f.read(limit)


# ---- decoding ----------------------------------------------------------------------------------------------


def _decode(raw: bytes, name: str) -> Image.Image:
    """Decode an encoded image to 8-bit RGB: 16-bit pixels scaled (not clipped) to 8 bits; float pixels, whose range
    is unknown, refused; images over Pillow's pixel limit (decompression bombs) refused before they are decoded."""
    if not raw:
        raise DataError(f"empty image file {name} (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"refusing image {name}: {reason(e).split(', could')[0]} (a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise DataError(f"cannot decode image {name}: cannot identify its format (damaged, or not an image)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise DataError(f"cannot decode image {name}: {reason(e)}") from None
    if img.mode == "F":
        raise DataError(f"cannot use image {name}: its pixels are 32-bit floats, of no fixed range; save it as 8 bits")
    if img.mode.startswith("I"):  # 16-bit (I;16, I;16B, ...) or 32-bit integer grey levels
        pixels = np.asarray(img, dtype=np.int64)
        if pixels.min(initial=0) < 0 or pixels.max(initial=0) > 65535:
            raise DataError(f"cannot use image {name}: its grey levels are beyond 16 bits; save it as 8 or 16 bits")
        if img.mode == "I" and pixels.max(initial=0) <= 255:  # 8-bit levels held in 32 bits
            return Image.fromarray(pixels.astype(np.uint8), "L").convert("RGB")
        rgb = Image.fromarray(np.rint(pixels / 257).astype(np.uint8), "L").convert("RGB")  # 65535 -> 255
        rgb.info[CONVERTED] = "16-bit"
        return rgb
    try:
        return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot decode image {name}: {reason(e)}") from None


def _decode_small(stream: Iterator[tuple[int, bytes, str]], n: int, desc: str, progress: bool) -> Tensor | str:
    """Decode (index, bytes, name) images to uint8 [n, 3, H, W] if they are small (<= SMALL px); else, as soon as
    the large ones are over LARGE_SHARE of the images decoded so far, give up and return one of them, named with its
    size: a dataset of large images (some of them small) is read lazily, each image resized.

    Small images are kept as one tensor and used as they are, so they must all be one size: a few images of another
    size among them, smaller or larger, are an error naming two files, found once every image is decoded. Images
    converted to 8 bits (16-bit ones) are told in one warning."""
    i, raw, first = next(stream)
    img = _decode(raw, first)
    if max(img.size) > SMALL:
        return f"{first} ({_wxh(img.size)})"
    size = img.size
    out = np.empty((n, img.height, img.width, 3), np.uint8)
    out[i] = np.asarray(img)
    odd: tuple[str, tuple[int, int]] | None = None  # the first image of another size
    large = 0
    converted = [first] if CONVERTED in img.info else []
    bar = tqdm(stream, desc=f"decoding {desc}", total=n, initial=1, unit="img", disable=not progress)
    for decoded, (i, raw, name) in enumerate(bar, 2):
        img = _decode(raw, name)
        if CONVERTED in img.info:
            converted.append(name)
        if max(img.size) > SMALL:
            large += 1
            if large > LARGE_SHARE * decoded:
                bar.close()
                return f"{name} ({_wxh(img.size)})"  # a dataset of large images, some of them small: read lazily
        if img.size != size:
            odd = odd or (name, img.size)
            continue
        out[i] = np.asarray(img)
    if odd is not None:
        raise DataError(
            f"images of {SMALL} px or less are used unresized, so must all be one size: "
            f"{first} is {_wxh(size)}, {odd[0]} is {_wxh(odd[1])}"
            + (f" ({large} over {SMALL} px: resize or remove them)" if large else "")
        )
    if converted:
        warnings.warn(
            f"{_count(len(converted), 'image')} of {desc} with 16-bit pixels (as {converted[0]}): scaled to 8 bits",
            stacklevel=2,
        )
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _count(n: int, noun: str) -> str:
    """'1 image', '2 images'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _wxh(size: tuple[int, int]) -> str:
    """A (width, height) as WxH."""
    return f"{size[0]}x{size[1]}"


# ---- CIFAR-10 python batches -------------------------------------------------------------------------------

# What numpy pickles arrays with; old pickles name it numpy.core.multiarray, new ones numpy._core.multiarray.
_reconstruct: Any = np.empty(0).__reduce__()[0]
_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(str, "latin1"); it only encodes text.
    ("_codecs", "encode"): codecs.encode,
}


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays and plain containers, and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise DataError(f"forbidden global {module}.{name}")
        return _PICKLE_GLOBALS[module, name]


def _unpickle(files: dict[str, bytes], name: str, where: str) -> dict[str, Any]:
    """A CIFAR-10 batch or metadata dict (bytes keys decoded), unpickled without running any code."""
    keys = ("label_names",) if name == "batches.meta" else ("data", "labels")
    file = f"{where}/{name}"
    try:
        obj = _NumpyUnpickler(io.BytesIO(files[name]), encoding="bytes").load()
    except DataError as e:
        raise DataError(f"refusing to load {file}: {e}") from None
    except Exception as e:  # a corrupt pickle can fail in many ways: UnpicklingError, EOFError, KeyError, ...
        raise DataError(f"corrupt CIFAR-10 batch {file}: {type(e).__name__}: {reason(e)}") from None
    batch = {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()} if isinstance(obj, dict) else {}
    if not all(k in batch for k in keys):
        raise DataError(f"{file} is not a CIFAR-10 batch: expected a dict with keys {', '.join(keys)}")
    return batch


def _cifar_files(split: str) -> list[str]:
    """Names of the CIFAR-10 files a split needs: the metadata, then its batches."""
    return [
        "batches.meta",
        *([f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]),
    ]


def _cifar(files: dict[str, bytes], where: str, split: str) -> ImageSplit:
    """A CIFAR-10 split from the contents of its python batch files."""
    meta, *names = _cifar_files(split)
    missing = [n for n in (meta, *names) if n not in files]
    if missing:
        raise DataError(f"missing CIFAR-10 file {missing[0]} in {where}")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in _unpickle(files, meta, where)["label_names"]]
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for name in names:
        batch = _unpickle(files, name, where)
        data, y = batch["data"], np.asarray(batch["labels"])
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (3072,)):
            raise DataError(f"{where}/{name} is not a CIFAR-10 batch: its data is not uint8 [N, 3072]")
        if not (y.shape == (len(data),) and y.dtype.kind in "iu" and ((y >= 0) & (y < len(classes))).all()):
            raise DataError(f"{where}/{name} is not a CIFAR-10 batch: expected {len(data)} labels < {len(classes)}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y)
    y_all = torch.from_numpy(np.concatenate(labels).astype(np.int64))
    return ImageSplit(classes, y_all, torch.from_numpy(np.concatenate(images)))


# ---- cache -------------------------------------------------------------------------------------------------


def _cache_file(path: Path, split: str, cache_dir: str | os.PathLike | None) -> Path:
    """Cache file of a source's split, keyed by its path, size and mtime and, for a folder, those of every entry
    that can go into the split: files three levels down (SPLIT/CLASS/IMAGE), other splits' folders themselves."""
    st = path.stat()
    key: list[object] = [CACHE_VERSION, str(path), split, st.st_size, st.st_mtime_ns]
    if path.is_dir():
        key += _tree_key(path, split)
    return cache_root(cache_dir) / f"{path.name}-{split}-{hashlib.sha256(repr(key).encode()).hexdigest()[:16]}.pt"


def _tree_key(folder: Path, split: str) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime) of the entries under `folder`, three levels deep, sorted; the folders of other
    splits than `split` are not entered (their own mtime changes when a class is added, removed or renamed)."""
    found = []
    stack: list[tuple[str, str, int]] = [(str(folder), "", 0)]
    while stack:
        where, rel, depth = stack.pop()
        try:
            entries = list(os.scandir(where))
        except OSError:
            continue
        for e in entries:
            found.append((rel + e.name, *_size_mtime(e.path)))
            other_split = depth == 0 and e.name in SPLITS and e.name not in SPLITS[split]
            if depth < 2 and not other_split and e.is_dir():
                stack.append((e.path, f"{rel}{e.name}/", depth + 1))
    return sorted(found)


def _size_mtime(path: str) -> tuple[int, int]:
    """Size and mtime of a file, or (-1, -1) where it cannot be read (a broken link)."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _save_cache(cache: Path, data: ImageSplit) -> None:
    """Write a decoded split atomically; where it cannot be written, say so and go on without it."""
    try:
        save_torch({"classes": data.classes, "labels": data.labels, "images": data.images}, cache)
    except OSError as e:  # an OutputError, from atomic_write
        why = str(e) if isinstance(e, OutputError) else f"cannot write {cache}: {reason(e)}"
        warnings.warn(
            f"not caching the decoded images ({why}); set CHIP_CACHE_DIR to a folder that can be written",
            stacklevel=3,
        )


def _load_cache(cache: Path) -> ImageSplit | None:
    """A cached split, or None (with a warning) if the file is not one: weights_only loading builds tensors and
    plain containers only, and a damaged cache is decoded again rather than trusted."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's note on the pickle protocol, before it refuses
            d = torch.load(cache, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        why = load_reason(e, cache)
    else:
        split = _cached_split(d)
        if split is not None:
            return split
        why = "not a cached split"
    warnings.warn(f"ignoring unreadable cache file {cache} ({why}): decoding the images again", stacklevel=2)
    return None


def _cached_split(d: object) -> ImageSplit | None:
    """The split a cache file's dict describes, if it is a well-formed one."""
    if not isinstance(d, dict):
        return None
    classes, labels, images = d.get("classes"), d.get("labels"), d.get("images")
    if not (
        isinstance(classes, list)
        and all(isinstance(c, str) for c in classes)
        and isinstance(labels, Tensor)
        and isinstance(images, Tensor)
    ):
        return None
    if not (
        images.dtype == torch.uint8
        and images.dim() == 4
        and images.shape[1] == 3
        and labels.dtype == torch.int64
        and labels.shape == images.shape[:1]
        and (len(labels) == 0 or 0 <= int(labels.min()) <= int(labels.max()) < len(classes))
    ):
        return None
    return ImageSplit(classes, labels, images)
