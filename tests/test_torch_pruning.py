"""Torch-Pruning's and autograd's private parts are used in one module, which refuses an untested release; custom
layers reach the generic code through the model registry (models.MODULES), not by importing a model."""

import ast
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import chipprune
from chipprune import models
from chipprune.models.common import Modules
from chipprune.pruning import _torch_pruning
from command import run

SRC = Path(__file__).resolve().parents[1] / "src" / "chipprune"
PRIVATE = ("_HybridIndex", "_ConcatIndexMapping", "_SplitIndexMapping", "_param_to_name", "_helpers")


def private_uses(path: Path) -> list[str]:
    """Attributes and imports of Torch-Pruning's and autograd's private parts in a source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or "", *(a.name for a in node.names)]
        for name in names:
            if name.startswith("_saved_") or any(p in name for p in PRIVATE):
                found.append(f"{path.relative_to(SRC)}:{node.lineno} {name}")
    return found


def test_private_parts_are_used_in_one_module_only():
    assert private_uses(SRC / "pruning" / "_torch_pruning.py"), "the finder finds the module's own uses"
    others = [p for p in sorted(SRC.rglob("*.py")) if p.name != "_torch_pruning.py"]
    assert not [use for p in others for use in private_uses(p)]


@pytest.mark.parametrize("version", ["1.7.0", "2.0.1", "1.5.2", "0.9"])
def test_an_untested_torch_pruning_is_refused_in_one_line(version):
    with pytest.raises(_torch_pruning.UntestedVersionError) as e:
        _torch_pruning.check_version(version)
    assert str(e.value).count("\n") == 0 and version in str(e.value) and "1.6.x" in str(e.value)
    assert isinstance(e.value, ImportError)


@pytest.mark.parametrize("version", ["1.6.0", "1.6.1", "1.6.12"])
def test_the_tested_releases_pass(version):
    _torch_pruning.check_version(version)


def test_the_graph_path_asks_the_registry_for_custom_layers(monkeypatch):
    entered, asked = [], []

    @contextmanager
    def traceable(model):
        entered.append(type(model).__name__)
        yield

    def problems(model, state):
        asked.append(len(state))
        return []

    toy = Modules({}, traceable, problems, lambda model, key: False)
    monkeypatch.setattr(models, "MODULES", [*models.MODULES, toy])
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 2))  # fmt: skip
    chipprune.prune_model(model, torch.zeros(1, 3, 16, 16), [torch.randn(4, 3, 16, 16)], pruning_ratio=0.5,
                          ignored_layers=[model[-1]])  # fmt: skip
    assert "Sequential" in entered
    mf = chipprune.architecture("resnet20")
    models.state_problems(mf.model, mf.model.state_dict())
    assert asked == [len(mf.model.state_dict())]


def test_chip_refuses_an_untested_torch_pruning_in_one_line_before_the_graph_is_built(
    capsys, workdir, tmp_path, monkeypatch
):
    monkeypatch.setattr(_torch_pruning, "metadata", SimpleNamespace(version=lambda name: "2.0.1"))
    _torch_pruning.require_tested.cache_clear()
    try:
        code, _, err = run(capsys, "prune", workdir / "r20.pt", "--flops-target", "0.5", "--criterion", "l1",
                           "--out", tmp_path / "p.pt")  # fmt: skip
    finally:
        _torch_pruning.require_tested.cache_clear()
    assert code == 2 and not (tmp_path / "p.pt").exists()
    assert err.strip().splitlines()[-1].startswith("chip prune: error: torch-pruning 2.0.1 is not a version")
    assert "Traceback" not in err
