import pytest
import torch

from chipprune.models import ARCHS, create_model
from chipprune.profile import count_flops, count_params
from chipprune.pruning.sparsity import widths

# The table: exact params (trainable) and FLOPs (conv + linear MACs) at the paper's configurations.
TABLE = [
    ("resnet56", None, 853018, 125485696),
    ("resnet56", "[0.]+[0.15]*2+[0.4]*27", 485413, 65168128),
    ("resnet56", "[0.]+[0.4]*2+[0.5]*9+[0.6]*9+[0.7]*9", 240793, 34197184),
    ("resnet110", None, 1727962, 252887680),
    ("resnet110", "[0.]+[0.2]*2+[0.3]*18+[0.35]*36", 1045951, 139006144),
    ("resnet110", "[0.]+[0.22]*2+[0.35]*18+[0.45]*36", 889702, 119638144),
    ("resnet110", "[0.]+[0.4]*2+[0.5]*18+[0.65]*36", 543742, 70554880),
    ("vgg16_bn", None, 14991946, 313463808),
    ("vgg16_bn", "[0.21]*7+[0.75]*5", 2766541, 130566528),
    ("vgg16_bn", "[0.3]*7+[0.75]*5", 2505793, 104242752),
    ("vgg16_bn", "[0.45]*7+[0.78]*5", 1901836, 66521088),
    ("resnet50", None, 25557032, 4089184256),
    ("resnet50", "[0.]+[0.1]*3+[0.35]*16", 15091575, 2240373880),
    ("resnet50", "[0.]+[0.12]*3+[0.38]*16", 14278243, 2090549079),
    ("resnet50", "[0.]+[0.25]*3+[0.5]*16", 11047336, 1507328000),
    ("resnet50", "[0.]+[0.5]*3+[0.6]*16", 8017755, 943231376),
]


@pytest.mark.parametrize(("arch", "rates", "params", "flops"), TABLE)
def test_paper_configurations_profile_exactly(arch, rates, params, flops):
    model = create_model(arch, widths(arch, rates) if rates else None)
    assert count_params(model) == params
    assert count_flops(model, ARCHS[arch].input_size) == flops


def test_resnet56_paper_widths():
    w = widths("resnet56", "[0.]+[0.15]*2+[0.4]*27")
    assert w["conv1"] == 16
    assert {w[f"layer1.{b}.conv2"] for b in range(9)} == {13}
    assert {w[f"layer2.{b}.conv2"] for b in range(9)} == {27}
    assert {w[f"layer3.{b}.conv2"] for b in range(9)} == {64}  # stage 3 output never pruned
    assert w["layer1.0.conv1"] == 9 and w["layer3.8.conv1"] == 38


def test_vgg_last_conv_and_resnet50_last_stage_are_never_pruned():
    assert widths("vgg16_bn", "[0.5]*12")["features.conv16"] == 512
    w = widths("resnet50", "[0.5]*20")
    assert w["layer4.2.conv3"] == 2048 and w["layer4.0.conv1"] == 256 and w["conv1"] == 32


@pytest.mark.parametrize("arch", ["resnet20", "resnet32", "resnet44", "resnet56", "vgg16_bn"])
def test_cifar_models_run_and_classify(arch):
    model = create_model(arch).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet50_matches_torchvision_parameter_names():
    names = set(create_model("resnet50").state_dict())
    for key in [
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.bias",
        "layer4.2.conv3.weight",
        "layer3.5.bn2.num_batches_tracked",
        "fc.weight",
        "fc.bias",
    ]:
        assert key in names
    assert not any("relu" in k for k in names)
    assert create_model("resnet50")(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_unknown_arch_lists_known_ones():
    with pytest.raises(ValueError, match="known: resnet20"):
        create_model("resnet57")
