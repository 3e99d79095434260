"""prune_model on the smallest member of every torchvision and timm CNN family, with random weights at a small
input: the FLOPs target, shapes, train and eval mode, a dead channel first, the pruned model equal to the masked
one; prune_to_latency on a sample of the families, timed in eager PyTorch; and the one-line error for a
transformer."""

import copy
import io
import re
import warnings

import pytest
import torch
from torch import nn

from chipprune.files.modelfile import ModelFile, load_model, unnamed_classes
from chipprune.models import external
from chipprune.models.external import TIMM_FAMILIES, TORCHVISION_FAMILIES
from chipprune.profile import count_macs
from chipprune.pruning import latency
from chipprune.pruning.graph import channel_classes, group_importance, prune_model, prune_to_latency
from chipprune.pruning.latency import Runner, Table

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

MODELS = [f"torchvision:{n}" for n in TORCHVISION_FAMILIES.values()] + [f"timm:{n}" for n in TIMM_FAMILIES.values()]


def kwargs(name: str) -> dict:
    """Ten classes; torchvision's inception nets without their auxiliary head."""
    inception = name in ("torchvision:googlenet", "torchvision:inception_v3")
    return {"num_classes": 10, **({"aux_logits": False, "init_weights": True} if inception else {})}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The model with random weights (seeded), and two random images at its small size (inception: 96, else 64)."""
    torch.manual_seed(0)
    model = external.build(external.parse(name, kwargs(name)))
    size = 96 if "inception" in name else 64
    return model.eval(), torch.randn(2, 3, size, size)


def maskable(model: nn.Module) -> bool:
    """Whether zeroing the weights that read a channel is the same as removing it: no norm that mixes channels, no
    conv that standardizes its weights over its inputs."""
    mixing = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    return not any(
        isinstance(m, mixing) or isinstance(m, nn.Conv2d) and type(m).forward is not nn.Conv2d.forward
        for m in model.modules()
    )


def masked(model: nn.Module, pruned: nn.Module) -> nn.Module:
    """The model with the weights zeroed that read the input channels the pruned model's layers no longer have,
    found by matching the random weights the pruned layers kept: each kept input column by its entries in two kept
    rows (one entry can repeat in a row of thousands of float32 values)."""
    out, after = copy.deepcopy(model), dict(pruned.named_modules())
    with torch.no_grad():
        for name, layer in out.named_modules():
            if not isinstance(layer, nn.Conv2d | nn.Linear):
                continue
            w, small = (m.weight.reshape(*m.weight.shape[:2], -1)[:, :, 0] for m in (layer, after[name]))
            if small.shape[1] < w.shape[1]:
                rows = [_row(w, small[r]) for r in range(2)]
                column = {pair: j for j, pair in enumerate(zip(*(w[o].tolist() for o in rows), strict=True))}
                kept = {column[pair] for pair in zip(small[0].tolist(), small[1].tolist(), strict=True)}
                layer.weight[:, sorted(set(range(w.shape[1])) - kept)] = 0
    return out


def _row(w: torch.Tensor, kept: torch.Tensor) -> int:
    """The row of `w` that holds every entry of a pruned row, in order."""
    for candidate in (w == kept[int(kept.abs().argmax())]).nonzero()[:, 0].tolist():
        values = iter(w[candidate].tolist())
        if all(any(v == u for u in values) for v in kept.tolist()):  # a subsequence
            return candidate
    raise AssertionError("no row of the model holds this pruned row")


PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def dead(model: nn.Module, classes: dict) -> str:
    """Make the first channel of a group dead (every layer making it outputs zeros there); the group's root."""
    modules = dict(model.named_modules())
    root = next(
        r
        for r, cls in classes.items()
        if len(cls) > 1 and all(c.side == "in" or isinstance(modules[c.module], PRODUCERS) for c in cls[0])
    )
    with torch.no_grad():
        for c in classes[root][0]:
            for t in (modules[c.module].weight, modules[c.module].bias) if c.side == "out" else ():
                if t is not None:
                    t[c.position] = 0
    return root


@pytest.mark.parametrize("name", MODELS)
def test_half_the_flops_shapes_modes_dead_channel_masking_and_model_file(name, one_thread, tmp_path):
    model, x = build(name)
    root = dead(model, channel_classes(model, x[:1]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        imp = group_importance(model, x[:1], [x[:1]])
        pruned = prune_model(model, x[:1], [], flops_target=0.5, importance=imp)
    assert imp[root][0] == 0 == imp[root].min()  # the dead channel ranks first (ties go by position)
    weight, before = dict(pruned.named_modules())[root].weight, dict(model.named_modules())[root].weight
    assert len(weight) < len(before) and weight.flatten(1).abs().sum(1).min() > 0  # and goes first
    kept = count_macs(pruned, x[:1]) / count_macs(model, x[:1])
    coarse = [w for w in caught if "allow no point within 2 %" in str(w.message)]
    assert abs(kept - 0.5) <= 0.02 * 0.5 or (len(coarse) == 1 and kept <= 0.5), (kept, coarse)
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape == (2, 10)
        if maskable(model):
            double = x.double()  # float32 sums in another order differ by more than the tolerance in deep nets
            expected = masked(model, pruned).double()(double)
            torch.testing.assert_close(copy.deepcopy(pruned).double()(double), expected, rtol=1e-6, atol=1e-9)
        mf = ModelFile(name, pruned, (0.5,) * 3, (0.25,) * 3, unnamed_classes(10), {}, kwargs(name), x.shape[-1])
        mf.save(tmp_path / "m.pt")
        assert torch.equal(load_model(tmp_path / "m.pt").model.eval()(x), pruned(x))  # bit-identical
    pruned.train()
    pruned(x).sum().backward()


# The families whose groups span several layers (the latency table once asked them for a conv of 0 outputs), and two
# of plain and inverted residuals.
LATENCY_SAMPLE = [
    "torchvision:shufflenet_v2_x0_5",
    "timm:mixnet_s",
    "timm:rexnet_100",
    "torchvision:resnet18",
    "timm:efficientnet_b0",
]


@pytest.mark.parametrize("name", LATENCY_SAMPLE)
def test_half_the_latency_measured_in_eager_pytorch(name, one_thread, tmp_path):
    model, x = build(name)
    runner = Runner("eager", threads=1, repeats=3, warmup=1)  # a handful of runs: the search, not its precision
    target = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pruned, report = prune_to_latency(model, x[:1], [x[:1]], target, runner, cache=str(tmp_path))
        except ValueError as e:  # eager's per-module overhead can keep even the floor above half: said, with its ratio
            fastest = float(re.search(r"measured (\d+\.\d+) x the dense", str(e)).group(1))
            assert fastest > target and ("ask for" in str(e)) == (fastest < 1), e
            if fastest >= 1:  # pruning made it slower (ShuffleNetV2 in eager): nothing to prune to, and said so
                return
            target = min(1.0, fastest + 0.1)  # within reach, whatever the noise of a second measurement
            pruned, report = prune_to_latency(model, x[:1], [x[:1]], target, runner, cache=str(tmp_path))
    assert report.pruned.median_ms <= report.target_ms == pytest.approx(target * report.dense.median_ms)
    assert 1 <= report.rounds <= latency.ROUNDS and report.measured_layers > 0
    assert count_macs(pruned, x[:1]) < count_macs(model, x[:1])
    with torch.no_grad():
        assert pruned(x).shape == (2, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the table it cached reads back whole
        assert len(Table.cached(runner, tmp_path).entries) == report.measured_layers


def test_a_transformer_fails_at_once_in_one_line_naming_the_module_and_the_call(one_thread):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"blocks\.\d+\.attn \(Attention\): `qkv = .*reshape.*ignored_layers") as e:
        prune_model(model, x[:1], [x], flops_target=0.5)
    assert "\n" not in str(e.value)


def test_replaced_calls_survive_copy_and_pickling(one_thread):
    model, x = build("timm:mixnet_s")  # its mixed convs split by a list the pruned model must not use
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned = prune_model(model, x[:1], [x[:1]], flops_target=0.5)
    buffer = io.BytesIO()
    torch.save(pruned, buffer)
    buffer.seek(0)
    with torch.no_grad():
        for other in (copy.deepcopy(pruned), torch.load(buffer, weights_only=False)):
            torch.testing.assert_close(other(x), pruned(x))
