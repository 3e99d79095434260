"""VGG-16 with BatchNorm for 32×32 inputs, as in the HRank/CHIP code (same module names, so their weights load)."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .common import Arch, ChannelLayer, RegistryModel, paper_width, take, with_all_kept

CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
CONVS = tuple(f"features.conv{i}" for i, c in enumerate(CFG) if c != "M")
CHANNELS = tuple(c for c in CFG if isinstance(c, int))


class VGG(RegistryModel):
    """13 convs (each conv-BN-ReLU, max-pools between stages), 2×2 average pool, a two-layer BN classifier."""

    def __init__(self, widths: dict[str, int] | None = None, num_classes: int = 10) -> None:
        super().__init__()
        self.widths = full_widths() | (widths or {})
        self.num_classes = num_classes
        features: OrderedDict[str, nn.Module] = OrderedDict()
        in_channels = 3
        for i, c in enumerate(CFG):
            if c == "M":
                features[f"pool{i}"] = nn.MaxPool2d(2, 2)
                continue
            out = self.widths[f"features.conv{i}"]
            features[f"conv{i}"] = nn.Conv2d(in_channels, out, 3, padding=1)
            features[f"norm{i}"] = nn.BatchNorm2d(out)
            features[f"relu{i}"] = nn.ReLU(inplace=True)
            in_channels = out
        self.features = nn.Sequential(features)
        self.avgpool = nn.AvgPool2d(2)
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("linear1", nn.Linear(in_channels, 512)),
                    ("norm1", nn.BatchNorm1d(512)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("linear2", nn.Linear(512, num_classes)),
                ]
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))

    def channel_layers(self) -> list[ChannelLayer]:
        """Prunable convs: all 13, each scored on its own ReLU's output."""
        return [ChannelLayer(conv, conv.replace("conv", "relu")) for conv in CONVS]

    def prune(self, keep: dict[str, Tensor], positional_shortcuts: bool = False) -> VGG:
        """A smaller dense copy keeping, per conv, the output channels `keep[conv]` (sorted; missing = all)."""
        keep = with_all_kept(keep, self.widths)
        pruned = VGG({n: len(k) for n, k in keep.items()}, self.num_classes)
        prev = None
        for conv in CONVS:
            take(pruned.get_submodule(conv), self.get_submodule(conv), keep[conv], prev)
            norm = conv.replace("conv", "norm")
            take(pruned.get_submodule(norm), self.get_submodule(norm), keep[conv])
            prev = keep[conv]
        new, old = pruned.classifier, self.classifier
        take(new[0], old[0], None, prev)  # linear1 reads the last conv's channels
        take(new[1], old[1])  # norm1
        take(new[3], old[3])  # linear2
        return pruned


def full_widths() -> dict[str, int]:
    """Output channels of every conv at full width."""
    return dict(zip(CONVS, CHANNELS, strict=True))


def widths_for_rates(rates: list[float]) -> dict[str, int]:
    """The paper's configuration: one rate for each of the first 12 convs; the 13th is never pruned."""
    return {conv: paper_width(c, r) for (conv, c), r in zip(full_widths().items(), [*rates, 0.0], strict=True)}


NUM_RATES = 12

ARCHS = {
    "vgg16_bn": Arch(
        build=VGG,
        widths_for_rates=widths_for_rates,
        num_rates=NUM_RATES,
        rate_layout="one rate for each of the first 12 convs",
        input_size=32,
        num_classes=10,
        head="classifier.linear2",
        finetune_preset="paper-cifar",
        presets={
            "paper-1": "[0.21]*7+[0.75]*5",
            "paper-2": "[0.3]*7+[0.75]*5",
            "paper-3": "[0.45]*7+[0.78]*5",
        },
    ),
}
