"""CIFAR ResNets of depth 6n+2 (He et al. 2016): BasicBlocks and the option-A zero-padding shortcut, with the
Torch-Pruning pruners of that shortcut and the state it is traced and pruned in."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from .common import Arch, ChannelLayer, Modules, RegistryModel, paper_width, take, with_all_kept

STAGE_CHANNELS = (16, 32, 64)


class ChannelShortcut(nn.Module):
    """Option-A shortcut: subsample by `stride`, put input channel src[k] at output channel dst[k], zeros elsewhere.

    A module of its own (not F.pad in a lambda) so that pruning can re-map channels and dependency
    tracers see an ordinary module."""

    src: Tensor
    dst: Tensor
    gather: Tensor

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.out_channels, self.stride = out_channels, stride
        self.register_buffer("src", torch.empty(0, dtype=torch.long))
        self.register_buffer("dst", torch.empty(0, dtype=torch.long))
        self.set_map(*self.positional(in_channels, out_channels))

    @staticmethod
    def positional(in_channels: int, out_channels: int) -> tuple[Tensor, Tensor]:
        """The map of F.pad on channels: centre the input, zero-padding or cropping both ends."""
        front = (out_channels - in_channels) // 2
        src = torch.arange(max(0, -front), min(in_channels, out_channels - front))
        return src, src + front

    def set_map(self, src: Tensor, dst: Tensor) -> None:
        """Route input channels src to output channels dst."""
        self.src, self.dst = src.long(), dst.long()
        everything = torch.arange(self.out_channels, device=self.src.device)
        self.identity = torch.equal(self.src, self.dst) and torch.equal(self.src, everything)
        # Output channel o reads channel gather[o] of the input with one zero channel padded in front: a single
        # index_select, which traces and exports for any batch size (an index assignment does not).
        gather = torch.zeros(self.out_channels, dtype=torch.long, device=self.src.device)
        gather[self.dst] = self.src + 1
        self.register_buffer("gather", gather, persistent=False)

    def restricted(self, inp: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        """This map after keeping input channels `inp` and output channels `out` (indices into the old ones)."""
        pos_in = {c: i for i, c in enumerate(inp.tolist())}
        pos_out = {c: i for i, c in enumerate(out.tolist())}
        pairs = [
            (pos_in[s], pos_out[d])
            for s, d in zip(self.src.tolist(), self.dst.tolist(), strict=True)
            if s in pos_in and d in pos_out
        ]
        src, dst = zip(*pairs, strict=True) if pairs else ((), ())
        return torch.tensor(src, dtype=torch.long), torch.tensor(dst, dtype=torch.long)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # A pruned model's maps differ in length from the freshly built ones: take the stored size.
        for name in ("src", "dst"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.set_map(self.src, self.dst)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.identity and x.shape[1] == self.out_channels:
            return x
        return F.pad(x, (0, 0, 0, 0, 1, 0)).index_select(1, self.gather)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, mid: int, out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.shortcut = ChannelShortcut(in_channels, out, stride)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCifar(RegistryModel):
    """ResNet-(6n+2) for 32×32 inputs; `widths` maps conv names to output channels (default: full width)."""

    def __init__(self, depth: int, widths: dict[str, int] | None = None, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        self.depth, self.n = depth, (depth - 2) // 6
        self.widths = full_widths(depth) | (widths or {})
        w = self.widths
        self.conv1 = nn.Conv2d(3, w["conv1"], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w["conv1"])
        self.relu = nn.ReLU(inplace=True)
        stages: list[list[BasicBlock]] = [[], [], []]
        prev = "conv1"
        for s in range(3):
            for b in range(self.n):
                name = f"layer{s + 1}.{b}"
                stride = 2 if s > 0 and b == 0 else 1
                stages[s].append(BasicBlock(w[prev], w[f"{name}.conv1"], w[f"{name}.conv2"], stride))
                prev = f"{name}.conv2"
        self.layer1, self.layer2, self.layer3 = (nn.Sequential(*blocks) for blocks in stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[prev], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))

    def blocks(self) -> dict[str, BasicBlock]:
        """The blocks by name, in forward order."""
        stages = (self.layer1, self.layer2, self.layer3)
        return {
            f"layer{s + 1}.{b}": cast(BasicBlock, block)
            for s, stage in enumerate(stages)
            for b, block in enumerate(stage)
        }

    def channel_layers(self) -> list[ChannelLayer]:
        """Prunable convs: the stem and every block's two convs; the stem adds into stage 1 through identities."""
        layers = [ChannelLayer("conv1", "relu", "stage1")]
        for name in self.blocks():
            stage = name.split(".")[0].replace("layer", "stage")
            layers += [
                ChannelLayer(f"{name}.conv1", f"{name}.relu1"),
                ChannelLayer(f"{name}.conv2", f"{name}.relu2", stage),
            ]
        return layers

    def prune(self, keep: dict[str, Tensor], positional_shortcuts: bool = False) -> ResNetCifar:
        """A smaller dense copy keeping, per conv, the output channels `keep[conv]` (sorted; missing = all).

        Shortcuts either keep routing each surviving channel to the channel it fed before (aligned sums),
        or, as the paper's code, pad or crop by position (`positional_shortcuts`)."""
        keep = with_all_kept(keep, self.widths)
        pruned = ResNetCifar(self.depth, {n: len(k) for n, k in keep.items()}, self.fc.out_features)
        take(pruned.conv1, self.conv1, keep["conv1"])
        take(pruned.bn1, self.bn1, keep["conv1"])
        prev = "conv1"
        for (name, old), new in zip(self.blocks().items(), pruned.blocks().values(), strict=True):
            mid, out = keep[f"{name}.conv1"], keep[f"{name}.conv2"]
            take(new.conv1, old.conv1, mid, keep[prev])
            take(new.bn1, old.bn1, mid)
            take(new.conv2, old.conv2, out, mid)
            take(new.bn2, old.bn2, out)
            if not positional_shortcuts:
                new.shortcut.set_map(*old.shortcut.restricted(keep[prev], out))
            prev = f"{name}.conv2"
        take(pruned.fc, self.fc, None, keep[prev])
        return pruned


def full_widths(depth: int) -> dict[str, int]:
    """Output channels of every conv at full width."""
    n = (depth - 2) // 6
    widths = {"conv1": 16}
    for s, c in enumerate(STAGE_CHANNELS):
        for b in range(n):
            widths[f"layer{s + 1}.{b}.conv1"] = widths[f"layer{s + 1}.{b}.conv2"] = c
    return widths


def widths_for_rates(depth: int, rates: list[float]) -> dict[str, int]:
    """The paper's configuration: [stem] + [stage-1, stage-2 outputs] + [one rate per block's inner conv]."""
    n = (depth - 2) // 6
    widths = {"conv1": paper_width(16, rates[0])}
    stage_rates = (rates[1], rates[2], 0.0)  # the stage-3 output is never pruned
    for s, c in enumerate(STAGE_CHANNELS):
        for b in range(n):
            widths[f"layer{s + 1}.{b}.conv1"] = paper_width(c, rates[3 + s * n + b])
            widths[f"layer{s + 1}.{b}.conv2"] = paper_width(c, stage_rates[s])
    return widths


def num_rates(depth: int) -> int:
    """How many rates a configuration of this depth takes."""
    return 3 + 3 * (depth - 2) // 6


def _arch(depth: int, presets: dict[str, str] | None = None) -> Arch:
    """The registry entry of the CIFAR ResNet of `depth`."""
    rates = num_rates(depth)
    return Arch(
        build=partial(ResNetCifar, depth),
        widths_for_rates=partial(widths_for_rates, depth),
        num_rates=rates,
        rate_layout=f"[stem] + [stage-1, stage-2 outputs] + [{rates - 3} block inner rates]",
        input_size=32,
        num_classes=10,
        head="fc",
        finetune_preset="paper-cifar",
        presets=presets or {},
    )


ARCHS = {
    "resnet20": _arch(20),
    "resnet32": _arch(32),
    "resnet44": _arch(44),
    "resnet56": _arch(
        56,
        {
            "paper-1": "[0.]+[0.15]*2+[0.4]*27",
            "paper-2": "[0.]+[0.4]*2+[0.5]*9+[0.6]*9+[0.7]*9",
        },
    ),
    "resnet110": _arch(
        110,
        {
            "paper-1": "[0.]+[0.2]*2+[0.3]*18+[0.35]*36",
            "paper-2": "[0.]+[0.22]*2+[0.35]*18+[0.45]*36",
            "paper-3": "[0.]+[0.4]*2+[0.5]*18+[0.65]*36",
        },
    ),
}


# --------------------------------------------------------------------------- Torch-Pruning


class ShortcutPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning surgery of a ChannelShortcut: input and output channels are independent dims, as a conv's."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Drop the routes to the pruned output channels and renumber the rest."""
        assert isinstance(layer, ChannelShortcut)
        keep = torch.tensor([c for c in range(layer.out_channels) if c not in set(idxs)], dtype=torch.long)
        src, dst = layer.restricted(torch.arange(len(layer.src) and int(layer.src.max().item()) + 1), keep)
        layer.out_channels = len(keep)
        layer.set_map(src, dst)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Drop the routes from the pruned input channels and renumber the rest."""
        assert isinstance(layer, ChannelShortcut)
        n = max([*layer.src.tolist(), *idxs], default=-1) + 1
        keep = torch.tensor([c for c in range(n) if c not in set(idxs)], dtype=torch.long)
        layer.set_map(*layer.restricted(keep, torch.arange(layer.out_channels)))
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        """Output channels."""
        return cast(ChannelShortcut, layer).out_channels

    def get_in_channels(self, layer: nn.Module) -> None:
        """Unknown to the module (it reads whatever it is given): no check on input indices."""
        return None


class IdentityShortcut(ChannelShortcut):
    """A ChannelShortcut whose map is the identity, as Torch-Pruning sees it while it traces and prunes: its input
    and output channels are the same channels, so the blocks it joins are pruned together (a residual group)."""


class IdentityShortcutPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning surgery of an IdentityShortcut: the same channels leave its input and its output."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """The identity map on the channels left."""
        assert isinstance(layer, ChannelShortcut)
        layer.out_channels -= len(set(idxs))
        everything = torch.arange(layer.out_channels)
        layer.set_map(everything, everything)
        return layer

    # One function for both sides: that is how Torch-Pruning knows that pruning one side prunes the other.
    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        """Output channels."""
        return cast(ChannelShortcut, layer).out_channels

    get_in_channels = get_out_channels


PRUNERS: dict[type[nn.Module], Any] = {ChannelShortcut: ShortcutPruner(), IdentityShortcut: IdentityShortcutPruner()}


@contextmanager
def traceable(model: nn.Module) -> Iterator[None]:
    """Every ChannelShortcut forwarded through its gather, and the identity ones seen as IdentityShortcut, while
    Torch-Pruning traces and prunes the model.

    An identity shortcut returns its input tensor itself, whose autograd node the tracer would then take for the
    shortcut's, hiding the layer that made it; on exit each shortcut is a ChannelShortcut again, its fast path
    recomputed from its map."""
    shortcuts = [m for m in model.modules() if isinstance(m, ChannelShortcut)]
    for m in shortcuts:
        if m.identity:
            m.__class__ = IdentityShortcut
        m.identity = False
    try:
        yield
    finally:
        for m in shortcuts:
            m.__class__ = ChannelShortcut
            m.set_map(m.src, m.dst)


def shortcut_problems(model: nn.Module, state: dict[str, Tensor]) -> list[str]:
    """What is wrong with the channel maps of a file's shortcuts: each an index list `src` into the block's input
    channels, of the length of `dst`, an index list without repeats into the shortcut's output channels."""
    problems = []
    for name, module in model.named_modules():
        if not isinstance(module, ChannelShortcut) or (f"{name}.src" not in state and f"{name}.dst" not in state):
            continue
        src, dst = state.get(f"{name}.src"), state.get(f"{name}.dst")
        block = model.get_submodule(name.rpartition(".")[0])
        inputs = cast(nn.Conv2d, block.get_submodule("conv1")).in_channels if hasattr(block, "conv1") else 0
        ok = (
            src is not None
            and dst is not None
            and src.dim() == dst.dim() == 1
            and len(src) == len(dst)
            and not src.is_floating_point()
            and not dst.is_floating_point()
            and torch.bool not in (src.dtype, dst.dtype)
            and (len(src) == 0 or (0 <= int(src.min()) <= int(src.max()) < inputs))
            and (len(dst) == 0 or (0 <= int(dst.min()) <= int(dst.max()) < module.out_channels))
            and len(dst.unique()) == len(dst)
        )
        if not ok:
            problems.append(f"{name}: src and dst are not a channel map from {inputs} to {module.out_channels}")
    return problems


def is_shortcut_map(model: nn.Module, key: str) -> bool:
    """Whether a state key is a shortcut's channel map: structure, which older checkpoints lack."""
    owner = key.rpartition(".")[0]
    return isinstance(model.get_submodule(owner), ChannelShortcut) if owner else False


MODULES = Modules(PRUNERS, traceable, shortcut_problems, is_shortcut_map)
