"""torchvision and timm models through the `chip` commands and model files of any architecture: the source and the
structure pruning changed, as plain data (no pickle), in .pt or .safetensors."""

import json
import warnings

import pytest
import safetensors
import torch
from torch import nn

from chipprune.files.modelfile import ModelFile, ModelFileError, library_model, load_model
from chipprune.models import external
from chipprune.pruning.graph import prune_model
from command import run

pytest.importorskip("timm")
pytest.importorskip("torchvision")

KWARGS = {"num_classes": 10}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Four classes of random 40x36 images, train and test: ImageNet-style files the models resize."""
    from images import make_tree

    root = tmp_path_factory.mktemp("lib") / "data"
    make_tree(root, {"train": {c: 6 for c in "abcd"}, "test": {c: 2 for c in "abcd"}}, size=(40, 36))
    return root


def pruned(arch: str, size: int = 32) -> ModelFile:
    """A library model with 10 classes and random weights, pruned to half its FLOPs on random images."""
    torch.manual_seed(0)
    mf = library_model(arch, KWARGS, input_size=size)
    x = torch.randn(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = prune_model(mf.model.eval(), x[:1], [x], flops_target=0.5)
    return ModelFile(mf.arch, model, mf.mean, mf.std, mf.classes, {}, mf.model_kwargs, size)


def logits(model: nn.Module, size: int = 32) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return model.eval()(torch.randn(3, 3, size, size))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("arch", ["timm:mixnet_s", "torchvision:shufflenet_v2_x0_5"])
def test_a_pruned_library_model_loads_back_bit_identical(tmp_path, arch, suffix, one_thread):
    mf = pruned(arch)
    path = tmp_path / f"m{suffix}"
    mf.save(path)
    back = load_model(path)
    assert (back.arch, back.model_kwargs, back.input_size, back.classes) == (arch, KWARGS, 32, mf.classes)
    assert torch.equal(logits(back.model), logits(mf.model))
    ours = dict(back.model.named_parameters())
    assert all(ours[k].shape == v.shape for k, v in mf.model.named_parameters())


def test_the_file_needs_no_pickle_and_safetensors_readers_read_it(tmp_path, one_thread):
    mf = pruned("timm:mixnet_s")  # split sizes: calls replaced by tracing, recorded as data
    mf.save(tmp_path / "m.pt")
    mf.save(tmp_path / "m.safetensors")
    d = torch.load(tmp_path / "m.pt", weights_only=True)
    assert d["arch"] == "timm:mixnet_s" and d["structure"]["calls"]
    assert d["structure"]["attributes"]["conv_stem"]["out_channels"] == mf.model.conv_stem.out_channels
    json.dumps({k: v for k, v in d.items() if k != "state_dict"})  # everything else is plain JSON
    with safetensors.safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        meta = json.loads(f.metadata()["chipprune"])
        assert meta["structure"] == d["structure"]
        assert torch.equal(f.get_tensor("conv_stem.weight"), d["state_dict"]["conv_stem.weight"])


def test_a_value_that_is_not_plain_data_is_refused_at_save_time_naming_it(tmp_path):
    mf = library_model("timm:resnet18", KWARGS)
    mf.model.conv1.out_channels = torch.tensor(64)  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"conv1\.out_channels: .*Tensor"):
        mf.save(tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_a_file_of_another_library_version_loads_with_a_warning(tmp_path, monkeypatch):
    mf = library_model("timm:resnet18", KWARGS)
    mf.save(tmp_path / "m.pt")
    monkeypatch.setattr(external, "version", lambda name: "0.0.1")
    with pytest.warns(UserWarning, match="written with timm .*this is 0.0.1"):
        load_model(tmp_path / "m.pt")


def test_a_damaged_structure_is_one_model_file_error(tmp_path):
    mf = pruned("timm:resnet18")
    mf.save(tmp_path / "m.pt")
    d = torch.load(tmp_path / "m.pt", weights_only=True)
    d["structure"]["attributes"]["no.such.module"] = {"out_channels": 3}
    torch.save(d, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError, match="no.such.module: no such module"):
        load_model(tmp_path / "bad.pt")
    for key in ("forward", "_parameters", "no_such_attribute"):  # a file can set only what record writes
        d = torch.load(tmp_path / "m.pt", weights_only=True)
        d["structure"]["attributes"]["conv1"] = {key: 3}
        torch.save(d, tmp_path / "bad.pt")
        with pytest.raises(ModelFileError, match=f"conv1.{key}: not a structural attribute of Conv2d"):
            load_model(tmp_path / "bad.pt")
    d = torch.load(tmp_path / "m.pt", weights_only=True)
    d["state_dict"]["extra.weight"] = torch.zeros(1)
    torch.save(d, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError, match="unexpected extra.weight"):
        load_model(tmp_path / "bad.pt")


def test_import_random_then_a_saved_state_dict_lists_what_does_not_fit(capsys, tmp_path):
    code, _, err = run(capsys, "import", "--arch", "timm:resnet18", "--model-kwargs", '{"num_classes": 4}',
                       "--out", tmp_path / "r.pt")  # fmt: skip
    assert code == 0 and "warning: no --weights: random weights" in err
    assert load_model(tmp_path / "r.pt").classes == ["class_0", "class_1", "class_2", "class_3"]
    torch.manual_seed(3)
    source = external.parse("timm:resnet18", {"num_classes": 4})
    model = external.build(source)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "w.pth")
    from safetensors.torch import save_file

    save_file(model.state_dict(), tmp_path / "w.safetensors")
    for weights in ("w.pth", "w.safetensors"):
        code, _, err = run(capsys, "import", "--arch", "timm:resnet18", "--model-kwargs", '{"num_classes": 4}',
                           "--weights", tmp_path / weights, "--out", tmp_path / "i.pt")  # fmt: skip
        assert code == 0 and "warning" not in err
        assert torch.equal(logits(load_model(tmp_path / "i.pt").model), logits(model))
    code, _, err = run(capsys, "import", "--arch", "timm:resnet18", "--weights", tmp_path / "w.pth",
                       "--out", tmp_path / "x.pt")  # fmt: skip
    assert code == 2 and "fc.weight: shape (4, 512) where the model has (1000, 512)" in err
    assert err.count("\n") == 1 and not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--arch", "timm:no_such_net"], "timm .* has no model 'no_such_net'"),
        (["--arch", "timm:resnet18", "--model-kwargs", "[1]"], "expected a JSON object"),
        (["--arch", "timm:resnet18", "--model-kwargs", '{"no_such_kwarg": 1}'], "no_such_kwarg"),
        (["--arch", "resnet20"], "--weights is needed for resnet20"),
        (["--arch", "resnet20", "--weights", "w.th", "--input-size", "64"], "--input-size: not here"),
    ],
)
def test_import_refuses_in_one_line(capsys, tmp_path, args, message):
    code, _, err = run(capsys, "import", *args, "--out", tmp_path / "m.pt")
    assert code == 2 and err.count("\n") == 1
    assert __import__("re").search(message, err), err


@pytest.mark.parametrize("arch", ["torchvision:resnet50", "timm:efficientnet_b0", "timm:convnext_atto"])
def test_import_profile_prune_eval_finetune_export_and_reload(capsys, tmp_path, folder, arch, one_thread):
    d = tmp_path
    kwargs = ["--model-kwargs", '{"num_classes": 4}', "--input-size", "64"]
    assert run(capsys, "import", "--arch", arch, *kwargs, "--out", d / "random.pt")[0] == 0
    torch.manual_seed(5)
    torch.save(external.build(external.parse(arch, {"num_classes": 4})).state_dict(), d / "w.pth")
    assert run(capsys, "import", "--arch", arch, *kwargs, "--weights", d / "w.pth", "--out", d / "m.pt")[0] == 0
    code, out, _ = run(capsys, "profile", d / "m.pt", "--json")
    dense = json.loads(out)
    assert code == 0 and dense["params"] == dense["base_params"] > 0
    code, out, _ = run(capsys, "prune", d / "m.pt", "--flops-target", "0.5", "--data", folder, "--batches", "2",
                       "--batch-size", "4", "--out", d / "p.safetensors", "--json")  # fmt: skip
    result = json.loads(out)
    assert code == 0 and abs(result["flops"] / result["base_flops"] - 0.5) <= 0.01
    assert result["base_flops"] == dense["flops"]
    code, out, _ = run(capsys, "eval", d / "p.safetensors", "--data", folder, "--json")
    assert code == 0 and json.loads(out)["images"] == 8
    code, _, _ = run(capsys, "finetune", d / "p.safetensors", "--data", folder, "--epochs", "1", "--batch-size", "8",
                     "--train-subset", "16", "--out-dir", d / "ft")  # fmt: skip
    assert code == 0
    tuned = load_model(d / "ft" / "last.pt")
    assert tuned.arch == arch and tuned.input_size == 64
    assert torch.equal(logits(load_model(d / "ft" / "last.pt").model, 64), logits(tuned.model, 64))
    code, _, err = run(capsys, "export", d / "ft" / "last.pt", "--format", "onnx", "--dynamic-batch",
                       "--out", d / "p.onnx")  # fmt: skip
    assert code == 0, err
    ort = pytest.importorskip("onnxruntime")
    x = torch.rand(3, 3, 64, 64)  # another batch size than the export's
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (tuned.mean, tuned.std))
    with torch.no_grad():
        expected = tuned.model.eval()((x - mean) / std)
    got = torch.from_numpy(ort.InferenceSession(str(d / "p.onnx")).run(None, {"images": x.numpy()})[0])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_sparsity_is_for_the_registry_and_says_so(capsys, tmp_path):
    library_model("timm:resnet18", KWARGS).save(tmp_path / "m.pt")
    code, _, err = run(capsys, "prune", tmp_path / "m.pt", "--sparsity", "paper-1", "--out", tmp_path / "p.pt")
    assert code == 2 and "registry architectures; prune a library model with --flops-target or --ratio" in err
    code, _, err = run(capsys, "profile", "--arch", "timm:resnet18", "--sparsity", "paper-1")
    assert code == 2 and "--flops-target or --ratio" in err


def test_train_a_library_model_from_scratch_takes_the_data_s_classes(capsys, tmp_path, folder, one_thread):
    code, _, err = run(capsys, "train", "--arch", "timm:resnet18", "--input-size", "32", "--data", folder,
                       "--epochs", "1", "--batch-size", "8", "--out-dir", tmp_path / "run")  # fmt: skip
    assert code == 0, err
    mf = load_model(tmp_path / "run" / "last.pt")
    assert mf.classes == ["a", "b", "c", "d"] and mf.model_kwargs == {"num_classes": 4}
    assert mf.model.fc.out_features == 4


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_chip_importance_in_torch_pruning_s_pruner_removes_what_prune_model_removes(name, one_thread):
    import copy

    import torch_pruning as tp

    from chipprune import CHIPImportance

    torch.manual_seed(0)
    model = external.build(external.parse(f"torchvision:{name}", KWARGS)).eval()
    x = torch.randn(4, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = prune_model(model, x[:1], [x], pruning_ratio=0.3)
        theirs = copy.deepcopy(model)
        head = [m for m in theirs.modules() if isinstance(m, nn.Linear)]
        importance = CHIPImportance([x], theirs, x[:1])
        tp.pruner.MetaPruner(theirs, x[:1], importance=importance, pruning_ratio=0.3, ignored_layers=head).step()
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert sum(a[k].numel() for k in a) < 0.8 * sum(v.numel() for v in model.state_dict().values())
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same channels kept, in the same order


def test_score_a_library_model_once_and_prune_it_two_ways_from_the_file(capsys, tmp_path, folder, one_thread):
    d = tmp_path
    library_model("timm:resnet18", {"num_classes": 4}, input_size=32).save(d / "m.pt")
    calibration = ["--data", folder, "--batches", "2", "--batch-size", "4"]
    code, _, err = run(capsys, "score", d / "m.pt", *calibration, "--out", d / "s.json")
    assert code == 0 and "chip scores of" in err and "groups from 8 images" in err
    scores = json.loads((d / "s.json").read_text())
    assert scores["of"] == "groups" and len(scores["layers"]["conv1"]) == 64
    code, out, _ = run(capsys, "prune", d / "m.pt", "--flops-target", "0.5", *calibration, "--out", d / "a.pt",
                       "--json")  # fmt: skip
    assert code == 0
    code, out2, _ = run(capsys, "prune", d / "m.pt", "--flops-target", "0.5", "--scores", d / "s.json",
                        "--out", d / "b.pt", "--json")  # fmt: skip
    assert code == 0 and json.loads(out2)["flops"] == json.loads(out)["flops"]
    a, b = (load_model(d / f).model.state_dict() for f in ("a.pt", "b.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same channels from the file as from calibration
    library_model("timm:resnet34", {"num_classes": 4}, input_size=32).save(d / "other.pt")
    code, _, err = run(capsys, "prune", d / "other.pt", "--ratio", "0.3", "--scores", d / "s.json", "--out", d / "c.pt")
    assert code == 2 and "scores of a 'timm:resnet18' model, not of this timm:resnet34" in err
    code, _, err = run(capsys, "prune", d / "a.pt", "--ratio", "0.3", "--scores", d / "s.json", "--out", d / "c.pt")
    assert code == 2 and "scores of another model" in err and not (d / "c.pt").exists()  # the parent's scores
    code, _, err = run(capsys, "score", d / "m.pt", "--criterion", "l1", "--out", d / "l1.json")
    assert code == 0
    code, out, _ = run(capsys, "prune", d / "m.pt", "--ratio", "0.25", "--scores", d / "l1.json", "--out", d / "e.pt",
                       "--json")  # fmt: skip
    assert code == 0 and json.loads(out)["ratio"] == 0.25 and json.loads(out)["criterion"] == "l1"
    assert load_model(d / "e.pt").model.conv1.out_channels == 48  # 64 less a quarter
