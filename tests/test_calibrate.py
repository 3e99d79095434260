import pytest
import torch

from chipprune.calibrate import CalibrationError, recalibrate_bn, score_layers
from chipprune.ci import reference_ci
from chipprune.criteria import CHIP, L1, HRank, Random, get_criterion
from chipprune.models import ChannelLayer, create_model
from reference import captured


def batches(n_batches: int = 3, size: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.zeros(size, dtype=torch.long)) for _ in range(n_batches)]


def test_streamed_chip_scores_equal_the_reference_mean_over_images():
    model = create_model("resnet20").eval()
    layers = model.channel_layers()
    data = batches()
    scores, images = score_layers(model, layers, CHIP(), data)
    assert images == 12
    maps = captured(model, {layer.conv: layer.act for layer in layers}, "output", data)
    for layer in layers:
        torch.testing.assert_close(scores[layer.conv], reference_ci(maps[layer.conv]).mean(0), rtol=1e-6, atol=1e-9)


def test_one_forward_pass_per_batch_scores_every_layer():
    model = create_model("resnet20").eval()
    calls = []
    model.register_forward_pre_hook(lambda m, i: calls.append(1))
    scores, _ = score_layers(model, model.channel_layers(), HRank(), batches(2))
    assert len(calls) == 2
    assert set(scores) == set(model.widths)
    assert all(len(scores[c]) == w for c, w in model.widths.items())


def test_hrank_is_the_mean_rank_of_each_channel_map():
    model = create_model("resnet20").eval()
    layers = model.channel_layers()[:3]
    data = batches(1)
    scores, _ = score_layers(model, layers, HRank(), data)
    maps = captured(model, {layer.conv: layer.act for layer in layers}, "output", data)
    for layer in layers:
        assert torch.equal(scores[layer.conv], torch.linalg.matrix_rank(maps[layer.conv]).double().mean(0))


def test_weight_criteria_need_no_images():
    model = create_model("resnet20")
    scores, images = score_layers(model, model.channel_layers(), L1())
    assert images == 0
    torch.testing.assert_close(scores["layer1.0.conv1"], model.layer1[0].conv1.weight.abs().sum((1, 2, 3)).double())
    a, _ = score_layers(model, model.channel_layers(), Random(7))
    b, _ = score_layers(model, model.channel_layers(), Random(7))
    c, _ = score_layers(model, model.channel_layers(), Random(8))
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["conv1"], c["conv1"])


def test_non_finite_activations_name_the_layer():
    model = create_model("resnet20").eval()
    with torch.no_grad():
        model.layer2[0].bn1.running_var.fill_(float("nan"))
    with pytest.raises(CalibrationError, match="layer2.0.conv1"):
        score_layers(model, model.channel_layers(), CHIP(), batches(1))


def test_no_images_and_unknown_criterion():
    model = create_model("resnet20")
    with pytest.raises(CalibrationError, match="no calibration images"):
        score_layers(model, model.channel_layers(), CHIP(), [])
    with pytest.raises(ValueError, match="known: chip"):
        get_criterion("taylor")


def test_recalibrated_bn_holds_the_statistics_of_all_the_batches_and_weights_stay():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    norm = model[1]
    norm.momentum = 0.3
    weights = {k: v.clone() for k, v in model.named_parameters()}
    data = batches(3, 5)
    assert recalibrate_bn(model, data) == 15
    with torch.no_grad():
        maps = torch.cat([model[0](x) for x, _ in data])
    # The mean of the per-batch means (equal batch sizes) is the mean over all the images.
    assert torch.allclose(norm.running_mean, maps.mean((0, 2, 3)), atol=1e-5)
    assert norm.momentum == 0.3 and not model.training
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())


def test_recalibration_needs_a_norm_and_images():
    with pytest.raises(CalibrationError, match="no BatchNorm"):
        recalibrate_bn(torch.nn.Conv2d(3, 4, 3), batches())
    with pytest.raises(CalibrationError, match="no images"):
        recalibrate_bn(create_model("resnet20"), [])


class RunsOutOfMemory(torch.nn.Module):
    """A ResNet-20 whose forward fails like the CPU allocator above `most` images at once, after its first layers
    have already been scored (so a retry must undo their partial sums)."""

    def __init__(self, most: int) -> None:
        super().__init__()
        self.net, self.most, self.calls = create_model("resnet20"), most, 0

    def forward(self, x):
        self.calls += 1
        out = self.net.layer1(self.net.relu(self.net.bn1(self.net.conv1(x))))
        if len(x) > self.most:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return self.net.fc(self.net.avgpool(self.net.layer3(self.net.layer2(out))).flatten(1))


def wrapped_layers(model: RunsOutOfMemory) -> list[ChannelLayer]:
    return [ChannelLayer(f"net.{layer.conv}", f"net.{layer.act}", layer.group) for layer in model.net.channel_layers()]


def test_running_out_of_memory_retries_with_smaller_batches_and_scores_the_same():
    model = RunsOutOfMemory(most=3).eval()
    layers = wrapped_layers(model)
    data = batches(3, 8)
    expected, _ = score_layers(model.net, model.net.channel_layers(), CHIP(), data)
    with pytest.warns(UserWarning) as caught:
        scores, images = score_layers(model, layers, CHIP(), data)
    assert [str(w.message).split(" (")[0] for w in caught] == [
        "out of memory scoring 8 images at once on cpu: going on with 4",
        "out of memory scoring 4 images at once on cpu: going on with 2",
    ]
    assert images == 24
    for layer in model.net.channel_layers():
        torch.testing.assert_close(scores[f"net.{layer.conv}"], expected[layer.conv], rtol=1e-9, atol=1e-12)
    assert model.calls == 2 + 3 * 4  # 8 fails, 4 fails; then every batch goes in pieces of 2


def test_out_of_memory_on_one_image_says_what_to_change():
    model = RunsOutOfMemory(most=0).eval()
    layers = wrapped_layers(model)
    with pytest.warns(UserWarning), pytest.raises(CalibrationError, match="out of memory scoring a single image"):
        score_layers(model, layers, CHIP(), batches(1, 2))
