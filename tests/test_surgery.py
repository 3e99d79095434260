import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chipprune.models import create_model
from chipprune.models.resnet_cifar import ChannelShortcut
from chipprune.profile import count_params
from chipprune.pruning.registry import prune, select_channels, top_channels
from chipprune.pruning.sparsity import widths


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BN statistics, so that every channel matters to the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def random_scores(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {conv: torch.rand(c, generator=g, dtype=torch.float64) for conv, c in model.widths.items()}


def masked_forward(model: nn.Module, keep: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The full model with every removed channel zeroed right after its activation."""
    handles = []
    for layer in model.channel_layers():
        mask = torch.zeros(model.widths[layer.conv])
        mask[keep[layer.conv]] = 1
        handles.append(
            model.get_submodule(layer.act).register_forward_hook(lambda m, i, out, mask=mask: out * mask[:, None, None])
        )
    try:
        return model(x)
    finally:
        for h in handles:
            h.remove()


CASES = [
    ("resnet20", "[0.3]+[0.4]*2+[0.5]*9", 32),
    ("resnet56", "[0.]+[0.15]*2+[0.4]*27", 32),
    ("resnet56", "[0.]+[0.]*2+[0.4]*27", 32),
    ("vgg16_bn", "[0.3]*7+[0.75]*5", 32),
    ("resnet50", "[0.2]+[0.1]*3+[0.35]*16", 64),
]


@pytest.mark.parametrize(("arch", "rates", "size"), CASES)
def test_pruned_model_equals_masked_model(arch, rates, size):
    model = randomize(create_model(arch))
    scores, w = random_scores(model), widths(arch, rates)
    keep = select_channels(model.channel_layers(), scores, w, "coupled")
    pruned = prune(model, scores, w, "coupled").eval()
    assert pruned.widths == w
    assert count_params(pruned) < count_params(model)
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        expected, got = masked_forward(model, keep, x), pruned(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_keeps_the_highest_scores_ties_to_lower_index():
    assert top_channels(torch.tensor([0.5, 0.1, 0.9, 0.5, 0.2]), 3).tolist() == [0, 2, 3]


def test_coupled_mode_gives_one_ranking_per_residual_stage():
    model = create_model("resnet20")
    scores, w = random_scores(model, 3), widths("resnet20", "[0.]+[0.25]*2+[0.5]*9")
    keep = select_channels(model.channel_layers(), scores, w, "coupled")
    stage1 = ["conv1"] + [f"layer1.{b}.conv2" for b in range(3)]
    total = sum(scores[c] for c in stage1)
    assert keep["conv1"].tolist() == list(range(16))  # the stem keeps all 16
    for conv in stage1[1:]:
        assert keep[conv].tolist() == top_channels(total, 12).tolist()
    paper = select_channels(model.channel_layers(), scores, w, "paper")
    for conv in stage1[1:]:
        assert paper[conv].tolist() == top_channels(scores[conv], 12).tolist()
    assert (
        paper["layer1.0.conv1"].tolist()
        == keep["layer1.0.conv1"].tolist()
        == top_channels(scores["layer1.0.conv1"], 8).tolist()
    )


def test_option_a_shortcut_is_fpad_on_channels():
    x = torch.randn(2, 16, 8, 8)
    sc = ChannelShortcut(16, 32, 2)
    torch.testing.assert_close(sc(x), F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8)))
    crop = ChannelShortcut(16, 13, 1)  # the paper's positional crop when stage 1 keeps 13 of the stem's 16
    torch.testing.assert_close(crop(x), F.pad(x, (0, 0, 0, 0, -2, -1)))


def test_paper_mode_shortcuts_pad_or_crop_by_position():
    model = randomize(create_model("resnet56"))
    scores, w = random_scores(model), widths("resnet56", "paper-1")
    pruned = prune(model, scores, w, "paper").eval()
    first, transition = pruned.layer1[0].shortcut, pruned.layer2[0].shortcut
    x = torch.randn(1, 16, 8, 8)
    torch.testing.assert_close(first(x), F.pad(x, (0, 0, 0, 0, -2, -1)))
    y = torch.randn(1, 13, 8, 8)
    torch.testing.assert_close(transition(y), F.pad(y[:, :, ::2, ::2], (0, 0, 0, 0, 7, 7)))
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_coupled_shortcut_follows_the_kept_channels():
    model = randomize(create_model("resnet20"))
    scores, w = random_scores(model), widths("resnet20", "[0.]+[0.5]*2+[0.]*9")
    keep = select_channels(model.channel_layers(), scores, w, "coupled")
    pruned = prune(model, scores, w, "coupled")
    sc = pruned.layer2[0].shortcut  # 8 of the stage-1 channels into 16 of the 32 stage-2 channels
    expected = [
        (i, keep["layer2.0.conv2"].tolist().index(c + 8))
        for i, c in enumerate(keep["layer1.2.conv2"].tolist())
        if c + 8 in keep["layer2.0.conv2"].tolist()
    ]
    assert list(zip(sc.src.tolist(), sc.dst.tolist(), strict=True)) == expected


def test_cannot_prune_wider_than_the_model():
    model = create_model("resnet20", widths("resnet20", "[0.]+[0.5]*2+[0.]*9"))
    with pytest.raises(ValueError, match="has 8"):
        prune(model, random_scores(model), widths("resnet20", "[0.]+[0.25]*2+[0.]*9"))
