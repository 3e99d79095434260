"""`chip export --int8`: onnxruntime's static quantization of registry and library models, checked on test images
before the file is kept."""

import json

import pytest
import torch

from chipprune.deploy import quantize
from command import run
from images import make_tree, make_workdir

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """r20.pt (random weights) and an image folder of 10 classes, 4 train and 3 test images each."""
    return make_workdir(tmp_path_factory.mktemp("int8"), {"train": 4, "test": 3})


def int8_args(model, data, out, *more):
    return ["export", model, "--format", "onnx", "--int8", "--data", data, "--out", out, *more]


def quantized_ops(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node} & {"QuantizeLinear", "DequantizeLinear"}


def test_a_registry_model_is_written_as_int8_with_its_check_in_the_json(capsys, tmp_path, work):
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "r20-int8.onnx"
    more = ["--calibration-images", "16", "--check-images", "25", "--int8-tolerance", "100", "--json"]
    code, stdout, err = run(capsys, *int8_args(work / "r20.pt", work / "data", out, *more))
    assert code == 0, err
    report = json.loads(stdout)  # stdout holds nothing but the result
    assert report["out"] == str(out) and report["int8"] is True and report["method"] == "minmax"
    assert report["calibration_images"] == 16 and report["check_images"] == 25
    assert 0 <= report["int8_top1"] <= 100 and 0 <= report["float_top1"] <= 100 and 0 <= report["agreement"] <= 100
    assert report["bytes"] == out.stat().st_size < report["float_bytes"] / 2  # int8 weights: about a quarter
    assert quantized_ops(out) == {"QuantizeLinear", "DequantizeLinear"}
    logits = ort.InferenceSession(str(out)).run(None, {"images": torch.rand(5, 3, 32, 32).numpy()})[0]
    assert logits.shape == (5, 10)  # any batch size, images in [0, 1]
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no staged files left beside it


def test_the_check_compares_the_two_models_on_the_same_seeded_images(capsys, tmp_path, work):
    """The same seed picks the same images; without --json the summary goes to stderr."""
    reports = []
    for seed in ("3", "3"):
        more = ["--check-images", "12", "--calibration-images", "8", "--int8-tolerance", "100", "--json"]
        more += ["--seed", seed]
        code, stdout, err = run(capsys, *int8_args(work / "r20.pt", work / "data", tmp_path / "m.onnx", *more))
        assert code == 0, err
        reports.append(json.loads(stdout))
    assert reports[0] == reports[1]
    code, stdout, err = run(capsys, *int8_args(work / "r20.pt", work / "data", tmp_path / "m.onnx", "--int8-tolerance",
                                               "100"))  # fmt: skip
    assert code == 0 and stdout == "" and "int8 onnx" in err and "same class on" in err


def test_a_library_model_is_quantized(capsys, tmp_path):
    pytest.importorskip("torchvision")
    data = tmp_path / "data"
    make_tree(data, {"train": {c: 4 for c in "abcd"}, "test": {c: 2 for c in "abcd"}}, size=(40, 36))
    kwargs = ["--model-kwargs", '{"num_classes": 4}', "--input-size", "32"]
    assert run(capsys, "import", "--arch", "torchvision:mobilenet_v2", *kwargs, "--out", tmp_path / "m.pt")[0] == 0
    out = tmp_path / "m-int8.onnx"
    code, stdout, err = run(capsys, *int8_args(tmp_path / "m.pt", data, out, "--int8-tolerance", "100", "--json"))
    assert code == 0, err
    report = json.loads(stdout)
    assert report["check_images"] == 8 and report["calibration_images"] == 16  # all there are
    assert quantized_ops(out) == {"QuantizeLinear", "DequantizeLinear"}
    assert ort.InferenceSession(str(out)).run(None, {"images": torch.rand(2, 3, 32, 32).numpy()})[0].shape == (2, 4)


def test_a_model_that_misses_the_tolerance_is_refused_and_the_old_file_kept(capsys, tmp_path, work, monkeypatch):
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "m.onnx"
    out.write_bytes(b"the previous export")
    real = quantize._compare

    def worse(*args):  # the int8 model measured 3 points below the float one
        c = real(*args)
        return c._replace(float_top1=c.int8_top1 + 3.0)

    monkeypatch.setattr(quantize, "_compare", worse)
    code, stdout, err = run(capsys, *int8_args(work / "r20.pt", work / "data", out, "--int8-tolerance", "2.5"))
    assert code == 2 and stdout == ""
    last = err.strip().splitlines()[-1]  # after the progress bars of decoding the images
    assert "3.00 points below" in last and "tolerance of 2.5" in last and "Traceback" not in err
    assert out.read_bytes() == b"the previous export"
    assert [p.name for p in out.parent.iterdir()] == ["m.onnx"]


@pytest.mark.parametrize(
    ("more", "message"),
    [
        (["--int8-tolerance", "nan"], "--int8-tolerance"),
        (["--int8-tolerance", "-1"], "--int8-tolerance"),
        (["--calibration-method", "mse"], "--calibration-method"),
        (["--check-images", "0"], "--check-images"),
    ],
)
def test_bad_int8_options_get_one_line_and_exit_2(capsys, tmp_path, work, more, message):
    code, _, err = run(capsys, *int8_args(work / "r20.pt", work / "data", tmp_path / "m.onnx", *more))
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "onnx", "--int8"], "--data"),  # nothing to calibrate on
        (["--format", "torchscript", "--int8", "--data", "{data}"], "--format onnx"),
        (["--format", "onnx", "--data", "{data}"], "--int8"),  # int8 options without --int8
        (["--format", "onnx", "--int8", "--data", "{missing}"], "missing"),
        (["--format", "onnx", "--int8", "--data", "{model}"], "r20.pt"),  # a file, not an image folder
    ],
)
def test_bad_int8_requests_get_one_line_and_exit_2(capsys, tmp_path, work, args, message):
    names = {"data": work / "data", "missing": tmp_path / "missing", "model": work / "r20.pt"}
    args = [a.format(**names) for a in args]
    code, _, err = run(capsys, "export", work / "r20.pt", *args, "--out", tmp_path / "m.onnx")
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "m.onnx").exists()


def test_quantize_refuses_an_unknown_method_and_empty_samples(tmp_path, work):
    from chipprune.files.modelfile import load_model

    mf = load_model(work / "r20.pt")
    (tmp_path / "out").mkdir()
    tmp_path = tmp_path / "out"
    with pytest.raises(ValueError, match="minmax, entropy, percentile"):
        quantize.quantize(mf, tmp_path / "m.onnx", [], [], method="mse")
    with pytest.raises(quantize.ExportError, match="no calibration images"):
        quantize.quantize(mf, tmp_path / "m.onnx", [], [])
    with pytest.raises(quantize.ExportError, match="no images to check"):
        quantize.quantize(mf, tmp_path / "m.onnx", [torch.rand(2, 3, 32, 32)], [])
    assert list(tmp_path.iterdir()) == []
