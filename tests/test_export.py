import pytest
import torch

from chipprune.deploy.export import Normalized, export, relative_error, run_exported
from chipprune.files.modelfile import CIFAR10_CLASSES, ModelFile
from chipprune.models import create_model
from chipprune.pruning.latency import Runner
from chipprune.pruning.registry import prune
from chipprune.pruning.sparsity import widths
from test_surgery import random_scores, randomize

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def pruned_file():
    """A paper-1 ResNet-20 pruned with coupled residuals: shortcuts that gather and pad channels."""
    model = randomize(create_model("resnet20"))
    pruned = prune(model, random_scores(model), widths("resnet20", "[0.]+[0.25]*2+[0.4]*9")).eval()
    return ModelFile("resnet20", pruned, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), list(CIFAR10_CLASSES))


@pytest.mark.parametrize(("fmt", "dynamic"), [("onnx", False), ("onnx", True), ("torchscript", False)])
def test_exported_model_matches_pytorch_on_raw_images(tmp_path, pruned_file, fmt, dynamic):
    out = tmp_path / f"m.{fmt}"
    error = export(pruned_file, out, fmt, batch_size=4, dynamic_batch=dynamic)
    assert error <= 1e-4
    images = torch.rand(4, 3, 32, 32)  # raw RGB in [0, 1]: normalization is built in
    mean, std = torch.tensor(pruned_file.mean).view(1, 3, 1, 1), torch.tensor(pruned_file.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = pruned_file.model((images - mean) / std)
    assert relative_error(run_exported(out, fmt, images), expected) <= 1e-4
    if dynamic:
        assert run_exported(out, fmt, torch.rand(7, 3, 32, 32)).shape == (7, 10)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_fixed_batch_onnx_rejects_another_batch_size(tmp_path, pruned_file):
    export(pruned_file, tmp_path / "m.onnx", "onnx", batch_size=2)
    with pytest.raises(Exception, match="images"):
        run_exported(tmp_path / "m.onnx", "onnx", torch.rand(3, 3, 32, 32))


def test_normalized_wrapper_and_unknown_format(tmp_path, pruned_file):
    wrapped = Normalized(torch.nn.Identity(), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.equal(wrapped(torch.full((1, 3, 2, 2), 0.75)), torch.ones(1, 3, 2, 2))
    with pytest.raises(ValueError, match="onnx, torchscript"):
        export(pruned_file, tmp_path / "m.x", "tflite")


def test_latency_statistics_are_ordered():
    r = Runner("eager", 2, warmup=1, repeats=3).time(create_model("resnet20"), (3, 32, 32))
    assert 0 < r.min_ms <= r.median_ms <= r.max_ms


def test_cli_export_and_latency(tmp_path, pruned_file, capsys):
    import json

    from chipprune.cli import main

    pruned_file.save(tmp_path / "p.pt")
    assert (
        main(
            ["export", str(tmp_path / "p.pt"), "--format", "onnx", "--dynamic-batch", "--out", str(tmp_path / "p.onnx")]
        )
        == 0
    )
    assert "max relative error" in capsys.readouterr().err
    assert run_exported(tmp_path / "p.onnx", "onnx", torch.rand(3, 3, 32, 32)).shape == (3, 10)
    assert (
        main(
            [
                "export",
                str(tmp_path / "p.pt"),
                "--format",
                "torchscript",
                "--dynamic-batch",
                "--out",
                str(tmp_path / "p.ts"),
            ]
        )
        == 2
    )
    assert "--dynamic-batch applies to --format onnx" in capsys.readouterr().err
    assert not (tmp_path / "p.ts").exists()
    assert (
        main(["profile", str(tmp_path / "p.pt"), "--latency", "--batch-sizes", "1,3", "--repeats", "2", "--json"]) == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert set(r["latency_ms"]) == {"1", "3"} and r["latency_ms"]["3"]["median_ms"] > 0
    assert r["params"] < r["base_params"]
