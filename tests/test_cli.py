import json

import pytest
import torch

from chipprune.cli import main
from chipprune.files.modelfile import load_model
from chipprune.models import create_model
from chipprune.pruning.graph import prune_model
from command import run


def test_profile_json(capsys):
    code, out, _ = run(capsys, "profile", "--arch", "resnet56", "--sparsity", "paper-1", "--json")
    r = json.loads(out)
    assert code == 0
    assert (r["params"], r["flops"], r["base_params"], r["base_flops"]) == (485413, 65168128, 853018, 125485696)


def test_score_prune_eval(capsys, workdir):
    d = workdir
    code, _, _ = run(
        capsys,
        "score",
        d / "r20.pt",
        "--data",
        d / "data",
        "--batches",
        "2",
        "--batch-size",
        "8",
        "--out",
        d / "s.json",
    )
    assert code == 0
    scores = json.loads((d / "s.json").read_text())
    assert scores["images"] == 16 and scores["criterion"] == "chip"
    assert len(scores["layers"]["layer1.0.conv1"]) == 16
    code, out, _ = run(
        capsys,
        "prune",
        d / "r20.pt",
        "--scores",
        d / "s.json",
        "--sparsity",
        "[0.]+[0.25]*2+[0.5]*9",
        "--out",
        d / "p.pt",
        "--json",
    )
    r = json.loads(out)
    assert code == 0 and r["criterion"] == "chip" and 0 < r["flops"] < r["base_flops"]
    pruned = load_model(d / "p.pt")
    assert pruned.model.widths["layer1.0.conv2"] == 12
    assert pruned.meta["pruned"]["sparsity"] == "[0.0]+[0.25]*2+[0.5]*9"
    code, out, _ = run(capsys, "eval", d / "p.pt", "--data", d / "data", "--json")
    r = json.loads(out)
    assert code == 0 and r["images"] == 20 and 0 <= r["top1"] <= r["top5"] <= 100


def test_prune_recalibrates_batchnorm_on_training_batches(capsys, workdir):
    d = workdir
    common = ["prune", d / "r20.pt", "--criterion", "l1", "--sparsity", "[0.]+[0.5]*11", "--batch-size", "8"]
    assert run(capsys, *common, "--out", d / "plain.pt")[0] == 0
    code, out, _ = run(capsys, *common, "--data", d / "data", "--recalibrate-bn", "2", "--out", d / "bn.pt", "--json")
    assert code == 0 and json.loads(out)["recalibrated_bn_images"] == 16
    plain, recal = load_model(d / "plain.pt"), load_model(d / "bn.pt")
    assert recal.meta["pruned"]["recalibrated_bn_images"] == 16
    assert torch.equal(plain.model.conv1.weight, recal.model.conv1.weight)
    assert not torch.allclose(plain.model.bn1.running_mean, recal.model.bn1.running_mean)


def test_weight_criteria_prune_without_data(capsys, workdir):
    code, _, _ = run(
        capsys,
        "prune",
        workdir / "r20.pt",
        "--criterion",
        "l1",
        "--sparsity",
        "[0.]+[0.5]*11",
        "--out",
        workdir / "l1.pt",
    )
    assert code == 0 and load_model(workdir / "l1.pt").meta["pruned"]["criterion"] == "l1"


def test_fewer_images_than_asked_warns_and_uses_them(capsys, workdir):
    code, _, err = run(capsys, "score", workdir / "r20.pt", "--data", workdir / "data", "--out", workdir / "all.json")
    assert code == 0 and "asked for 640 calibration images, the train split has 40" in err
    assert json.loads((workdir / "all.json").read_text())["images"] == 40


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["profile", "--arch", "resnet56", "--sparsity", "[0.1]*3"], "resnet56 takes 30 rates"),
        (["profile", "--arch", "resnet56", "--sparsity", "[0.]+[1.2]*29"], "[0, 1)"),
        (["profile", "nope.pt"], "no such file"),
        (["prune", "{d}/r20.pt", "--sparsity", "[0.]*12", "--out", "{d}/x.pt"], "--data is needed"),
        (["eval", "{d}/r20.pt", "--data", "{d}/missing"], "missing"),
        (
            [
                "prune",
                "{d}/r20.pt",
                "--criterion",
                "l1",
                "--sparsity",
                "[0.]*12",
                "--recalibrate-bn",
                "2",
                "--out",
                "{d}/x.pt",
            ],
            "--recalibrate-bn needs --data",
        ),
        (
            [
                "prune",
                "{d}/r20.pt",
                "--scores",
                "{d}/data/train/cat/0.png",
                "--sparsity",
                "[0.]*12",
                "--out",
                "{d}/x.pt",
            ],
            "cannot read scores",
        ),
        (
            ["prune", "{d}/r20.pt", "--criterion", "l1", "--sparsity", "[0.]*12", "--global", "--out", "{d}/x.pt"],
            "--global applies to --flops-target",
        ),
        (
            [
                "prune",
                "{d}/r20.pt",
                "--criterion",
                "l1",
                "--flops-target",
                "0.5",
                "--residual",
                "paper",
                "--out",
                "{d}/x.pt",
            ],
            "--residual paper applies to --sparsity",
        ),
        (["prune", "{d}/r20.pt", "--criterion", "l1", "--flops-target", "1.5", "--out", "{d}/x.pt"], "(0, 1]"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(capsys, workdir, args, message):
    code, out, err = run(capsys, *[a.format(d=workdir) for a in args])
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_failed_command_leaves_the_existing_output_alone(capsys, workdir):
    target = workdir / "keep.pt"
    target.write_bytes(b"precious")
    code, _, _ = run(capsys, "prune", workdir / "r20.pt", "--sparsity", "[0.]*3", "--criterion", "l1", "--out", target)
    assert code == 2 and target.read_bytes() == b"precious"


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: coupled)" in out and "(default: 128)" in out and "(default: chip)" in out


def test_import_then_eval_matches_the_weights(capsys, workdir):
    state = {
        f"module.{k}".replace("module.fc.", "module.linear."): v
        for k, v in create_model("resnet20").state_dict().items()
        if not k.endswith((".src", ".dst"))
    }
    torch.save({"state_dict": state}, workdir / "third.th")
    code, _, _ = run(
        capsys, "import", "--arch", "resnet20", "--weights", workdir / "third.th", "--out", workdir / "imp.pt"
    )
    assert code == 0
    mf = load_model(workdir / "imp.pt")
    assert torch.equal(mf.model.fc.weight, state["module.linear.weight"])
    assert mf.mean == (0.485, 0.456, 0.406)


def test_prune_to_a_flops_target_saves_a_model_that_loads_as_pruned(capsys, workdir):
    d = workdir
    code, out, _ = run(
        capsys, "prune", d / "r20.pt", "--criterion", "l1", "--flops-target", "0.6", "--out", d / "f.pt", "--json"
    )
    r = json.loads(out)
    assert code == 0 and (r["flops_target"], r["scope"], r["round_to"]) == (0.6, "local", None)
    assert abs(r["flops"] / r["base_flops"] - 0.6) <= 0.012
    loaded = load_model(d / "f.pt")
    assert loaded.meta["pruned"]["flops_target"] == 0.6 and loaded.model.widths["layer2.0.conv1"] < 32
    # The same pruning through the API: the file holds exactly that model, shortcut maps included.
    parent = load_model(d / "r20.pt").model
    direct = prune_model(
        parent, torch.zeros(1, 3, 32, 32), [], flops_target=0.6, criterion="l1", ignored_layers=[parent.fc]
    )
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.model.eval()(x), direct.eval()(x))


def test_prune_global_round_to_with_calibration(capsys, workdir):
    d = workdir
    code, out, _ = run(
        capsys,
        "prune",
        d / "r20.pt",
        "--data",
        d / "data",
        "--batches",
        "1",
        "--batch-size",
        "8",
        "--flops-target",
        "0.5",
        "--global",
        "--round-to",
        "4",
        "--out",
        d / "g.pt",
        "--json",
    )
    r = json.loads(out)
    assert code == 0 and (r["scope"], r["round_to"], r["images"]) == ("global", 4, 8)
    widths = load_model(d / "g.pt").model.widths
    assert all(w % 4 == 0 for w in widths.values()) and len(set(widths.values())) > 3
    # identity shortcuts tie a stage's block outputs (and the stem to stage 1): one width per stage
    assert len({widths["conv1"]} | {widths[f"layer1.{b}.conv2"] for b in range(3)}) == 1
    assert all(len({widths[f"layer{s}.{b}.conv2"] for b in range(3)}) == 1 for s in (2, 3))


def test_a_warning_is_one_plain_line_on_stderr(capsys, monkeypatch):
    import warnings

    from chipprune.cli import _parser

    monkeypatch.setattr(_parser, "cmd_profile", lambda args: warnings.warn("careful", stacklevel=1))
    code, out, err = run(capsys, "profile", "--arch", "resnet20")
    assert code == 0 and out == "" and err == "chip profile: warning: careful\n"


def test_prune_to_a_sparsity_with_round_to_reports_the_rounding(capsys, workdir, tmp_path):
    rates = "[0.]+[0.15]*2+[0.4]*9"
    code, out, _ = run(capsys, "prune", workdir / "r20.pt", "--criterion", "l1", "--sparsity", rates, "--round-to", "8",
                       "--out", tmp_path / "r.pt", "--json")  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert result["round_to"] == 8 and {(r["floor"], r["kept"]) for r in result["rounded"]} == {
        (9, 8), (13, 16), (19, 16), (27, 24), (38, 40)}  # fmt: skip
    widths = load_model(tmp_path / "r.pt").model.widths
    assert all(c % 8 == 0 for c in widths.values())
    code, out, _ = run(capsys, "profile", "--arch", "resnet20", "--sparsity", rates, "--round-to", "8", "--json")
    assert code == 0 and json.loads(out)["flops"] == result["flops"]
