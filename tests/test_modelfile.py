import os
import pickle

import pytest
import torch

from attacks import touching
from chipprune.files.modelfile import ModelFile, ModelFileError, import_weights, load_model, parse_normalization
from chipprune.models import create_model
from chipprune.pruning.registry import prune
from chipprune.pruning.sparsity import widths


def test_round_trip_of_a_pruned_model(tmp_path):
    model = create_model("resnet20")
    scores = {conv: torch.rand(c, dtype=torch.float64) for conv, c in model.widths.items()}
    pruned = prune(model, scores, widths("resnet20", "[0.]+[0.25]*2+[0.5]*9"), "coupled").eval()
    mf = ModelFile("resnet20", pruned, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), [f"c{i}" for i in range(10)], {"k": [1]})
    mf.save(tmp_path / "m.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["arch"] == "resnet20" and raw["widths"]["layer1.0.conv2"] == 12
    back = load_model(tmp_path / "m.pt")
    assert (back.mean, back.std, back.classes, back.meta) == (mf.mean, mf.std, mf.classes, mf.meta)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back.model.eval()(x), pruned(x))
    # the shortcut maps are part of the file: a transition shortcut of 12 -> 16 of 32 channels
    assert torch.equal(back.model.layer2[0].shortcut.src, pruned.layer2[0].shortcut.src)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind


def test_import_renames_prefix_and_head_and_reads_pruned_widths(tmp_path):
    model = create_model("resnet20", widths("resnet20", "[0.]+[0.25]*2+[0.5]*9"))
    state = {
        ("module." + k).replace("module.fc.", "module.linear."): v
        for k, v in model.state_dict().items()
        if not k.endswith((".src", ".dst"))
    }
    torch.save({"state_dict": state, "best_prec1": 91.0}, tmp_path / "w.th")
    mf = import_weights("resnet20", tmp_path / "w.th", "cifar")
    assert mf.model.widths == model.widths
    assert mf.mean == (0.4914, 0.4822, 0.4465)
    torch.testing.assert_close(mf.model.fc.weight, model.fc.weight)


def test_import_lists_mismatched_names_and_shapes(tmp_path):
    state = create_model("resnet20").state_dict()
    state["layer1.0.bn1.weight"] = torch.ones(3)
    del state["layer2.0.conv1.weight"]
    state["extra.weight"] = torch.ones(1)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ModelFileError) as e:
        import_weights("resnet20", tmp_path / "w.pt")
    msg = str(e.value)
    assert "missing layer2.0.conv1.weight" in msg and "unexpected extra.weight" in msg
    assert "layer1.0.bn1.weight: shape (3,)" in msg


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch notes the protocol, then refuses the file
def test_a_model_file_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    for payload in ({"format": "chipprune-model/1", "x": touching(marker)}, {"state_dict": {"a": touching(marker)}}):
        (tmp_path / "evil.pt").write_bytes(pickle.dumps(payload))
        with pytest.raises(ModelFileError, match="cannot be read safely"):
            load_model(tmp_path / "evil.pt")
        with pytest.raises(ModelFileError, match="cannot be read safely"):
            import_weights("resnet20", tmp_path / "evil.pt")
        assert not (tmp_path / "pwned").exists()


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        load_model(tmp_path / "nope.pt")
    torch.save({"state_dict": {}}, tmp_path / "third-party.pt")
    with pytest.raises(ModelFileError, match="chip import"):
        load_model(tmp_path / "third-party.pt")
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ModelFileError, match="cannot be read"):
        load_model(tmp_path / "trunc.pt")


def test_normalization_forms():
    assert parse_normalization("imagenet")[0] == (0.485, 0.456, 0.406)
    assert parse_normalization("0.5,0.5,0.5:0.25,0.25,0.25") == ((0.5,) * 3, (0.25,) * 3)
    for bad in ("0.5,0.5:1,1", "a,b,c:1,1,1", "0,0,0:1,0,1"):
        with pytest.raises(ModelFileError):
            parse_normalization(bad)


def test_written_files_follow_the_umask(tmp_path):
    from chipprune.files.fileio import save_json

    old = os.umask(0o022)
    try:
        save_json({"a": 1}, tmp_path / "x.json")
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644
