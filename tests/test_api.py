"""The Python API: load, score with a plain DataLoader, prune to each budget, save, load back; the same pruning
through `chip prune` keeps the same channels; the example of docs/api.md runs."""

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import chipprune
from chipprune import Calibration, Flops, Latency, Ratio, Sparsity, load_model
from chipprune.pruning import latency
from chipprune.pruning.budgets import BudgetError
from chipprune.pruning.latency import Timing
from command import run
from images import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = {
    "sparsity": (Sparsity("paper-1"), "--sparsity paper-1"),
    "ratio": (Ratio(0.3, round_to=4), "--ratio 0.3 --round-to 4"),
    "flops": (Flops(0.6, allocate="global"), "--flops-target 0.6 --global"),
    "latency": (Latency(0.7, threads=1, repeats=2), "--latency-target 0.7 --threads 1 --repeats 2"),
}


def cost_machine(self, modules, sample):
    """A Runner.times that runs nothing: a model's time is its parameter count, so a search is repeatable."""
    return [Timing(*(3 * [sum(p.numel() for p in m.parameters()) / 1e4])) for m in modules]


@pytest.fixture
def loader():
    """A plain DataLoader of random 32-px (inputs, targets) batches."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(48, 3, 32, 32, generator=g)
    return DataLoader(TensorDataset(images, torch.randint(0, 10, (48,), generator=g)), batch_size=16)


@pytest.fixture
def models(tmp_path):
    """A registry ResNet-56 and a torchvision ResNet-18 (32 px, 10 classes), as model files with random weights."""
    torch.manual_seed(0)
    chipprune.architecture("resnet56").save(tmp_path / "r56.pt")
    kwargs = {"num_classes": 10}
    chipprune.import_model("torchvision:resnet18", model_kwargs=kwargs, input_size=32).save(tmp_path / "r18.pt")
    return {"resnet56": tmp_path / "r56.pt", "torchvision:resnet18": tmp_path / "r18.pt"}


def kept_channels(model):
    """Each conv's output channel count and its weights' sum: equal for equal channels kept."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return [(c.out_channels, round(float(c.weight.double().sum()), 6)) for c in convs]


@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("arch", ["resnet56", "torchvision:resnet18"])
def test_load_score_prune_save_load_and_the_cli_keeps_the_same_channels(
    capsys, monkeypatch, tmp_path, loader, models, arch, budget
):
    monkeypatch.setattr(latency.Runner, "times", cost_machine)
    monkeypatch.setenv("CHIP_CACHE_DIR", str(tmp_path / "cache"))
    mf = load_model(models[arch])
    asked, options = BUDGETS[budget]
    library = arch != "resnet56"
    if library and budget == "sparsity":
        with pytest.raises(BudgetError, match="prune a library model with a Flops budget"):
            chipprune.prune(mf, asked, calibration=loader)
        return
    scores = chipprune.score(mf, loader, of="convs" if budget == "sparsity" else "groups")
    assert scores.provenance["images"] == 48
    pruned = chipprune.prune(mf, asked, scores=scores)
    assert pruned.report.sizes.macs < pruned.report.sizes.base_macs
    out = tmp_path / "api.pt"
    pruned.model_file.save(out)
    back = load_model(out)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.model.eval()(x), pruned.model_file.model.eval()(x))
    assert back.meta["pruned"]["parent_sha256"] == chipprune.files.fileio.sha256(models[arch])
    scores.save(tmp_path / "scores.json", mf.arch)
    cli = f"prune {models[arch]} --scores {tmp_path / 'scores.json'} {options} --out {tmp_path / 'cli.pt'} --json"
    code, printed, err = run(capsys, *shlex.split(cli))
    assert code == 0, err
    assert kept_channels(load_model(tmp_path / "cli.pt").model) == kept_channels(back.model)
    assert json.loads(printed)["flops"] == pruned.report.sizes.macs


def test_calibration_from_chipprunes_data_is_the_clis(capsys, tmp_path, models):
    data = write_image_folder(tmp_path / "data", {"train": 4, "test": 1})
    mf = load_model(models["resnet56"])
    pruned = chipprune.prune(mf, Sparsity("paper-1"), calibration=Calibration(data, batches=2, batch_size=8),
                             recalibrate_bn=1, seed=3)  # fmt: skip
    assert pruned.report.provenance["images"] == 16 and pruned.report.provenance["recalibrated_bn_images"] == 8
    cli = f"prune {models['resnet56']} --data {data} --batches 2 --batch-size 8 --recalibrate-bn 1 --seed 3"
    code, _, err = run(capsys, *shlex.split(cli + f" --sparsity paper-1 --out {tmp_path / 'cli.pt'}"))
    assert code == 0, err
    cli_model = load_model(tmp_path / "cli.pt").model
    assert kept_channels(cli_model) == kept_channels(pruned.model_file.model)
    bn = [m.running_mean for m in cli_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    ours = [m.running_mean for m in pruned.model_file.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(bn, ours, strict=True))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Flops(0), r"fraction must be a number in \(0, 1\]"),
        (lambda: Flops(float("nan")), "fraction must be"),
        (lambda: Ratio(1.0), r"ratio must be a number in \[0, 1\)"),
        (lambda: Ratio(0.2, allocate="sensitivity"), "uniform or global"),
        (lambda: Flops(0.5, allocate="everywhere"), "allocate must be one of"),
        (lambda: Flops(0.5, round_to=0), "round_to must be a whole number"),
        (lambda: Latency(0.5, runtime="tensorrt"), "runtime must be one of"),
        (lambda: Latency(0.5, allocate="global"), "a latency budget is allocated uniform or sensitivity"),
        (lambda: Latency(0.5, threads=0), "threads must be"),
        (lambda: Sparsity(""), "a sparsity is a preset name"),
    ],
)
def test_a_budget_checks_itself_when_built(make, message):
    with pytest.raises(BudgetError, match=message):
        make()


@pytest.mark.parametrize(
    ("budget", "kwargs", "message"),
    [
        (Flops(0.5), {"residual": "paper"}, "residual='paper' applies to a Sparsity budget"),
        (Sparsity("paper-1"), {"recalibrate_bn": 2, "criterion": "l1"}, "recalibrate_bn needs calibration"),
        (Sparsity("paper-1"), {}, "calibration is needed to score with chip"),
        (Flops(0.5, allocate="sensitivity"), {"criterion": "l1"}, "allocating by sensitivity needs calibration"),
        (Latency(0.5, allocate="sensitivity"), {"criterion": "l1"}, "allocating by sensitivity needs calibration"),
        (
            Flops(0.5, allocate="sensitivity"),
            {"criterion": "l1", "calibration": [torch.zeros(2, 3, 32, 32)] * 8},
            "allocating by sensitivity needs labels: calibration batches as (inputs, targets)",
        ),
        (Sparsity("paper-1"), {"residual": "sideways", "criterion": "l1"}, "residual must be one of"),
    ],
)
def test_prune_refuses_what_does_not_go_with_the_budget(models, budget, kwargs, message):
    with pytest.raises(BudgetError, match=re.escape(message)):
        chipprune.prune(load_model(models["resnet56"]), budget, **kwargs)


def test_scores_of_another_kind_are_refused(models, loader):
    mf = load_model(models["resnet56"])
    scores = chipprune.score(mf, loader, of="convs")
    with pytest.raises(BudgetError, match="scores of convs, where a Flops budget needs groups"):
        chipprune.prune(mf, Flops(0.5), scores=scores)


def test_a_model_pruned_by_prune_model_saves_and_loads_back(tmp_path, models):
    mf = load_model(models["resnet56"])
    calibration = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
    pruned = chipprune.prune_model(mf.model, torch.zeros(1, 3, 32, 32), calibration, pruning_ratio=0.4,
                                   ignored_layers=[mf.model.fc])  # fmt: skip
    dataclasses.replace(mf, model=pruned).save(tmp_path / "p.pt")
    back = load_model(tmp_path / "p.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.model.eval()(x), pruned.eval()(x))


def test_the_example_of_docs_api_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/api.md has a python example"
    monkeypatch.chdir(tmp_path)
    shared = ROOT.parent / "shared"
    if not (shared / "weights").exists():
        pytest.skip("../shared is not beside the checkout")
    (tmp_path / "shared").symlink_to(shared)
    monkeypatch.setenv("CHIP_CACHE_DIR", str(tmp_path / "cache"))
    for block in blocks:
        exec(compile(block.replace("../shared", "shared"), "docs/api.md", "exec"), {})
    assert load_model(tmp_path / "r56-half.pt").model is not None


def test_finetune_and_train_from_python_are_the_clis(tmp_path, capsys):
    write_image_folder(tmp_path / "data", {"train": 4, "test": 1})
    torch.manual_seed(0)
    chipprune.architecture("resnet20").save(tmp_path / "r20.pt")
    config = dataclasses.replace(chipprune.PRESETS["paper-cifar"], epochs=1, batch_size=8, warmup_epochs=0)
    quick = chipprune.Execution(amp="off", progress=False)
    done = chipprune.finetune(tmp_path / "r20.pt", tmp_path / "data", tmp_path / "api", config, execution=quick)
    assert done.last.is_file() and done.best.is_file() and [h["epoch"] for h in done.history] == [1]
    assert done.top1 == done.history[-1]["test_top1"] is not None
    cli = ["finetune", tmp_path / "r20.pt", "--data", tmp_path / "data", "--out-dir", tmp_path / "cli", "--epochs", "1",
           "--batch-size", "8", "--warmup-epochs", "0", "--amp", "off", "--preset", "paper-cifar"]  # fmt: skip
    code, _, err = run(capsys, *cli)
    assert code == 0, err
    ours, theirs = load_model(done.last).model.state_dict(), load_model(tmp_path / "cli" / "last.pt").model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    trained = chipprune.train("resnet20", tmp_path / "data", tmp_path / "scratch", config, execution=quick)
    assert load_model(trained.last).meta["trained_from_scratch"] == "resnet20"
    with pytest.raises(chipprune.TrainError, match="distillation weight"):
        chipprune.finetune(tmp_path / "r20.pt", tmp_path / "data", tmp_path / "kd", config, teacher=tmp_path / "r20.pt")
