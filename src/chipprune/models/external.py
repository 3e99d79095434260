"""torchvision and timm CNNs: building them by name (`torchvision:resnet50`, `timm:efficientnet_b0`), their input
size and normalization from the library's own config, and the families chipprune is tested on.

The core never imports torchvision or timm: each is imported here, when a model of it is asked for, with an error
that says how to install it. tests/test_coverage.py prunes the smallest member of each family at a small input on
every CI run; experiments/coverage.py prunes every torchvision builder and these timm models at 224×224."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

from torch import nn

from ..files._structure import shown

LIBRARIES = ("torchvision", "timm")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # mean, std: where a library names none
MAX_CLASSES = 100_000  # ImageNet-21k, the largest label set these libraries' heads are made for, has 21,843
MAX_INPUT_SIZE = 4096  # the largest input side a library model may take (timm's largest default is 800)


class Argument(NamedTuple):
    """A constructor argument a model may be built with: the values it takes, in words and as a test."""

    takes: str
    fits: Callable[[Any], bool]


def _integer(lo: int, hi: int) -> Argument:
    return Argument(f"an integer from {lo} to {hi:,}", lambda v: type(v) is int and lo <= v <= hi)


def _number(lo: float, hi: float, *, above: bool = False, below: bool = False) -> Argument:
    """A finite number in [lo, hi] (`above`: greater than lo; `below`: less than hi)."""

    def fits(v: Any) -> bool:
        return (
            type(v) in (int, float)
            and math.isfinite(v)
            and (lo < v if above else lo <= v)
            and (v < hi if below else v <= hi)
        )

    return Argument(f"a number in {'(' if above else '['}{lo:g}, {hi:g}{')' if below else ']'}", fits)


def _one_of(*names: str) -> Argument:
    return Argument(f"one of {', '.join(names)}", lambda v: type(v) is str and v in names)


# fmt: off
ACTIVATIONS = (  # timm's names of activation layers (timm.layers.get_act_layer)
    "relu", "relu6", "leaky_relu", "elu", "celu", "selu", "prelu", "gelu", "gelu_tanh", "quick_gelu", "silu", "swish",
    "mish", "hard_swish", "hard_sigmoid", "hard_mish", "sigmoid", "tanh", "identity",
)
# fmt: on
FLAG = Argument("true or false", lambda v: type(v) is bool)
FRACTION = _number(0, 1, below=True)
# What a model file and --model-kwargs may hold: arguments that shape the network, each within the values that
# build one of bounded size. Never a path, a download or a loader option (pretrained, checkpoint_path,
# pretrained_cfg, pretrained_cfg_overlay, file, …): a model file names no other file.
ARGUMENTS: dict[str, Argument] = {
    "num_classes": _integer(1, MAX_CLASSES),
    "drop_rate": FRACTION,
    "drop_path_rate": FRACTION,
    "drop_block_rate": FRACTION,
    "dropout": FRACTION,
    "dropout_aux": FRACTION,
    "stochastic_depth_prob": FRACTION,
    "global_pool": _one_of("avg", "max", "avgmax", "catavgmax"),
    "act_layer": _one_of(*ACTIVATIONS),
    "aux_logits": FLAG,
    "transform_input": FLAG,
    "init_weights": FLAG,
    "zero_init_residual": FLAG,
    "memory_efficient": FLAG,
    "reduced_tail": FLAG,
    "dilated": FLAG,
    "replace_stride_with_dilation": Argument(
        "a list of 3 of true or false", lambda v: type(v) is list and len(v) == 3 and all(type(b) is bool for b in v)
    ),
    "width_mult": _number(0, 4, above=True),  # 4x the width: 16x the parameters
    "groups": _integer(1, 64),
    "width_per_group": _integer(1, 256),  # torchvision's wide ResNets have 128
}


def check_kwargs(kwargs: Any) -> dict[str, Any]:
    """`kwargs` if it is a mapping of constructor arguments of ARGUMENTS, each of a value it takes; else a ValueError
    naming the first that is not."""
    if not isinstance(kwargs, dict):
        raise ValueError(f"a mapping of constructor arguments, not a {type(kwargs).__name__}")
    for name, value in kwargs.items():
        argument = ARGUMENTS.get(name) if isinstance(name, str) else None
        if argument is None:
            raise ValueError(
                f"{str(name)[:40]!r} is not a constructor argument chipprune passes on (it passes "
                f"{', '.join(ARGUMENTS)})"
            )
        if not argument.fits(value):
            raise ValueError(f"{name} must be {argument.takes}, not {shown(value)}")
    return kwargs


@dataclass(frozen=True)
class Source:
    """A model of a library, by name, with the constructor arguments it is built with."""

    library: str  # one of LIBRARIES
    name: str
    kwargs: dict[str, Any]

    @property
    def arch(self) -> str:
        """The name as --arch takes it."""
        return f"{self.library}:{self.name}"


@dataclass(frozen=True)
class Defaults:
    """What the library says a model takes: square input side, normalization, classes."""

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int


def is_external(arch: str) -> bool:
    """Whether `arch` names a library model (`library:name`) rather than a registry one."""
    return arch.partition(":")[0] in LIBRARIES and ":" in arch


def parse(arch: str, kwargs: dict[str, Any] | None = None) -> Source:
    """The source `library:name` with constructor arguments `kwargs` (checked by check_kwargs), or a ValueError
    saying what is wrong with it."""
    library, _, name = arch.partition(":")
    if library not in LIBRARIES or not name:
        raise ValueError(f"{arch!r}: a library model is torchvision:NAME or timm:NAME")
    source = Source(library, name, dict(check_kwargs(kwargs or {})))
    if name not in names(library):
        raise ValueError(f"{arch!r}: {library} {version(library)} has no model {name!r}")
    return source


def library(name: str) -> ModuleType:
    """The library module, or an ImportError saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(f"{name} is not installed: pip install 'chipprune[vision]'") from None


def version(name: str) -> str:
    """The installed version of a library."""
    return str(library(name).__version__)


def names(name: str) -> list[str]:
    """Every classification model a library builds."""
    lib = library(name)
    if name == "timm":
        return list(lib.list_models())
    return list(lib.models.list_models(module=lib.models))


def build(source: Source, pretrained: bool = False) -> nn.Module:
    """The model, with random weights or (pretrained) the library's own, which it downloads."""
    lib = library(source.library)
    try:
        if source.library == "timm":
            return lib.create_model(source.name, pretrained=pretrained, **source.kwargs)
        return lib.models.get_model(source.name, weights="DEFAULT" if pretrained else None, **source.kwargs)
    except (TypeError, ValueError, AssertionError, KeyError) as e:  # constructor arguments it does not take
        raise ValueError(f"{source.arch} with {source.kwargs}: {type(e).__name__}: {e}") from None


def defaults(source: Source, model: nn.Module) -> Defaults:
    """Input size and normalization from the library's config (timm: the model's pretrained_cfg; torchvision: its
    default weights' transforms, ImageNet's where it has none); the class count the model was built with."""
    # timm's models say it; torchvision's take it as a constructor argument, 1000 by default
    classes = int(getattr(model, "num_classes", source.kwargs.get("num_classes", 1000)))
    if source.library == "timm":
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        size = cfg.get("input_size", (3, 224, 224))[-1]
        return Defaults(size, tuple(cfg.get("mean", IMAGENET[0])), tuple(cfg.get("std", IMAGENET[1])), classes)
    try:
        transforms = library("torchvision").models.get_model_weights(source.name).DEFAULT.transforms()
    except (ValueError, AttributeError):  # a builder without published weights
        return Defaults(224, *IMAGENET, classes)
    return Defaults(int(transforms.crop_size[0]), tuple(transforms.mean), tuple(transforms.std), classes)


TORCHVISION_FAMILIES: dict[str, str] = {
    "alexnet": "alexnet",
    "convnext": "convnext_tiny",
    "densenet": "densenet121",
    "efficientnet": "efficientnet_b0",
    "efficientnet_v2": "efficientnet_v2_s",
    "googlenet": "googlenet",
    "inception": "inception_v3",
    "mnasnet": "mnasnet0_5",
    "mobilenet_v2": "mobilenet_v2",
    "mobilenet_v3": "mobilenet_v3_small",
    "regnet_x": "regnet_x_400mf",
    "regnet_y": "regnet_y_400mf",
    "resnet": "resnet18",
    "resnext": "resnext50_32x4d",
    "shufflenet_v2": "shufflenet_v2_x0_5",
    "squeezenet": "squeezenet1_1",
    "vgg": "vgg11_bn",
}

TIMM_FAMILIES: dict[str, str] = {
    "resnet": "resnet18",
    "resnet-d": "resnet18d",
    "resnext": "resnext26ts",
    "seresnext": "seresnext26d_32x4d",
    "res2net": "res2net50_14w_8s",
    "resnest": "resnest14d",
    "regnetx": "regnetx_002",
    "regnety": "regnety_002",
    "regnetz": "regnetz_b16",
    "efficientnet": "efficientnet_b0",
    "efficientnetv2": "efficientnetv2_rw_t",
    "mobilenetv3": "mobilenetv3_small_050",
    "mobilenetv4": "mobilenetv4_conv_small",
    "mnasnet": "mnasnet_small",
    "ghostnet": "ghostnet_050",
    "rexnet": "rexnet_100",
    "mixnet": "mixnet_s",
    "convnext": "convnext_atto",
    "densenet": "densenet121",
    "dla": "dla46_c",
    "dpn": "dpn48b",
    "hrnet": "hrnet_w18_small",
    "cspnet": "cspresnet50",
    "cspdarknet": "cs3darknet_s",
    "darknet": "darknet17",
    "vovnet": "ese_vovnet19b_slim",
    "repvgg": "repvgg_a0",
    "mobileone": "mobileone_s0",
    "xception": "xception41",
    "inception": "inception_v3",
    "nf_regnet": "nf_regnet_b0",
    "skresnet": "skresnet18",
    "selecsls": "selecsls42b",
}
