"""Hardening against untrusted input, through the `chip` command and the readers behind it: model, weights, data and
scores files run no code; damaged files, bad data and bad options are one line on stderr with exit code 2 and no
traceback; the readers are fuzzed."""

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from attacks import Payload, touching
from chipprune.data import DataError, load_split, sources
from chipprune.files.modelfile import (
    CIFAR10_CLASSES,
    FORMAT,
    ModelFile,
    ModelFileError,
    import_weights,
    load_model,
)
from chipprune.files.scores import ScoresError, read_scores
from chipprune.models import ARCHS, create_model
from chipprune.pruning.sparsity import SparsityError, format_rates, parse_rates, resolve, widths
from command import run
from images import make_tree
from refusals import assert_refused, fill

SRC = Path(__file__).resolve().parents[1] / "src" / "chipprune"
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- untrusted files run no code ---------------------------------------------------------------------------


def evil_model(path, marker, how):
    """A 'model file' whose unpickling runs code: torch.save'd or pickle.dump'ed."""
    payload = {"format": FORMAT, "arch": "resnet20", "state_dict": {"conv1.weight": touching(marker)}}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


def evil_weights(path, marker, how):
    """Third-party 'weights' whose unpickling runs code: a state_dict under 'state_dict', or a bare one."""
    state = {"conv1.weight": touching(marker), "fc.weight": torch.zeros(10, 64)}
    if how == "torch.save":
        torch.save({"state_dict": state}, path)
    else:
        path.write_bytes(pickle.dumps(state))
    return path


def evil_cifar(root, marker, how):
    """A cifar-10-batches-py folder (or cifar-10-python.tar.gz) with valid metadata and booby-trapped batches."""
    folder = root / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}, protocol=2)
    )
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": touching(marker), b"labels": [0]}, protocol=2))
    if how == "folder":
        return folder
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    shutil.rmtree(root / "cifar")
    return root / "cifar-10-python.tar.gz"


def naive_load(path):
    """Load a file as a careless reader would: torch.load without weights_only, or plain pickle."""
    if path.is_dir():
        return pickle.loads((path / "data_batch_1").read_bytes())
    if path.name.endswith(".tar.gz"):
        with tarfile.open(path) as tar:
            return pickle.loads(tar.extractfile("cifar-10-batches-py/data_batch_1").read())
    if zipfile.is_zipfile(path):  # torch.save's format
        return torch.load(path, weights_only=False)
    return pickle.loads(path.read_bytes())


@pytest.mark.parametrize(
    "make",
    [
        lambda tmp, m: evil_model(tmp / "m.pt", m, "torch.save"),
        lambda tmp, m: evil_model(tmp / "m.pt", m, "pickle"),
        lambda tmp, m: evil_weights(tmp / "w.th", m, "torch.save"),
        lambda tmp, m: evil_weights(tmp / "w.th", m, "pickle"),
        lambda tmp, m: evil_cifar(tmp, m, "folder"),
        lambda tmp, m: evil_cifar(tmp, m, "tarball"),
    ],
    ids=["model-torch.save", "model-pickle", "weights-torch.save", "weights-pickle", "cifar-folder", "cifar-tarball"],
)
@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's notes on the pickle protocol
def test_the_attack_files_are_live(tmp_path, make):
    """Loaded carelessly, each crafted file does run its code: the refusals below are not vacuous."""
    marker = tmp_path / "pwned"
    path = make(tmp_path, marker)
    naive_load(path)
    assert marker.exists()


MODEL_COMMANDS = {
    "profile": ["profile", "{m}"],
    "export": ["export", "{m}", "--format", "torchscript", "--out", "{o}/x.ts"],
    "score": ["score", "{m}", "--data", "{d}", "--batches", "1", "--batch-size", "4", "--out", "{o}/s.json"],
    "prune": ["prune", "{m}", "--criterion", "l1", "--sparsity", "[0.]*12", "--out", "{o}/p.pt"],
    "eval": ["eval", "{m}", "--data", "{d}"],
    "finetune": [
        "finetune",
        "{m}",
        "--data",
        "{d}",
        "--out-dir",
        "{o}/run",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--workers",
        "0",
    ],
}
IMPORT = ["import", "--arch", "resnet20", "--weights", "{m}", "--out", "{o}/i.pt"]
DATA_COMMANDS = {
    "score": ["score", "{m}", "--data", "{d}", "--batches", "1", "--batch-size", "4", "--out", "{o}/s.json"],
    "prune": [
        "prune",
        "{m}",
        "--data",
        "{d}",
        "--batches",
        "1",
        "--batch-size",
        "4",
        "--sparsity",
        "[0.]*12",
        "--out",
        "{o}/p.pt",
    ],
    "prune-recalibrate": [
        "prune",
        "{m}",
        "--criterion",
        "l1",
        "--data",
        "{d}",
        "--recalibrate-bn",
        "1",
        "--batch-size",
        "4",
        "--sparsity",
        "[0.]*12",
        "--out",
        "{o}/p.pt",
    ],
    "eval": ["eval", "{m}", "--data", "{d}"],
    "finetune": MODEL_COMMANDS["finetune"],
    "train": [
        "train",
        "--arch",
        "resnet20",
        "--data",
        "{d}",
        "--out-dir",
        "{o}/run",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--workers",
        "0",
    ],
}


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
@pytest.mark.parametrize("command", [*MODEL_COMMANDS, "import"])
def test_a_model_or_weights_file_runs_no_code(capsys, workdir, tmp_path, out, command, how):
    marker = tmp_path / "pwned"
    make = evil_weights if command == "import" else evil_model
    path = make(tmp_path / "evil.pt", marker, how)
    args = IMPORT if command == "import" else MODEL_COMMANDS[command]
    result = run(capsys, *fill(args, m=path, d=workdir / "data", o=out))
    assert_refused(result, path, "cannot be read safely")
    assert "weights_only" not in result[2], "no advice to turn the safety off"
    assert not marker.exists() and not any(out.iterdir())


@pytest.mark.parametrize("how", ["folder", "tarball"])
@pytest.mark.parametrize("command", list(DATA_COMMANDS))
def test_cifar_batches_run_no_code(capsys, workdir, tmp_path, out, command, how):
    marker = tmp_path / "pwned"
    data = evil_cifar(tmp_path, marker, how)
    result = run(capsys, *fill(DATA_COMMANDS[command], m=workdir / "r20.pt", d=data, o=out))
    assert_refused(result, data, "forbidden global posix.system")
    assert not marker.exists() and not any(out.iterdir())


@pytest.mark.parametrize("command", ["finetune", "train"])
def test_a_run_folder_checkpoint_runs_no_code_on_resume(capsys, workdir, tmp_path, out, command):
    marker = tmp_path / "pwned"
    (out / "run").mkdir()
    last = evil_model(out / "run" / "last.pt", marker, "torch.save")
    before = last.read_bytes()
    result = run(capsys, *fill(DATA_COMMANDS[command], m=workdir / "r20.pt", d=workdir / "data", o=out), "--resume")
    assert_refused(result, last, "cannot be read safely")
    assert not marker.exists() and last.read_bytes() == before


def test_a_scores_file_runs_no_code(capsys, workdir, tmp_path, out):
    marker = tmp_path / "pwned"
    scores = tmp_path / "s.json"
    scores.write_bytes(pickle.dumps({"format": "chipprune-scores/1", "layers": touching(marker)}))
    result = run(
        capsys, "prune", workdir / "r20.pt", "--scores", scores, "--sparsity", "[0.]*12", "--out", out / "p.pt"
    )
    assert_refused(result, scores, "cannot read scores JSON")
    assert not marker.exists() and not any(out.iterdir())


# ---- damaged model files -----------------------------------------------------------------------------------


def spoiled(raw: bytes, how: str) -> bytes:
    """A file's bytes broken one way: empty, cut in half, or random bytes of the same length."""
    return {"empty": b"", "truncated": raw[: len(raw) // 2], "corrupt": np.random.default_rng(0).bytes(len(raw))}[how]


def damaged(path, kind, good):
    """A model file broken in one way, made from the good one."""
    if kind in ("empty", "truncated", "corrupt"):
        path.write_bytes(spoiled(good.read_bytes(), kind))
    elif kind != "missing":
        d = torch.load(good, weights_only=True)
        if kind == "unknown-arch":
            d["arch"] = "resnet99"
        elif kind == "no-classes":
            del d["classes"]
        elif kind == "bad-widths":
            d["widths"] = {"conv1": "sixteen"}
        elif kind == "bad-state":
            d["state_dict"] = ["not", "a", "dict"]
        torch.save(d, path)
    return path


FILE_DAMAGE = {
    "missing": "no such file",
    "empty": "empty file (0 bytes)",
    "truncated": "corrupt or truncated",
    "corrupt": "corrupt or truncated",
}
FIELD_DAMAGE = {
    "unknown-arch": "damaged model file: unknown architecture 'resnet99'",
    "no-classes": "damaged model file: no 'classes'",
    "bad-widths": "damaged model file: invalid 'widths'",
    "bad-state": "damaged model file: invalid 'state_dict'",
}


@pytest.mark.parametrize(
    ("command", "kind"),
    [  # import reads any state_dict, not a model file's fields
        *((c, k) for c in MODEL_COMMANDS for k in (*FILE_DAMAGE, *FIELD_DAMAGE)),
        *(("import", k) for k in FILE_DAMAGE),
    ],
)
def test_damaged_model_files_are_one_line_errors(capsys, workdir, tmp_path, out, command, kind):
    path = damaged(tmp_path / "bad.pt", kind, workdir / "r20.pt")
    args = IMPORT if command == "import" else MODEL_COMMANDS[command]
    result = run(capsys, *fill(args, m=path, d=workdir / "data", o=out))
    assert_refused(result, path, {**FILE_DAMAGE, **FIELD_DAMAGE}[kind])
    assert not any(out.iterdir())


def test_weights_of_other_names_and_shapes_are_listed(capsys, workdir, tmp_path, out):
    state = create_model("resnet20").state_dict()
    state["layer1.0.bn1.weight"] = torch.ones(3)
    del state["layer2.0.conv1.weight"]
    state["head.weight"] = torch.ones(1)
    torch.save(state, tmp_path / "w.th")
    assert_refused(
        run(capsys, *fill(IMPORT, m=tmp_path / "w.th", o=out)),
        "weights do not fit the architecture",
        "missing layer2.0.conv1.weight",
        "unexpected head.weight",
        "layer1.0.bn1.weight: shape (3,)",
    )
    d = torch.load(workdir / "r20.pt", weights_only=True)  # a model file whose weights were edited
    d["state_dict"]["layer3.2.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(d, tmp_path / "m.pt")
    assert_refused(
        run(capsys, "profile", tmp_path / "m.pt"),
        "layer3.2.conv2.weight: shape (64, 64, 1, 1) where the model has (64, 64, 3, 3)",
    )


@pytest.mark.parametrize("signs", ["+", "+-"])
@pytest.mark.parametrize("command", ["score", "prune"])
def test_non_finite_activations_name_the_layer(capsys, workdir, tmp_path, out, command, signs):
    d = torch.load(workdir / "r20.pt", weights_only=True)  # finite weights (others are refused on loading) ...
    weight = d["state_dict"]["layer2.0.conv1.weight"]
    weight.fill_(3e38)  # ... whose sums overflow float32: to Inf, or with both signs to NaN (Inf - Inf)
    if signs == "+-":
        weight[:, ::2] = -3e38
    torch.save(d, tmp_path / "m.pt")
    result = run(capsys, *fill(DATA_COMMANDS[command], m=tmp_path / "m.pt", d=workdir / "data", o=out))
    assert_refused(result, f"chip {command.split('-')[0]}: error: non-finite activations in layer2.0.conv1")
    assert not any(out.iterdir())


# ---- bad data ----------------------------------------------------------------------------------------------


def broken_data(root, kind, good):
    """A copy of the good image folder (or a tarball of it) broken in one way, in both splits."""
    if kind.endswith("archive"):
        path = root / "data.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            tar.add(good, arcname="data")
        path.write_bytes(spoiled(path.read_bytes(), kind.removesuffix("-archive")))
        return path
    data = shutil.copytree(good, root / "data")
    for split in ("train", "test"):
        image = data / split / "cat" / "0.png"
        if kind.endswith("-image"):
            image.write_bytes(spoiled(image.read_bytes(), kind.removesuffix("-image")))
        elif kind == "no-images":
            for f in (data / split / "cat").iterdir():
                f.unlink()
            (data / split / "cat" / "README.txt").write_text("no images here")
        elif kind == "no-class-folders":
            for d in list((data / split).iterdir()):
                shutil.rmtree(d)
            Image.new("RGB", (32, 32)).save(data / split / "flat.png")
    return data


DATA_DAMAGE = {
    "empty-archive": ("empty archive", "data.tar.gz"),
    "truncated-archive": ("corrupt or truncated archive", "data.tar.gz"),
    "corrupt-archive": ("corrupt or truncated archive", "data.tar.gz"),
    "empty-image": ("empty image file", "cat/0.png"),
    "truncated-image": ("cannot decode image", "cat/0.png"),
    "corrupt-image": ("cannot decode image", "cat/0.png"),
    "no-images": ("class folder 'cat' has no images", "data/"),
    "no-class-folders": ("no class folders in", "data/"),
}


@pytest.mark.parametrize("kind", list(DATA_DAMAGE))
@pytest.mark.parametrize("command", ["score", "eval", "train"])
def test_damaged_data_is_a_one_line_error(capsys, workdir, tmp_path, out, command, kind):
    data = broken_data(tmp_path, kind, workdir / "data")
    result = run(capsys, *fill(DATA_COMMANDS[command], m=workdir / "r20.pt", d=data, o=out))
    assert_refused(result, f"chip {command}: error: ", *DATA_DAMAGE[kind])
    assert not any(out.iterdir())


def test_a_damaged_test_split_stops_training_rather_than_skipping_evaluation(capsys, workdir, tmp_path, out):
    data = shutil.copytree(workdir / "data", tmp_path / "data")
    (data / "test" / "dog" / "1.png").write_bytes(b"garbage")
    result = run(capsys, *fill(DATA_COMMANDS["train"], m="", d=data, o=out))
    assert_refused(result, "cannot decode image", "test/dog/1.png")
    assert "training without evaluation" not in result[2] and not (out / "run" / "last.pt").exists()


def test_mixed_image_sizes_name_two_files_and_sizes(capsys, workdir, tmp_path, out):
    data = shutil.copytree(workdir / "data", tmp_path / "data")
    Image.new("RGB", (28, 30)).save(data / "train" / "horse" / "2.png")
    result = run(capsys, *fill(DATA_COMMANDS["score"], m=workdir / "r20.pt", d=data, o=out))
    assert_refused(result, "must all be one size", "airplane/0.png is 32x32", "horse/2.png is 28x30")


def test_inconsistent_classes_between_the_splits(capsys, workdir, tmp_path, out):
    data = shutil.copytree(workdir / "data", tmp_path / "data")
    (data / "test" / "truck").rename(data / "test" / "lorry")
    for command in ("eval", "train"):
        result = run(capsys, *fill(DATA_COMMANDS[command], m=workdir / "r20.pt", d=data, o=out))
        assert_refused(result, "differ from the other split's: lorry, truck")
    # Each split in its own tarball, or the evaluation split given apart: compared when training.
    many, val = tmp_path / "many", tmp_path / "val"
    many.mkdir()
    for split in ("train", "test"):
        with tarfile.open(many / f"{split}.tar.gz", "w:gz") as tar:
            tar.add(data / split, arcname=split)
    shutil.copytree(data / "test", val / "test")
    for source in ([many], [workdir / "data", "--val-data", val]):
        result = run(
            capsys,
            "train",
            "--arch",
            "resnet20",
            "--data",
            *source,
            "--out-dir",
            out / "run",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--workers",
            "0",
        )
        assert_refused(result, "the evaluation split's classes differ")
    assert not any(out.iterdir())


# ---- bad options -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["profile", "--arch", "resnet20", "--sparsity", "[0.]+[0.99]*11"], "sparsity leaves no channels in"),
        (
            ["prune", "{m}", "--criterion", "l1", "--sparsity", "[0.]+[0.95]*11", "--out", "{o}/p.pt"],
            "sparsity leaves no channels in",
        ),
        (["prune", "{m}", "--criterion", "l1", "--sparsity", "[0.]*11+[-0.1]", "--out", "{o}/p.pt"], "not a rate"),
        (["profile", "--arch", "resnet20", "--sparsity", "[0.1]*x"], "cannot read '[0.1]*x'"),
        (["profile", "--arch", "resnet20", "--sparsity", "__import__('os')"], "not a rate"),
        (["profile", "--arch", "resnet20", "--sparsity", " "], "empty sparsity"),
        (["profile", "--arch", "vgg16_bn", "--sparsity", "[0.5]*13"], "vgg16_bn takes 12 rates"),
    ],
)
def test_bad_sparsity_is_a_one_line_error(capsys, workdir, out, args, message):
    assert_refused(run(capsys, *fill(args, m=workdir / "r20.pt", o=out)), message)
    assert not any(out.iterdir())


def test_a_huge_repeat_count_is_a_one_line_error(capsys):
    assert_refused(run(capsys, "profile", "--arch", "resnet20", "--sparsity", "[0.1]*" + "9" * 30), "rates")


@pytest.mark.parametrize(
    "args",
    [
        ["profile", "--arch", "resnet99"],
        ["import", "--arch", "resnet99", "--weights", "w.th", "--out", "x.pt"],
        ["train", "--arch", "resnet99", "--data", "d", "--out-dir", "r"],
    ],
)
def test_an_unknown_architecture_lists_the_known_ones(capsys, args):
    code, out, err = run(capsys, *args)
    assert code == 2 and out == "" and "Traceback" not in err
    assert "unknown architecture 'resnet99'" in err and "resnet20" in err and "vgg16_bn" in err
    assert "torchvision:NAME or timm:NAME" in err and err.count("\n") == 1


# ---- sparsity strings --------------------------------------------------------------------------------------


# Pieces of sparsity strings, near-valid and not: st.text alone seldom makes a bracket list. No bare digits, so a
# repeat count has at most two digits (a count of billions would build a list of billions: see test_hardening).
PIECES = ["[", "]", "0.1", ".5", "1e-1", "1.", "0.", "*3", ",", "+", " ", "-", "x", "e5", "(", ";", "paper-1"]


@given(st.lists(st.sampled_from(PIECES), max_size=12).map("".join))
def test_near_valid_strings_raise_nothing_but_our_error(text):
    for call in (parse_rates, lambda t: resolve("resnet20", t), lambda t: widths("resnet56", t)):
        with contextlib.suppress(SparsityError):
            call(text)


@given(
    st.sampled_from(sorted(ARCHS)).flatmap(
        lambda a: st.tuples(
            st.just(a),
            st.lists(st.floats(0, 1, exclude_max=True), min_size=ARCHS[a].num_rates, max_size=ARCHS[a].num_rates),
        )
    )
)
def test_valid_configurations_round_trip_in_both_forms(arch_rates):
    arch, rates = arch_rates
    assert resolve(arch, format_rates(rates)) == rates
    assert resolve(arch, ",".join(map(repr, rates))) == rates
    try:
        w = widths(arch, format_rates(rates))
    except SparsityError as e:
        assert "leaves no channels" in str(e)
    else:
        assert min(w.values()) >= 1


# ---- model files, read directly ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(arch="resnet99"), "unknown architecture 'resnet99'"),
        (lambda d: d.pop("state_dict"), "no 'state_dict'"),
        (lambda d: d.update(num_classes=0), "invalid 'num_classes'"),
        (lambda d: d.update(classes=["a", "b"]), "invalid 'classes'"),
        (lambda d: d.update(std=[1.0, 0.0, 1.0]), "invalid 'std'"),
        (lambda d: d.update(widths={"conv1": -3}), "invalid 'widths'"),
        (lambda d: d.update(widths={"nonsense": 3}), "widths do not fit resnet20"),
        (lambda d: d.update(training=[1]), "invalid 'training'"),
    ],
)
def test_a_damaged_model_dict_names_the_field(tmp_path, change, message):
    ModelFile("resnet20", create_model("resnet20"), (0.5,) * 3, (0.5,) * 3, [str(i) for i in range(10)]).save(
        tmp_path / "m.pt"
    )
    d = torch.load(tmp_path / "m.pt", weights_only=True)
    change(d)
    torch.save(d, tmp_path / "m.pt")
    with pytest.raises(ModelFileError, match=message) as e:
        load_model(tmp_path / "m.pt")
    assert str(e.value).startswith(f"{tmp_path / 'm.pt'}: ") and "\n" not in str(e.value)


def test_refusals_never_advise_turning_weights_only_off(tmp_path):
    torch.save({"a": touching(tmp_path / "pwned")}, tmp_path / "evil.pt")
    with pytest.raises(ModelFileError) as e:
        load_model(tmp_path / "evil.pt")
    assert "it asks for posix.system" in str(e.value) and "weights_only" not in str(e.value)


def test_import_reports_tensors_of_the_wrong_rank_as_shape_mismatches(tmp_path):
    state = create_model("resnet20").state_dict()
    state["conv1.weight"], state["fc.weight"] = torch.tensor(1.0), torch.zeros(10)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ModelFileError, match=r"conv1.weight: shape \(\) where the model has \(16, 3, 3, 3\)") as e:
        import_weights("resnet20", tmp_path / "w.pt")
    assert "fc.weight: shape (10,)" in str(e.value)


# ---- data sources and the decoded-image cache, read directly -----------------------------------------------


def test_small_images_of_mixed_sizes_are_an_error_naming_two(tmp_path: Path, cache: Path) -> None:
    make_tree(tmp_path / "root", {"train": {"a": 2, "b": 2}}, size=(8, 6))
    Image.new("RGB", (7, 6)).save(tmp_path / "root/train/b/01.png")
    with pytest.raises(DataError, match=r"must all be one size: .*a/00.png is 8x6, .*b/01.png is 7x6$"):
        load_split(tmp_path / "root", "train", cache_dir=cache, progress=False)
    assert not cache.exists(), "nothing cached"


def test_small_then_large_images_are_read_lazily(tmp_path: Path, cache: Path) -> None:
    make_tree(tmp_path / "root", {"train": {"a": 1, "b": 1, "c": 1}}, size=(8, 6))  # ImageNet has tiny images too
    Image.new("RGB", (7, 6)).save(tmp_path / "root/train/b/00.png")
    Image.new("RGB", (300, 200)).save(tmp_path / "root/train/c/00.png")
    data = load_split(tmp_path / "root", "train", cache_dir=cache, progress=False)
    assert data.images is None and data.paths is not None and len(data.paths) == 3


@pytest.mark.parametrize(
    ("name", "message"),
    [("d.tar.gz", "empty archive .*d.tar.gz"), ("root/train/a/00.png", "empty image file .*a/00.png")],
)
def test_empty_files_are_named(tmp_path: Path, cache: Path, name: str, message: str) -> None:
    make_tree(tmp_path / "root", {"train": {"a": 2}})
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError, match=message):
        load_split(tmp_path / name.split("/")[0], "train", cache_dir=cache, progress=False)


def test_an_absent_split_is_told_apart_from_a_damaged_one(tmp_path: Path, cache: Path) -> None:
    make_tree(tmp_path / "root", {"train": {"a": 2}})
    with pytest.raises(sources.MissingSplit):
        load_split(tmp_path / "root", "test", cache_dir=cache, progress=False)
    make_tree(tmp_path / "root", {"test": {"a": 1}})
    (tmp_path / "root/test/a/00.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot decode") as err:
        load_split(tmp_path / "root", "test", cache_dir=cache, progress=False)
    assert not isinstance(err.value, sources.MissingSplit)


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", "malicious", "wrong-dtype"])
@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's note on the pickle protocol
def test_a_damaged_cache_file_is_decoded_again(tmp_path: Path, cache: Path, content: bytes | str) -> None:
    expected = make_tree(tmp_path / "root", {"train": {"a": 2}})
    load_split(tmp_path / "root", "train", cache_dir=cache, progress=False)
    (file,) = cache.iterdir()
    if content == "malicious":
        file.write_bytes(pickle.dumps({"classes": Payload(os.system, (f"touch {tmp_path / 'pwned'}",))}))
    elif content == "wrong-dtype":
        torch.save({"classes": ["a"], "labels": torch.zeros(2, dtype=torch.int64), "images": torch.zeros(2, 3)}, file)
    else:
        file.write_bytes(content)  # type: ignore[arg-type]
    with pytest.warns(UserWarning, match=f"ignoring unreadable cache file {re.escape(str(file))}") as said:
        data = load_split(tmp_path / "root", "train", cache_dir=cache, progress=False)
    assert data.images is not None and torch.equal(data.images, expected["train"][0])
    assert not any("weights_only" in str(w.message) for w in said)
    assert not (tmp_path / "pwned").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten: read from the cache again, without a word
        assert load_split(tmp_path / "root", "train", cache_dir=cache, progress=False).images is not None


# ==== round 2 (issue 20): one test (or a few) per class of defect, each over several inputs ===================


# ---- fuzzing the readers of untrusted files: nothing but their own one-line errors -------------------------


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
R20_WIDTHS = create_model("resnet20").widths


@st.composite
def scores_documents(draw):
    """JSON documents near a valid scores file: the format, some of the convs, values of every kind."""
    layers = {conv: [draw(st.floats(-1e3, 1e3))] * c for conv, c in R20_WIDTHS.items()}
    for conv in draw(st.lists(st.sampled_from(sorted(R20_WIDTHS)), max_size=3)):
        layers[conv] = draw(st.one_of(JSON, st.lists(JSON, min_size=R20_WIDTHS[conv], max_size=R20_WIDTHS[conv])))
    d = {"format": "chipprune-scores/1", "arch": "resnet20", "criterion": "chip", "images": 8, "layers": layers}
    for key in draw(st.lists(st.sampled_from([*d, "seed", "processes"]), max_size=2)):
        if draw(st.booleans()):
            d[key] = draw(JSON)
        else:
            d.pop(key, None)
    return d if draw(st.integers(0, 9)) else draw(JSON)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=scores_documents())
def test_fuzz_the_scores_reader(tmp_path, document):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(document))
    try:
        scores, how = read_scores(path, "resnet20", R20_WIDTHS)
    except ScoresError as e:
        assert str(e).startswith(f"{path}") and "\n" not in str(e)
    else:
        assert {k: len(v) for k, v in scores.items()} == R20_WIDTHS
        assert all(bool(torch.isfinite(v).all()) and v.dtype == torch.float64 for v in scores.values())
        assert how["criterion"] in ("chip", "hrank", "l1", "random")


def tensors():
    """Small tensors of any dtype, shape and value."""
    dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool])
    shapes = st.lists(st.integers(0, 4), max_size=4)
    fill = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-5, 5))
    return st.builds(lambda dtype, shape, v: torch.full(shape, v).to(dtype), dtypes, shapes, fill)


ANYTHING = st.one_of(JSON, tensors(), st.lists(tensors(), max_size=3), st.dictionaries(st.text(max_size=4), tensors()))
R20 = None


@st.composite
def model_dicts(draw):
    """A ResNet-20 model file's dict with a few fields, widths or weights replaced by anything, or removed."""
    global R20
    if R20 is None:
        with tempfile.TemporaryDirectory() as tmp:
            model = ModelFile("resnet20", create_model("resnet20"), (0.5,) * 3, (0.25,) * 3, list(CIFAR10_CLASSES))
            model.save(Path(tmp) / "m.pt")
            R20 = (Path(tmp) / "m.pt").read_bytes()
    d = torch.load(io.BytesIO(R20), weights_only=True)
    order = ["width", "weight", "field"]
    changes = sorted(draw(st.lists(st.sampled_from(order), min_size=1, max_size=3)), key=order.index)
    for where in changes:  # widths and weights first: a field replaced may be one of them
        if where == "width":
            conv = draw(st.sampled_from(sorted(d["widths"]) + ["nonsense"]))
            d["widths"][conv] = draw(st.one_of(st.integers(-3, 10**7), JSON))
        elif where == "weight":
            key = draw(st.sampled_from(sorted(d["state_dict"]) + ["extra.weight"]))
            d["state_dict"][key] = draw(tensors())
        else:
            key = draw(st.sampled_from([*d, "training"]))
            d[key] = draw(st.one_of(ANYTHING, st.integers(-(10**20), 10**20)))
    return d


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(d=model_dicts())
def test_fuzz_the_model_file_reader(tmp_path, d):
    path = tmp_path / "m.pt"
    torch.save(d, path)
    try:
        mf = load_model(path)
    except ModelFileError as e:
        assert str(e).startswith(f"{path}") and "\n" not in str(e), str(e)
    else:
        assert all(bool(torch.isfinite(v).all()) for v in mf.model.state_dict().values() if v.is_floating_point())
