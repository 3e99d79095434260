"""The self-describing model file, and conversion of third-party checkpoints into it.

A model file is a plain dict of strings, numbers, lists and tensors, so `torch.load(path, weights_only=True)`
reads it and no checkpoint can run code:
    format, arch, widths (conv name -> output channels), num_classes, mean, std, classes, meta, state_dict
and, in a training run's checkpoint, `training`: optimizer state, step, RNG states and history (see train.py).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .data import ImageSplit, batches
from .fileio import load_reason, reason, save_torch
from .models import ARCHS, RegistryModel, create_model, get_arch
from .models.resnet_cifar import ChannelShortcut

FORMAT = "chipprune-model/1"
NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),  # as in the HRank/CHIP code
}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class ModelFileError(ValueError):
    """A model or weights file that cannot be used as asked."""


@dataclass
class ModelFile:
    """A registry model with what it needs to be used: normalization, class names, history."""

    arch: str
    model: RegistryModel
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def input_size(self) -> int:
        """The side of the square images the model takes."""
        return get_arch(self.arch).input_size

    def batches(self, data: ImageSplit, batch_size: int, **options: Any) -> Iterator[tuple[Tensor, Tensor]]:
        """`data.batches` prepared for this model: its normalization and input size (options as there)."""
        return batches(data, batch_size, mean=self.mean, std=self.std, image_size=self.input_size, **options)

    def save(self, path: str | os.PathLike, training: dict[str, Any] | None = None) -> None:
        """Write atomically (a crash leaves the old file or the new one, never half of one), with any training state."""
        payload: dict[str, Any] = {
            "format": FORMAT,
            "arch": self.arch,
            "widths": dict(self.model.widths),
            "num_classes": len(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            "classes": list(self.classes),
            "meta": self.meta,
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
        }
        if training is not None:
            payload["training"] = training
        save_torch(payload, path)


def safe_load(path: str | os.PathLike) -> Any:
    """torch.load that refuses anything but tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's note on the pickle protocol, before it refuses
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        raise ModelFileError(
            f"{path}: cannot be read safely as a weights file: corrupt or truncated, or holding "
            f"objects other than tensors and plain containers ({load_reason(e, path)})"
        ) from None


def load_model(path: str | os.PathLike) -> ModelFile:
    """Read a model file written by ModelFile.save."""
    return load_checkpoint(path)[0]


def load_checkpoint(path: str | os.PathLike) -> tuple[ModelFile, dict[str, Any] | None]:
    """Read a model file and the training state saved with it, if any."""
    d = safe_load(path)
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a chipprune model file (convert third-party weights with `chip import`)")
    _check_fields(d, str(path))
    try:
        model = create_model(d["arch"], d["widths"], d["num_classes"])
    except (ValueError, TypeError, KeyError, RuntimeError) as e:  # widths the architecture cannot be built with
        raise ModelFileError(f"{path}: its widths do not fit {d['arch']}: {reason(e)}") from None
    if dict(model.widths) != d["widths"]:
        odd = sorted(set(d["widths"]) ^ set(model.widths)) or sorted(d["widths"])
        raise ModelFileError(f"{path}: its widths do not fit {d['arch']}: {', '.join(odd[:5])}")
    _load_state(model, d["state_dict"], str(path))
    mf = ModelFile(d["arch"], model, tuple(d["mean"]), tuple(d["std"]), list(d["classes"]), d.get("meta", {}))
    return mf, d.get("training")


def _check_fields(d: dict[str, Any], source: str) -> None:
    """Raise a ModelFileError naming the first field of a model file dict that is missing or of the wrong kind."""

    def numbers(v: object) -> bool:
        return isinstance(v, list | tuple) and len(v) == 3 and all(isinstance(x, int | float) for x in v)

    checks = {
        "arch": lambda v: v in ARCHS,
        "widths": lambda v: (
            isinstance(v, dict) and all(isinstance(k, str) and type(c) is int and c > 0 for k, c in v.items())
        ),
        "num_classes": lambda v: type(v) is int and v > 0,
        "mean": numbers,
        "std": lambda v: numbers(v) and min(v) > 0,
        "classes": lambda v: (
            isinstance(v, list) and len(v) == d.get("num_classes") and all(isinstance(c, str) for c in v)
        ),
        "state_dict": lambda v: isinstance(v, dict) and all(isinstance(t, Tensor) for t in v.values()),
        "meta": lambda v: isinstance(v, dict),
        "training": lambda v: v is None or isinstance(v, dict),
    }
    for name, ok in checks.items():
        if name not in d and name not in ("meta", "training"):
            raise ModelFileError(f"{source}: damaged model file: no {name!r}")
        if name in d and not ok(d[name]):
            what = f"unknown architecture {d[name]!r}" if name == "arch" else f"invalid {name!r}"
            raise ModelFileError(f"{source}: damaged model file: {what}")


def _load_state(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load weights, or raise one error listing every mismatched name and shape."""
    ours = model.state_dict()
    optional = {k for k in ours if k.endswith("num_batches_tracked") or _is_shortcut_map(model, k)}
    problems = [f"missing {k}" for k in ours if k not in state and k not in optional]
    problems += [f"unexpected {k}" for k in state if k not in ours]
    problems += [
        f"{k}: shape {tuple(v.shape)} where the model has {tuple(ours[k].shape)}"
        for k, v in state.items()
        if k in ours and not _is_shortcut_map(model, k) and v.shape != ours[k].shape
    ]
    if problems:
        shown = "; ".join(problems[:12]) + (f"; … ({len(problems)} in all)" if len(problems) > 12 else "")
        raise ModelFileError(f"{source}: weights do not fit the architecture: {shown}")
    model.load_state_dict(state, strict=False)


def _is_shortcut_map(model: nn.Module, key: str) -> bool:
    """Whether a state key is a shortcut's channel map: structure, which older checkpoints lack."""
    owner = key.rpartition(".")[0]
    return isinstance(model.get_submodule(owner), ChannelShortcut) if owner else False


def parse_normalization(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`imagenet`, `cifar`, or `m1,m2,m3:s1,s2,s3`."""
    if text in NORMALIZATIONS:
        return NORMALIZATIONS[text]
    try:
        mean, std = (tuple(float(v) for v in part.split(",")) for part in text.split(":"))
    except ValueError:
        raise ModelFileError(f"normalization must be imagenet, cifar or m1,m2,m3:s1,s2,s3, got {text!r}") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ModelFileError(f"normalization needs 3 means and 3 positive stds, got {text!r}")
    return mean, std


def import_weights(
    arch: str, weights: str | os.PathLike, normalize: str = "imagenet", classes: list[str] | None = None
) -> ModelFile:
    """A model file from a third-party checkpoint: plain state_dict, or a dict holding `state_dict`.

    Accepts the `module.` prefix of DataParallel, the head named `linear` (public CIFAR ResNets) or `fc`
    (CHIP/HRank, torchvision), and pruned widths, read from the conv weights' shapes."""
    mean, std = parse_normalization(normalize)
    ckpt = safe_load(weights)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelFileError(f"{weights}: expected a state_dict of tensors, or a dict holding one under 'state_dict'")
    state = {_rename(k): v for k, v in state.items()}
    full = create_model(arch)
    # Pruned widths from the conv weights' shapes; a tensor of another rank keeps the full width, and the shape
    # check of _load_state lists it.
    widths = {conv: _rows(state.get(f"{conv}.weight"), 4) or c for conv, c in full.widths.items()}  # type: ignore[union-attr, operator]
    head = state.get("fc.weight", state.get("classifier.linear2.weight"))
    num_classes = _rows(head, 2) or get_arch(arch).num_classes
    model = create_model(arch, widths, num_classes)
    _load_state(model, state, str(weights))
    if classes is None:
        classes = CIFAR10_CLASSES if num_classes == 10 else [f"class_{i}" for i in range(num_classes)]
    return ModelFile(arch, model, mean, std, classes, {"imported_from": Path(weights).name})


def _rows(t: Tensor | None, dim: int) -> int:
    """The first dimension of a `dim`-d tensor, or 0 if it is absent or of another rank."""
    return int(t.shape[0]) if t is not None and t.dim() == dim else 0


def _rename(key: str) -> str:
    """A third-party parameter name in our naming."""
    key = key.removeprefix("module.")
    return "fc." + key.removeprefix("linear.") if key.startswith("linear.") else key
