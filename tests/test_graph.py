"""prune_model on small inline CNNs of every coupling kind: shapes, budgets, which channels go, exactness."""

import copy
import warnings

import pytest
import torch
from torch import nn

from chipprune import create_model
from chipprune.calibrate import CalibrationError
from chipprune.ci import reference_ci
from chipprune.criteria import L1
from chipprune.models.resnet_cifar import ChannelShortcut, ResNetCifar
from chipprune.profile import count_macs, count_params
from chipprune.pruning.graph import group_importance, prune_model
from reference import captured

SIZE = 16


def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type[nn.Module] = nn.ReLU):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act()
    )


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = cbr(3, 8), cbr(8, 12, stride=2), cbr(12, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.c(self.b(self.a(x))).mean((2, 3)))


class Basic(nn.Module):
    """A torchvision BasicBlock: identity or projection (1×1 conv + BN) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride > 1 or cin != cout
            else None
        )

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.down is None else self.down(x)))


class ProjectionResNet(nn.Module):
    def __init__(self, k: int = 1):
        super().__init__()
        self.stem = cbr(3, 8 * k)
        self.blocks = nn.Sequential(Basic(8 * k, 8 * k), Basic(8 * k, 16 * k, 2), Basic(16 * k, 16 * k))
        self.fc = nn.Linear(16 * k, 5)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class Bottleneck(nn.Module):
    """torchvision's bottleneck: one ReLU module used three times."""

    def __init__(self, c: int, width: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, c, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + x)


class BottleneckNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.block = Bottleneck(16, 8)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


class Inverted(nn.Module):
    """MobileNetV2's inverted residual: expand, depthwise, project (linear), added to the input."""

    def __init__(self, c: int, expand: int):
        super().__init__()
        self.expand = cbr(c, c * expand, 1, act=nn.ReLU6)
        self.dw = cbr(c * expand, c * expand, 3, groups=c * expand, act=nn.ReLU6)
        self.project = nn.Sequential(nn.Conv2d(c * expand, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.dw(self.expand(x)))


class MobileNet(nn.Module):
    def __init__(self, k: int = 1):
        super().__init__()
        self.stem = cbr(3, 8 * k, act=nn.ReLU6)
        self.blocks = nn.Sequential(Inverted(8 * k, 3), Inverted(8 * k, 2))
        self.head = cbr(8 * k, 16 * k, 1, act=nn.ReLU6)
        self.fc = nn.Linear(16 * k, 5)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


class DenseNet(nn.Module):
    """Dense concatenation: every layer reads all the maps before it."""

    def __init__(self, k: int = 1):
        super().__init__()
        self.stem = cbr(3, 8 * k)
        self.l1, self.l2 = cbr(8 * k, 6 * k), cbr(14 * k, 6 * k)
        self.trans = cbr(20 * k, 12 * k, 1)
        self.fc = nn.Linear(12 * k, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat([x, self.l2(x)], 1)
        return self.fc(self.trans(x).mean((2, 3)))


class ResNeXt(nn.Module):
    """A ResNeXt block: the 3×3 conv in 4 groups."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.a, self.b = cbr(16, 16, 1), cbr(16, 16, 3, groups=4)
        self.c = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.relu = nn.ReLU()
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(self.relu(x + self.c(self.b(self.a(x)))).mean((2, 3)))


def resnet20():
    return create_model("resnet20", None, 5)


MODELS = {
    "plain": Plain,
    "projection": ProjectionResNet,
    "zero-pad": resnet20,
    "bottleneck": BottleneckNet,
    "mobilenet": MobileNet,
    "densenet": DenseNet,
    "resnext": ResNeXt,
}

# Per model, the groups checked channel by channel: (the BatchNorms whose channels are the group's, the convs making
# them, the layers reading them with the offset of the group's channels in their input, one per distinct map).
GROUPS = {
    "plain": [(["a.1"], ["a.0"], [("b.0", 0)]), (["b.1"], ["b.0"], [("c.0", 0)])],
    "projection": [
        (["stem.1", "blocks.0.bn2"], ["stem.0", "blocks.0.conv2"], [("blocks.0.conv1", 0), ("blocks.1.conv1", 0)]),
        (["blocks.1.bn1"], ["blocks.1.conv1"], [("blocks.1.conv2", 0)]),
        (
            ["blocks.1.bn2", "blocks.1.down.1", "blocks.2.bn2"],
            ["blocks.1.conv2", "blocks.1.down.0", "blocks.2.conv2"],
            [("blocks.2.conv1", 0)],
        ),
    ],
    "zero-pad": [
        (["layer1.0.bn1"], ["layer1.0.conv1"], [("layer1.0.conv2", 0)]),
        # identity shortcuts couple a stage's block outputs; the stride-2 one starts a new group
        (
            [f"layer2.{b}.bn2" for b in range(3)],
            [f"layer2.{b}.conv2" for b in range(3)],
            [("layer2.1.conv1", 0), ("layer2.2.conv1", 0), ("layer3.0.conv1", 0)],
        ),
    ],
    "bottleneck": [
        (["block.bn1"], ["block.conv1"], [("block.conv2", 0)]),
        (["block.bn2"], ["block.conv2"], [("block.conv3", 0)]),
    ],
    "mobilenet": [
        (
            ["blocks.0.expand.1", "blocks.0.dw.1"],
            ["blocks.0.expand.0", "blocks.0.dw.0"],
            [("blocks.0.dw.0", 0), ("blocks.0.project.0", 0)],
        )
    ],
    "densenet": [
        (["stem.1"], ["stem.0"], [("l1.0", 0), ("l2.0", 0), ("trans.0", 0)]),
        (["l1.1"], ["l1.0"], [("l2.0", 8), ("trans.0", 8)]),
        (["l2.1"], ["l2.0"], [("trans.0", 14)]),
    ],
    "resnext": [(["a.1"], ["a.0"], [("b.0", 0)])],
}


def data(n: int = 2, size: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, SIZE, SIZE, generator=g), torch.zeros(size, dtype=torch.long)) for _ in range(n)]


def make(name: str, seed: int = 0, k: int = 1) -> nn.Module:
    """The model (k times wider) with distinct BatchNorm weights (they tell which channels were kept) and statistics."""
    torch.manual_seed(seed)
    model = MODELS[name](k) if k > 1 else MODELS[name]()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.randperm(m.num_features) / m.num_features)
                m.bias.uniform_(-0.2, 0.5)
                m.running_var.uniform_(0.5, 2)
    return model.eval()


def bns(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def kept(model: nn.Module, pruned: nn.Module) -> dict[str, torch.Tensor]:
    """The channels each BatchNorm kept, found by its distinct weights."""
    after = bns(pruned)
    return {n: torch.tensor([int((m.weight == w).nonzero()) for w in after[n].weight]) for n, m in bns(model).items()}


def masked(model: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
    """The model with every pruned channel zeroed instead: BatchNorm weight and bias, and the shortcut routes."""
    out = copy.deepcopy(model)
    norms = bns(out)
    with torch.no_grad():
        for n, m in norms.items():
            gone = torch.ones(m.num_features, dtype=torch.bool)
            gone[keep[n]] = False
            m.weight[gone] = 0
            m.bias[gone] = 0
    prev = "bn1"  # the CIFAR ResNets: a shortcut routes the previous block's channels to its own block's
    for name, block in (out.blocks() if isinstance(out, ResNetCifar) else {}).items():
        sc: ChannelShortcut = block.shortcut
        pairs = [
            (s, d)
            for s, d in zip(sc.src.tolist(), sc.dst.tolist(), strict=True)
            if s in keep[prev].tolist() and d in keep[f"{name}.bn2"].tolist()
        ]
        sc.set_map(torch.tensor([s for s, _ in pairs], dtype=torch.long), torch.tensor([d for _, d in pairs]))
        prev = f"{name}.bn2"
    return out


def expected(model: nn.Module, readers: list[tuple[str, int]], channels: int, batches) -> torch.Tensor:
    """The aggregation rule computed from captured maps and the reference CI: mean of per-map normalized CIs."""
    maps = captured(model, {n: n for n, _ in readers}, "input", batches)
    parts = []
    for name, offset in readers:
        fmap = maps[name] if maps[name].dim() == 4 else maps[name][:, :, None, None]
        ci = reference_ci(fmap).mean(0)
        parts.append(ci[offset : offset + channels] / ci.mean())
    return torch.stack(parts).mean(0)


def importance_of(imp: dict[str, torch.Tensor], convs: list[str]) -> torch.Tensor:
    """The importance of a group: it is keyed by its root, one of the convs making its channels."""
    (key,) = set(imp) & set(convs)
    return imp[key]


@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_model_runs_keeps_classes_and_equals_the_masked_model(name):
    model, batches = make(name), data()
    x = batches[0][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned = prune_model(model, x[:1], batches, pruning_ratio=0.5)
    assert pruned(x).shape == model(x).shape == (len(x), 5)
    assert count_params(pruned) < 0.6 * count_params(model)
    assert count_macs(pruned, x[:1]) < 0.6 * count_macs(model, x[:1])
    keep = kept(model, pruned)
    assert any(len(k) < bns(model)[n].num_features for n, k in keep.items())
    torch.testing.assert_close(pruned(x), masked(model, keep)(x), rtol=1e-4, atol=1e-5)
    pruned.train()
    pruned(x).sum().backward()  # trains
    assert pruned.training and not model.training


@pytest.mark.parametrize("name", list(GROUPS))
def test_group_importance_is_the_mean_of_normalized_cis_and_the_lowest_go(name):
    model, batches = make(name), data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        imp = group_importance(model, batches[0][0][:1], batches)
        pruned = prune_model(model, batches[0][0][:1], batches, pruning_ratio=0.5)
    keep = kept(model, pruned)
    groups_of = 4 if name == "resnext" else 1  # a grouped conv keeps the same positions in each of its groups
    for norms, convs, readers in GROUPS[name]:
        channels = bns(model)[norms[0]].num_features
        want = expected(model, readers, channels, batches)
        torch.testing.assert_close(importance_of(imp, convs), want, rtol=1e-5, atol=1e-8)
        assert all(torch.equal(keep[n], keep[norms[0]]) for n in norms)  # coupled channels go together
        ranked = want.view(groups_of, -1).mean(0)
        gone = [c for c in range(channels // groups_of) if c not in keep[norms[0]].tolist()]
        survivors = [c for c in range(channels // groups_of) if c in keep[norms[0]].tolist()]
        assert gone and ranked[gone].max() <= ranked[survivors].min()


@pytest.mark.parametrize("name", ["plain", "mobilenet", "densenet", "zero-pad"])
def test_a_dead_channel_goes_first(name):
    model, batches = make(name), data()
    norms, convs, _ = GROUPS[name][0]
    channels, dead = bns(model)[norms[0]].num_features, 3
    with torch.no_grad():
        for n in norms:  # every producer of the group, so the channel is zero wherever it is read
            bns(model)[n].weight[dead] = bns(model)[n].bias[dead] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        imp = importance_of(group_importance(model, batches[0][0][:1], batches), convs)
        # a ratio that removes exactly one channel of this group, and none elsewhere
        pruned = prune_model(model, batches[0][0][:1], batches, pruning_ratio={convs[0]: 0.5 / channels})
    assert imp[dead] == 0 and (imp[torch.arange(len(imp)) != dead] > 0).all()
    widths = {n: len(k) for n, k in kept(model, pruned).items()}
    assert widths == {n: m.num_features - (n in norms) for n, m in bns(model).items()}
    assert dead not in kept(model, pruned)[norms[0]].tolist()


def test_a_reused_relu_is_scored_per_call_site():
    model, batches = make("bottleneck"), data()
    imp = group_importance(model, batches[0][0][:1], batches)
    maps = captured(model, {n: n for n in ["block.conv2", "block.conv3"]}, "input", batches)
    first, second = (reference_ci(maps[n]).mean(0) for n in ("block.conv2", "block.conv3"))
    torch.testing.assert_close(imp["block.conv1"], first / first.mean())
    torch.testing.assert_close(imp["block.conv2"], second / second.mean())
    mixed = (first + second) / 2  # what one hook on the ReLU's first two calls would have seen
    assert not torch.allclose(imp["block.conv1"], mixed / mixed.mean(), rtol=1e-2)
    assert imp["block.conv1"].argsort().tolist() != imp["block.conv2"].argsort().tolist()


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("name", ["projection", "mobilenet", "densenet"])
def test_flops_target_is_reached_within_2_percent(name, scope):
    model, batches = make(name, k=8), data(1)  # wide enough for a uniform ratio to have fine FLOPs steps
    x = batches[0][0][:1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned = prune_model(model, x, batches, flops_target=0.6, scope=scope)
    assert abs(count_macs(pruned, x) / count_macs(model, x) - 0.6) <= 0.02 * 0.6
    assert pruned(batches[0][0]).shape == (6, 5)


def test_global_scope_prunes_layers_unevenly_and_round_to_keeps_multiples():
    model, batches = make("projection"), data(1)
    x = batches[0][0][:1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        local = prune_model(model, x, batches, pruning_ratio=0.5)
        glob = prune_model(model, x, batches, pruning_ratio=0.5, scope="global")
        rounded = prune_model(model, x, batches, pruning_ratio=0.3, round_to=4)
    fractions = {n: len(k) / bns(model)[n].num_features for n, k in kept(model, glob).items()}
    assert len(set(fractions.values())) > 1
    assert {len(k) / bns(model)[n].num_features for n, k in kept(model, local).items()} <= {0.5, 1.0}
    assert all(len(k) % 4 == 0 for k in kept(model, rounded).values())


def test_per_module_ratios_and_ignored_layers():
    model, batches = make("plain"), data(1)
    x = batches[0][0][:1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned = prune_model(model, x, batches, pruning_ratio={"b.0": 0.5}, ignored_layers=["a.0"])
        kept_ignored = prune_model(model, x, batches, pruning_ratio=0.5, ignored_layers=[model.a[0]])
    widths = {n: len(k) for n, k in kept(model, pruned).items()}
    assert widths == {"a.1": 8, "b.1": 6, "c.1": 16}
    assert len(kept(model, kept_ignored)["a.1"]) == 8 and len(kept(model, kept_ignored)["b.1"]) == 6


def test_weight_criteria_and_protocol_objects():
    model, batches = make("plain"), data(1)
    x = batches[0][0][:1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # weight criteria need no maps: no fallback warning
        imp = group_importance(model, x, [], criterion="l1")
        by_object = group_importance(model, x, [], criterion=L1())
    l1 = model.a[0].weight.abs().sum((1, 2, 3)).double()
    key = next(k for k in imp if k == "a.0")
    torch.testing.assert_close(imp[key], l1 / l1.mean())
    assert all(torch.equal(imp[k], by_object[k]) for k in imp)
    a, b = (group_importance(model, x, [], criterion=c) for c in ("random", "random"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the random criterion is seeded


def test_fallbacks_warn_and_name_the_groups():
    model, batches = make("plain"), data(1)
    with pytest.warns(UserWarning, match=r"rooted at c\.0.*2-D input"):
        group_importance(model, batches[0][0][:1], batches)


def test_bad_requests():
    model, batches = make("plain"), data(1)
    x = batches[0][0][:1]
    for kwargs, message in [
        ({}, "exactly one"),
        ({"pruning_ratio": 0.5, "flops_target": 0.5}, "exactly one"),
        ({"pruning_ratio": 1.0}, r"\[0, 1\)"),
        ({"flops_target": 0.0}, r"\(0, 1\]"),
        ({"pruning_ratio": 0.5, "scope": "wide"}, "scope"),
        ({"pruning_ratio": 0.5, "criterion": "taylor"}, "unknown criterion"),
        ({"pruning_ratio": {"nope": 0.5}}, "nope"),
        ({"pruning_ratio": 0.5, "ignored_layers": ["nope"]}, "nope"),
    ]:
        with pytest.raises(ValueError, match=message):
            prune_model(model, x, batches, **kwargs)
    with pytest.raises(CalibrationError, match="no calibration images"):
        prune_model(model, x, [], pruning_ratio=0.5)
    with torch.no_grad():
        model.b[1].running_var.fill_(float("nan"))
    with pytest.raises(CalibrationError, match="c.0"):
        prune_model(model, x, batches, pruning_ratio=0.5)


def test_precomputed_importance_prunes_as_a_fresh_scoring_would():
    model, batches = make("densenet"), data(1)
    x = batches[0][0][:1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        imp = group_importance(model, x, batches)
        fresh = prune_model(model, x, batches, pruning_ratio=0.4)
        reused = prune_model(model, x, [], pruning_ratio=0.4, importance=imp)
        with pytest.raises(ValueError, match="importance"):
            prune_model(model, x, [], pruning_ratio=0.4, importance={"stem.0": imp["stem.0"]})
    torch.testing.assert_close(fresh(batches[0][0]), reused(batches[0][0]))
