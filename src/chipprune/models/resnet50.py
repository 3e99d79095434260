"""ResNet-50 for ImageNet (He et al. 2016), with torchvision's parameter names so its weights load as they are."""

from __future__ import annotations

from typing import cast

from torch import Tensor, nn

from .common import Arch, ChannelLayer, RegistryModel, paper_width, take, with_all_kept

STAGES = ((3, 256, 1), (4, 512, 2), (6, 1024, 2), (3, 2048, 2))  # blocks, output channels, stride


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carries the stride), 1×1 expand, plus the identity or a projection shortcut.

    One ReLU module per use (torchvision reuses one three times) so each post-activation map is observable."""

    def __init__(self, in_channels: int, mid1: int, mid2: int, out: int, stride: int, project: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid1, mid2, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(mid2, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample: nn.Sequential | None = None
        if project:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        self.relu3 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu3(self.bn3(self.conv3(out)) + identity)


class ResNet50(RegistryModel):
    """ResNet-50 for 224×224 inputs; `widths` maps conv names to output channels (default: full width)."""

    def __init__(self, widths: dict[str, int] | None = None, num_classes: int = 1000) -> None:
        super().__init__()
        self.widths = full_widths() | (widths or {})
        w = self.widths
        self.conv1 = nn.Conv2d(3, w["conv1"], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w["conv1"])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages: list[list[Bottleneck]] = [[], [], [], []]
        prev = "conv1"
        for s, (blocks, _, stride) in enumerate(STAGES):
            for b in range(blocks):
                name = f"layer{s + 1}.{b}"
                stages[s].append(
                    Bottleneck(
                        w[prev],
                        w[f"{name}.conv1"],
                        w[f"{name}.conv2"],
                        w[f"{name}.conv3"],
                        stride if b == 0 else 1,
                        project=b == 0,
                    )
                )
                prev = f"{name}.conv3"
        self.layer1, self.layer2, self.layer3, self.layer4 = (nn.Sequential(*blocks) for blocks in stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[prev], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))

    def blocks(self) -> dict[str, Bottleneck]:
        """The blocks by name, in forward order."""
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        return {
            f"layer{s + 1}.{b}": cast(Bottleneck, block)
            for s, stage in enumerate(stages)
            for b, block in enumerate(stage)
        }

    def channel_layers(self) -> list[ChannelLayer]:
        """Prunable convs: the stem, each block's inner convs, and its output conv (with its projection)."""
        layers = [ChannelLayer("conv1", "relu")]
        for name in self.blocks():
            layers += [
                ChannelLayer(f"{name}.conv1", f"{name}.relu1"),
                ChannelLayer(f"{name}.conv2", f"{name}.relu2"),
                ChannelLayer(f"{name}.conv3", f"{name}.relu3", name.split(".")[0].replace("layer", "stage")),
            ]
        return layers

    def prune(self, keep: dict[str, Tensor], positional_shortcuts: bool = False) -> ResNet50:
        """A smaller dense copy keeping, per conv, the output channels `keep[conv]` (sorted; missing = all).

        Identity shortcuts add by position, so they stay aligned only where a stage keeps one channel set."""
        keep = with_all_kept(keep, self.widths)
        pruned = ResNet50({n: len(k) for n, k in keep.items()}, self.fc.out_features)
        take(pruned.conv1, self.conv1, keep["conv1"])
        take(pruned.bn1, self.bn1, keep["conv1"])
        prev = "conv1"
        for (name, old), new in zip(self.blocks().items(), pruned.blocks().values(), strict=True):
            inp = keep[prev]
            for i in (1, 2, 3):
                out = keep[f"{name}.conv{i}"]
                take(new.get_submodule(f"conv{i}"), old.get_submodule(f"conv{i}"), out, inp)
                take(new.get_submodule(f"bn{i}"), old.get_submodule(f"bn{i}"), out)
                inp = out
            if old.downsample is not None and new.downsample is not None:
                take(new.downsample[0], old.downsample[0], keep[f"{name}.conv3"], keep[prev])
                take(new.downsample[1], old.downsample[1], keep[f"{name}.conv3"])
            prev = f"{name}.conv3"
        take(pruned.fc, self.fc, None, keep[prev])
        return pruned


def full_widths() -> dict[str, int]:
    """Output channels of every conv at full width."""
    widths = {"conv1": 64}
    for s, (blocks, out, _) in enumerate(STAGES):
        for b in range(blocks):
            name = f"layer{s + 1}.{b}"
            widths |= {f"{name}.conv1": out // 4, f"{name}.conv2": out // 4, f"{name}.conv3": out}
    return widths


def widths_for_rates(rates: list[float]) -> dict[str, int]:
    """The paper's configuration: [stem] + [stage 1–3 outputs] + [16 block rates for both inner convs]."""
    widths = {"conv1": paper_width(64, rates[0])}
    stage_rates = (*rates[1:4], 0.0)  # the stage-4 output is never pruned
    block = 0
    for s, (blocks, out, _) in enumerate(STAGES):
        for b in range(blocks):
            name, mid = f"layer{s + 1}.{b}", paper_width(out // 4, rates[4 + block])
            widths |= {f"{name}.conv1": mid, f"{name}.conv2": mid, f"{name}.conv3": paper_width(out, stage_rates[s])}
            block += 1
    return widths


NUM_RATES = 20

ARCHS = {
    "resnet50": Arch(
        build=ResNet50,
        widths_for_rates=widths_for_rates,
        num_rates=NUM_RATES,
        rate_layout="[stem] + [stage 1-3 outputs] + [16 block inner rates]",
        input_size=224,
        num_classes=1000,
        head="fc",
        finetune_preset="paper-imagenet",
        presets={
            "paper-1": "[0.]+[0.1]*3+[0.35]*16",
            "paper-2": "[0.]+[0.12]*3+[0.38]*16",
            "paper-3": "[0.]+[0.25]*3+[0.5]*16",
            "paper-4": "[0.]+[0.5]*3+[0.6]*16",
        },
    ),
}
