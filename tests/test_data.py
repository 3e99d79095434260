"""Tests for chipprune.data: sources, cache, safety, batches and transforms, on tiny synthetic datasets."""

from __future__ import annotations

import builtins
import io
import multiprocessing
import os
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from attacks import Payload
from chipprune.data import DataError, ImageSplit, batches, batching, load_split, sources
from images import CLASSES, make_tree

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_tar(dest: Path, root: Path, names: list[str], top: str = "") -> Path:
    """Archive root/<name> for each name as <top>/<name> (mode from the suffix of dest)."""
    with tarfile.open(dest, "w:gz" if dest.name.endswith("gz") else "w") as tar:
        for name in names:
            tar.add(root / name, arcname=f"{top}/{name}" if top else name)
    return dest


def make_cifar(folder: Path, batch: int = 2, test: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write a fake cifar-10-batches-py (protocol-2 pickles, bytes keys); (data, labels) of each batch."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    content = {}
    for name in names:
        n = test if name == "test_batch" else batch
        data, labels = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()
        batch_ = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x"] * n}
        (folder / name).write_bytes(pickle.dumps(batch_, protocol=2))
        content[name] = (data, labels)
    meta = {b"label_names": [c.encode() for c in ["plane", "car", "bird", "cat", "deer"] + list("fghij")]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return content


def pixels(data: ImageSplit, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """All batches of a split concatenated, un-normalized back to 0..255 floats."""
    xs, ys = zip(*batches(data, 3, mean=(0, 0, 0), std=(1, 1, 1), **kw), strict=True)
    return torch.cat(xs) * 255, torch.cat(ys)


# ---- sources -----------------------------------------------------------------------------------------------


def test_folder_round_trips_pixels_classes_and_labels(tmp_path: Path, cache: Path) -> None:
    expected = make_tree(tmp_path / "root")
    for split in ("train", "test"):
        data = load_split(tmp_path / "root", split, cache_dir=cache, progress=False)
        assert data.classes == ["ant", "cat", "dog"]
        assert data.images is not None and data.images.dtype == torch.uint8 and data.paths is None
        assert torch.equal(data.images, expected[split][0])
        assert torch.equal(data.labels, expected[split][1]) and data.labels.dtype == torch.int64
        assert len(data) == len(expected[split][1])


def test_tarballs_split_folders_and_archive_folders_agree_with_folder(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "root"
    expected = make_tree(root)
    many = tmp_path / "many"  # one tarball per split, as in shared/data
    many.mkdir()
    make_tar(many / "a-test.tgz", root, ["test"])
    make_tar(many / "b-train.tar.gz", root, ["train"])
    both = [
        make_tar(tmp_path / "top.tar.gz", root, ["train", "test"], top="mydata"),
        make_tar(tmp_path / "plain.tar", root, ["train", "test"]),
        many,
    ]
    for split in ("train", "test"):
        for path in [*both, root / split, many / ("b-train.tar.gz" if split == "train" else "a-test.tgz")]:
            data = load_split(path, split, cache_dir=cache, progress=False)
            assert data.classes == ["ant", "cat", "dog"], path
            assert data.images is not None and torch.equal(data.images, expected[split][0]), path
            assert torch.equal(data.labels, expected[split][1]), path


def test_test_and_val_stand_in_for_each_other(tmp_path: Path, cache: Path) -> None:
    expected = make_tree(tmp_path / "root", {"train": CLASSES["train"], "val": CLASSES["test"]})
    for source, split in [("root", "test"), ("root", "val"), ("root/val", "test")]:
        data = load_split(tmp_path / source, split, cache_dir=cache, progress=False)
        assert data.images is not None and torch.equal(data.images, expected["val"][0])
    with pytest.raises(DataError, match="is the 'train' split, not 'test'"):
        load_split(tmp_path / "root/train", "test", cache_dir=cache)


def test_other_split_without_class_folders_is_not_compared(tmp_path: Path, cache: Path) -> None:
    make_tree(tmp_path / "root", {"train": CLASSES["train"]})
    (tmp_path / "root/val").mkdir()
    Image.new("RGB", (8, 6)).save(tmp_path / "root/val/flat.png")  # as ImageNet's val before sorting
    assert len(load_split(tmp_path / "root", "train", cache_dir=cache, progress=False)) == 7
    with pytest.raises(DataError, match="no class folders in .*root/val"):
        load_split(tmp_path / "root", "val", cache_dir=cache, progress=False)


def test_cifar_folder_and_archive(tmp_path: Path, cache: Path) -> None:
    content = make_cifar(tmp_path / "c" / "cifar-10-batches-py")
    make_tar(tmp_path / "cifar-10-python.tar.gz", tmp_path / "c", ["cifar-10-batches-py"])
    for source in ["c", "c/cifar-10-batches-py", "cifar-10-python.tar.gz"]:
        train = load_split(tmp_path / source, "train", cache_dir=cache, progress=False)
        assert train.classes[:3] == ["plane", "car", "bird"] and len(train.classes) == 10
        data = np.concatenate([content[f"data_batch_{i}"][0] for i in range(1, 6)])
        assert train.images is not None and train.images.shape == (10, 3, 32, 32)
        # Row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major 32 x 32.
        k, c, y, x = 7, 2, 5, 30
        assert train.images[k, c, y, x] == data[k, c * 1024 + y * 32 + x]
        assert torch.equal(train.images.flatten(1), torch.from_numpy(data))
        assert train.labels.tolist() == sum((content[f"data_batch_{i}"][1] for i in range(1, 6)), [])
        for split in ("test", "val"):
            test = load_split(tmp_path / source, split, cache_dir=cache, progress=False)
            assert test.images is not None
            assert torch.equal(test.images.flatten(1), torch.from_numpy(content["test_batch"][0]))


@pytest.mark.parametrize("attack", ["system", "open"])
def test_malicious_cifar_pickle_is_refused_without_running(tmp_path: Path, cache: Path, attack: str) -> None:
    def payload(marker: Path) -> bytes:
        call = (os.system, f"touch {marker}") if attack == "system" else (builtins.open, str(marker), "w")
        return pickle.dumps({b"data": Payload(call[0], call[1:]), b"labels": [0]}, protocol=2)

    result = pickle.loads(payload(tmp_path / "proof"))[b"data"]  # unpickled naively, the payload does run
    if attack == "open":
        result.close()
    assert (tmp_path / "proof").exists()
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    (folder / "data_batch_2").write_bytes(payload(tmp_path / "pwned"))
    with pytest.raises(DataError, match=r"forbidden global (posix\.system|io\.open)"):
        load_split(folder, "train", cache_dir=cache)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ([1, 2], "not a CIFAR-10 batch: expected a dict"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "expected a dict with keys data, labels"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"uint8 \[N, 3072\]"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "2 labels < 10"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, protocol=2)[:-20], "corrupt"),
        (None, "missing CIFAR-10 file data_batch_3"),
    ],
)
def test_bad_cifar_batches(tmp_path: Path, cache: Path, batch: object, message: str) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    if batch is None:
        (folder / "data_batch_3").unlink()
    else:
        raw = batch if isinstance(batch, bytes) else pickle.dumps(batch, protocol=2)
        (folder / "data_batch_3").write_bytes(raw)
    with pytest.raises(DataError, match=message) as err:
        load_split(folder, "train", cache_dir=cache)
    assert "\n" not in str(err.value)


def _tree_with(tmp_path: Path, change: str) -> Path:
    """A source broken in one way (see test_errors)."""
    root = tmp_path / "root"
    if change == "missing":
        return tmp_path / "nope"
    if change == "empty":
        root.mkdir()
        return root
    if change == "unknown":
        (tmp_path / "data.txt").write_text("hello")
        return tmp_path / "data.txt"
    make_tree(root, {"train": CLASSES["train"]})
    if change == "no-classes":
        (tmp_path / "bare" / "train").mkdir(parents=True)
        return tmp_path / "bare"
    if change == "empty-class":
        (root / "train" / "eel").mkdir()
    if change == "mismatch":
        make_tree(root, {"test": {"ant": 1, "cat": 1, "emu": 1}})
    if change == "bad-image":
        (root / "train" / "cat" / "zz.png").write_bytes(b"not a png at all")
    if change == "truncated":
        raw = make_tar(tmp_path / "t.tar.gz", root, ["train"]).read_bytes()
        (tmp_path / "t.tar.gz").write_bytes(raw[: len(raw) // 2])
        return tmp_path / "t.tar.gz"
    if change == "not-tar":
        (tmp_path / "t.tar.gz").write_bytes(b"\x1f\x8bgarbage" * 10)
        return tmp_path / "t.tar.gz"
    if change == "unsafe":
        with tarfile.open(tmp_path / "t.tar", "w") as tar:
            tar.add(root / "train/cat/00.png", arcname="../train/cat/00.png")
        return tmp_path / "t.tar"
    if change == "no-images":
        with tarfile.open(tmp_path / "t.tar", "w") as tar:
            tar.addfile(tarfile.TarInfo("README"), io.BytesIO(b""))
        return tmp_path / "t.tar"
    return root


@pytest.mark.parametrize(
    ("change", "split", "message"),
    [
        ("missing", "train", "no such file or folder: .*nope"),
        ("empty", "train", "no CIFAR-10 batches, train/test/val folders or tar archives in"),
        ("unknown", "train", "unknown format: .*data.txt"),
        ("none", "valid", "split must be 'train', 'test' or 'val'"),
        ("none", "test", r"no 'test' split in .*root \(found: train\)"),
        ("no-classes", "train", "no class folders in .*bare/train"),
        ("empty-class", "train", "class folder 'eel' has no images in .*root/train"),
        ("mismatch", "test", "differ from the other split's: dog, emu"),
        ("bad-image", "train", "cannot decode image .*cat/zz.png"),
        ("truncated", "train", "corrupt or truncated archive .*t.tar.gz"),
        ("not-tar", "train", "corrupt or truncated archive .*t.tar.gz"),
        ("unsafe", "train", "unsafe member name '../train/cat/00.png'"),
        ("no-images", "train", r"no 'train' split in .*t.tar \(found: no images\)"),
    ],
)
def test_errors(tmp_path: Path, cache: Path, change: str, split: str, message: str) -> None:
    source = _tree_with(tmp_path, change)
    with pytest.raises(DataError, match=message) as err:
        load_split(source, split, cache_dir=cache, progress=False)
    assert "\n" not in str(err.value)


# ---- cache -------------------------------------------------------------------------------------------------


def test_cache_is_written_once_and_reused_until_the_source_changes(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    decode = sources._decode

    def counting_decode(raw: bytes, name: str) -> Image.Image:
        calls.append(name)
        return decode(raw, name)

    monkeypatch.setattr(sources, "_decode", counting_decode)
    expected = make_tree(tmp_path / "root")
    tarball = make_tar(tmp_path / "d.tar.gz", tmp_path / "root", ["train", "test"])

    first = load_split(tarball, "train", cache_dir=cache, progress=False)
    assert len(calls) == 7 and [p.suffix for p in cache.iterdir()] == [".pt"]  # no temp file left behind
    again = load_split(tarball, "train", cache_dir=cache, progress=False)
    assert len(calls) == 7, "second load must come from the cache"
    assert again.images is not None and torch.equal(again.images, expected["train"][0])
    assert again.classes == first.classes and torch.equal(again.labels, first.labels)

    (tmp_path / "root/train/dog/00.png").unlink()
    make_tar(tarball, tmp_path / "root", ["train", "test"])
    os.utime(tarball, ns=(0, 10**9))  # a different mtime even on coarse-clock file systems
    changed = load_split(tarball, "train", cache_dir=cache, progress=False)
    assert len(calls) == 7 + 6 and len(changed) == 6

    monkeypatch.setenv("CHIP_CACHE_DIR", str(tmp_path / "env-cache"))
    load_split(tarball, "test", progress=False)
    assert len(list((tmp_path / "env-cache").glob("d.tar.gz-test-*.pt"))) == 1


# ---- batches -----------------------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path: Path, cache: Path) -> ImageSplit:
    make_tree(tmp_path / "root", {"train": {"a": 12, "b": 10, "c": 18}}, size=(10, 9))
    return load_split(tmp_path / "root", "train", cache_dir=cache, progress=False)


def test_eval_batches_are_normalized_images_in_order(small: ImageSplit) -> None:
    assert small.images is not None
    out = list(batches(small, 16, mean=MEAN, std=STD))
    assert [len(y) for _, y in out] == [16, 16, 8]
    x, y = torch.cat([x for x, _ in out]), torch.cat([y for _, y in out])
    assert x.dtype == torch.float32 and x.shape == (40, 3, 9, 10) and torch.equal(y, small.labels)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (small.images.float() / 255 - mean) / std)


def test_shuffle_and_limit_are_seeded_and_repeatable(small: ImageSplit) -> None:
    def run(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(batches(small, 4, mean=MEAN, std=STD, shuffle=True, seed=seed, limit=10))

    first = run(0)
    assert [len(y) for _, y in first] == [4, 4, 2]
    for (x0, y0), (x1, y1) in zip(first, run(0), strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    labels = torch.cat([y for _, y in first])
    assert not torch.equal(labels, torch.cat([y for _, y in run(1)]))
    assert not torch.equal(labels, small.labels[:10]), "shuffled"
    assert sum(len(y) for _, y in batches(small, 4, mean=MEAN, std=STD, limit=0)) == 0


def test_train_augmentation_is_a_seeded_padded_crop_with_flips(small: ImageSplit) -> None:
    assert small.images is not None
    x, y = pixels(small, train=True, seed=3)
    assert x.shape == small.images.shape and torch.equal(y, small.labels)
    assert torch.equal(x, pixels(small, train=True, seed=3)[0])
    assert not torch.equal(x, pixels(small, train=True, seed=4)[0])
    assert not torch.equal(x, small.images.float())
    padded = torch.nn.functional.pad(small.images, (4, 4, 4, 4)).float()
    flips = []
    for out, src in zip(x.round(), padded, strict=True):
        crops = {
            (dy, dx, flip): (src.flip(-1) if flip else src)[:, dy : dy + 9, dx : dx + 10]
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
        }
        matches = [k for k, crop in crops.items() if torch.equal(out, crop)]
        assert matches, "every augmented image is a crop of the zero-padded (maybe flipped) image"
        flips.append(matches[0][2])
    assert any(flips) and not all(flips)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (benchmarks/gpu.sh runs it there)")
def test_same_batches_on_the_gpu_as_on_the_cpu(small: ImageSplit) -> None:
    # On a GPU the uint8 images stay on the device and are cropped and flipped there; the draws stay on the CPU's
    # generator, so a seed gives the very batches the CPU path gives.
    for train in (False, True):
        kw = dict(mean=MEAN, std=STD, train=train, shuffle=True, seed=5, limit=30)
        on_cpu = list(batches(small, 8, **kw))
        on_gpu = list(batches(small, 8, device="cuda", **kw))
        assert len(on_cpu) == len(on_gpu) == 4
        for (xc, yc), (xg, yg) in zip(on_cpu, on_gpu, strict=True):
            assert xg.device.type == "cuda" and torch.equal(yc, yg.cpu())
            torch.testing.assert_close(xc, xg.cpu(), rtol=0, atol=1e-6)


def test_bad_batch_arguments(small: ImageSplit) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        batches(small, 0, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="3 values"):
        batches(small, 4, mean=(0.5,), std=STD)


# ---- lazy (large images) -----------------------------------------------------------------------------------


@pytest.fixture
def large(tmp_path: Path) -> Path:
    make_tree(tmp_path / "big", {"train": {"x": 2, "y": 3}}, size=(300, 280))
    return tmp_path / "big"


def test_large_images_are_lazy_and_give_224_batches(large: Path, cache: Path) -> None:
    data = load_split(large, "train", cache_dir=cache, progress=False)
    assert data.images is None and data.paths is not None and len(data.paths) == 5
    assert data.labels.tolist() == [0, 0, 1, 1, 1] and not cache.exists(), "large images are not cached"
    x, y = pixels(data)
    assert x.shape == (5, 3, 224, 224) and y.tolist() == [0, 0, 1, 1, 1]
    # Shorter side 280 -> 256 (300 -> int(256 * 300 / 280) = 274), then the central 224 x 224.
    img = Image.open(data.paths[2]).resize((274, 256), Image.Resampling.BILINEAR).crop((25, 16, 249, 240))
    assert torch.equal(x[2].round().to(torch.uint8), torch.from_numpy(np.array(img)).permute(2, 0, 1))
    assert pixels(data, image_size=64)[0].shape == (5, 3, 64, 64)


def test_lazy_train_crops_are_seeded_whatever_the_workers(large: Path, cache: Path) -> None:
    data = load_split(large, "train", cache_dir=cache, progress=False)
    x = pixels(data, train=True, shuffle=True, seed=5)[0]
    assert x.shape == (5, 3, 224, 224)
    assert torch.equal(x, pixels(data, train=True, shuffle=True, seed=5, workers=1)[0])
    assert not torch.equal(x, pixels(data, train=True, shuffle=True, seed=6)[0])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_lazy_image_is_named_in_one_line(large: Path, cache: Path, workers: int) -> None:
    data = load_split(large, "train", cache_dir=cache, progress=False)
    (large / "train/y/01.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"^cannot decode image .*train/y/01.png: cannot identify") as err:
        list(batches(data, 2, mean=MEAN, std=STD, workers=workers))
    assert "\n" not in str(err.value)
    assert not multiprocessing.active_children(), "the worker is stopped at once, not at some later gc pass"


def test_lazy_images_read_from_an_uncompressed_tar(large: Path, cache: Path, tmp_path: Path) -> None:
    folder = load_split(large, "train", cache_dir=cache, progress=False)
    tarball = make_tar(tmp_path / "big.tar", large, ["train"])
    tar = load_split(tarball, "train", cache_dir=cache, progress=False)
    assert tar.images is None and tar.archive is not None
    assert torch.equal(pixels(tar, train=True)[0], pixels(folder, train=True)[0])
    with pytest.raises(DataError, match="uncompressed .tar: extract"):
        load_split(make_tar(tmp_path / "big.tar.gz", large, ["train"]), "train", cache_dir=cache)


def test_random_resized_crop_box_bounds_and_fallback() -> None:
    for seed in range(200):
        left, top, w, h = batching._crop_box(300, 280, torch.Generator().manual_seed(seed))
        assert min(left, top) >= 0 and left + w <= 300 and top + h <= 280
        assert 0.07 <= w * h / (300 * 280) <= 1 and 0.7 <= w / h <= 1.4
    assert batching._crop_box(1000, 10, torch.Generator()) == ((1000 - 13) // 2, 0, 13, 10)


# ---- the real CIFAR-10 JPEG tarball, where present ---------------------------------------------------------


@pytest.mark.skipif(not (SHARED_DATA / "cifar10-jpeg-test.tar.gz").exists(), reason="no shared data")
def test_shared_cifar10_jpeg_test_tarball(cache: Path) -> None:
    data = load_split(SHARED_DATA / "cifar10-jpeg-test.tar.gz", "test", cache_dir=cache, progress=False)
    assert len(data) == 10_000 and len(data.classes) == 10 and data.classes[0] == "airplane"
    assert data.images is not None and data.images.shape == (10_000, 3, 32, 32)
    assert torch.bincount(data.labels).tolist() == [1000] * 10
