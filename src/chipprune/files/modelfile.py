"""The self-describing model file, and conversion of third-party checkpoints into it.

A model file is a plain dict of strings, numbers, lists and tensors, so `torch.load(path, weights_only=True)`
reads it and no checkpoint can run code:
    format, arch, num_classes, mean, std, classes, meta, state_dict
and, for a registry architecture, widths (conv name -> output channels); for a library model (`timm:NAME`,
`torchvision:NAME`), model_kwargs, input_size, versions (of the library), and structure: the attributes and calls
pruning changed (chipprune.files._structure). A training run's checkpoint adds `training`: optimizer state, step, RNG
states and history (see train.py). Written as `.safetensors`, the same content: the tensors, and the rest as JSON
under the header's metadata key "chipprune".
"""

from __future__ import annotations

import json
import math
import os
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from .. import models
from ..data import ImageSplit, batches
from ..models import ARCHS, RegistryModel, create_model, external, get_arch, rewidth
from . import _structure as structure
from .fileio import atomic_write, kind, load_reason, reason, save_torch, size_text

FORMAT = "chipprune-model/1"
SAFETENSORS_KEY = "chipprune"  # the header metadata entry that holds everything but the tensors, as JSON
NORMALIZATIONS = {
    "imagenet": external.IMAGENET,
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),  # as in the HRank/CHIP code
}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class ModelFileError(ValueError):
    """A model or weights file that cannot be used as asked."""


@dataclass
class ModelFile:
    """A registry or library model with what it needs to be used: normalization, class names, history."""

    arch: str  # a registry name, or timm:NAME / torchvision:NAME
    model: nn.Module  # a RegistryModel for a registry architecture
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # a library model's constructor arguments
    size: int | None = None  # a library model's input side (a registry architecture has its own)
    path: Path | None = field(default=None, compare=False)  # the file it was read from (a pruned model's parent)

    @property
    def input_size(self) -> int:
        """The side of the square images the model takes."""
        return self.size if self.size is not None else get_arch(self.arch).input_size

    @property
    def registry_model(self) -> RegistryModel:
        """The model of a registry architecture; ModelFileError for a library model."""
        if not isinstance(self.model, RegistryModel):
            raise ModelFileError(f"{self.arch} is not a registry architecture ({', '.join(ARCHS)})")
        return self.model

    @property
    def finetune_preset(self) -> str:
        """chip finetune's default hyperparameters: the registry entry's; for a library model, by its input size
        (CIFAR's 32 px or less: paper-cifar)."""
        if self.source is None:
            return get_arch(self.arch).finetune_preset
        return "paper-cifar" if self.input_size <= 32 else "paper-imagenet"

    def unpruned(self) -> nn.Module:
        """The architecture at full width, with this file's classes (random weights)."""
        source = self.source
        if source is None:
            return create_model(self.arch, None, len(self.classes))
        return external.build(source)

    @property
    def source(self) -> external.Source | None:
        """Where a library model comes from (None for a registry architecture)."""
        return external.parse(self.arch, self.model_kwargs) if external.is_external(self.arch) else None

    def batches(self, data: ImageSplit, batch_size: int, **options: Any) -> Iterator[tuple[Tensor, Tensor]]:
        """`data.batches` prepared for this model: its normalization and input size (options as there)."""
        return batches(data, batch_size, mean=self.mean, std=self.std, image_size=self.input_size, **options)

    def check_classes(self, names: list[str], *, ignore_names: bool = False) -> None:
        """Refuse data whose classes are not this model's: another number of them, or other names (or the same in
        another order), unless `ignore_names` (then they are matched by position, with a warning). A model whose
        classes were never named (imported ImageNet weights: class_0, …) takes any names."""
        if len(names) != len(self.classes):
            raise ModelFileError(f"the data has {len(names)} classes, the model {len(self.classes)}")
        if names == self.classes or self.classes == unnamed_classes(len(names)):
            return
        ours, theirs = set(self.classes), set(names)
        if ours == theirs:
            odd = [(m, d) for m, d in zip(self.classes, names, strict=True) if m != d]
            shown = "the same classes in another order: " + ", ".join(
                f"{d!r} where the model has {m!r}" for m, d in odd[:3]
            )
        else:
            shown = f"the data has {_listed(theirs - ours)}, the model {_listed(ours - theirs)} instead"
        if ignore_names:
            warnings.warn(f"matching the data's classes to the model's by position ({shown})", stacklevel=2)
            return
        raise ModelFileError(
            f"the data's classes are not the model's: {shown}; give --ignore-class-names to match them by position"
        )

    def save(self, path: str | os.PathLike, training: dict[str, Any] | None = None) -> None:
        """Write atomically (a crash leaves the old file or the new one, never half of one), with any training state."""
        payload: dict[str, Any] = {
            "format": FORMAT,
            "arch": self.arch,
            "num_classes": len(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            "classes": list(self.classes),
            "meta": self.meta,
            **self._structure(),
            "state_dict": _unshared(self.model.state_dict()),
        }
        if training is not None:
            payload["training"] = training
        if Path(path).suffix == ".safetensors":
            if training is not None:
                raise ModelFileError(f"{path}: a checkpoint with training state is written as .pt, not .safetensors")
            tensors = payload.pop("state_dict")
            atomic_write(path, safetensors.torch.save(tensors, {SAFETENSORS_KEY: json.dumps(payload)}))
        else:
            save_torch(payload, path)

    def _structure(self) -> dict[str, Any]:
        """What builds the model before its tensors are loaded: a registry model's widths, or a library model's
        source and the structure pruning changed (ValueError naming a module attribute that is not plain data)."""
        source = self.source
        if source is None:  # the widths of its convs now (graph pruning leaves model.widths as built)
            try:
                return {"widths": dict(rewidth(cast(RegistryModel, self.model), self.arch, len(self.classes)).widths)}
            except ValueError as e:
                raise ModelFileError(str(e)) from None
        recorded = structure.record(self.model, external.build(source))
        return {
            "model_kwargs": source.kwargs,
            "input_size": self.input_size,
            "versions": {source.library: external.version(source.library)},
            "structure": recorded._asdict(),
        }


def _unshared(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of a state dict on the CPU, each with memory of its own: safetensors refuses tensors that share it
    (a graph-pruned ResNet's shortcut maps, src and dst, are one tensor where they are the same map)."""
    seen: set[int] = set()
    tensors = {}
    for key, value in state.items():
        tensor = value.detach().cpu()
        address = tensor.untyped_storage().data_ptr()
        if (address in seen and tensor.numel() > 0) or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(address)
        tensors[key] = tensor
    return tensors


def safe_load(path: str | os.PathLike, what: str = "model file") -> Any:
    """torch.load that refuses anything but tensors and plain containers, and any path but a regular file."""
    path = Path(path)
    if not path.is_file():
        there = kind(path)
        raise ModelFileError(f"{path}: no such file" if there == "nothing" else f"{path} is {there}, not a {what}")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: empty file (0 bytes)")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, what)
    _check_inflation(path, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's note on the pickle protocol, before it refuses
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        foreign = _foreign(path, what)
        if foreign:
            raise ModelFileError(f"{path} is {foreign}") from None
        raise ModelFileError(
            f"{path}: cannot be read safely as a weights file: corrupt or truncated, or holding "
            f"objects other than tensors and plain containers ({load_reason(e, path)})"
        ) from None


def _check_inflation(path: Path, what: str) -> None:
    """Refuse, before torch reads it, a zip archive (torch.save's format) whose members hold more than the file: torch
    stores them as they are, so memory follows the file's size; compressed ones (a 2 MB file of a 1 GB tensor) would
    be inflated first."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return
        with zipfile.ZipFile(path) as z:
            inflated = sum(m.file_size for m in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):  # not an archive Python reads: torch tells what it is
        return
    size = path.stat().st_size
    if inflated > size:
        foreign = _foreign(path, what)  # a TorchScript archive, whose code is compressed, says what it is
        raise ModelFileError(
            f"{path} is {foreign}"
            if foreign
            else f"{path}: cannot be read safely as a {what}: its archive inflates to {size_text(inflated)} from "
            f"{size_text(size)} (torch.save stores its members as they are)"
        )


def _read_safetensors(path: Path, what: str) -> Any:
    """A safetensors file: its tensors as the state_dict of what its "chipprune" metadata holds (a plain state dict
    where it holds none)."""
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            # Cloned: the tensors of the mapped file are not aligned as torch allocates, and convs on them gave
            # other float sums (mixnet_s: logits off by 1e-7).
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118  (a safe_open handle, not a dict)
            header = (f.metadata() or {}).get(SAFETENSORS_KEY)
        rest = json.loads(header) if header is not None else None
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ModelFileError(f"{path}: cannot be read as a safetensors {what} ({reason(e)})") from None
    if rest is None:
        return tensors
    if not isinstance(rest, dict):
        raise ModelFileError(f"{path}: damaged model file: its metadata is not a JSON object")
    return {**rest, "state_dict": tensors}


def _foreign(path: Path, what: str) -> str | None:
    """What a file that torch cannot load is instead of a `what`, where its first bytes tell: ONNX, TorchScript, …"""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return None
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return f"a TorchScript archive, not a {what}: give the model file it was exported from"
        return None
    if head[:1] == b"\x08" and (b"pytorch" in head[:64] or path.suffix.lower() == ".onnx"):
        return f"an ONNX model, not a {what}: give the model file it was exported from"
    signatures = {
        b"\x1f\x8b": "a gzip archive",
        b"\x89PNG": "a PNG image",
        b"\xff\xd8\xff": "a JPEG image",
        b"\x89HDF": "an HDF5 file",
        b"BZh": "a bzip2 archive",
        b"\xfd7zXZ": "an xz archive",
    }
    for magic, found in signatures.items():
        if head.startswith(magic):
            return f"{found}, not a {what}"
    if head[257:262] == b"ustar":
        return f"a tar archive, not a {what}"
    if head.lstrip()[:1] in (b"{", b"["):
        return f"JSON or other text, not a {what}"
    return None


def load_model(path: str | os.PathLike) -> ModelFile:
    """Read a model file written by ModelFile.save."""
    return load_checkpoint(path)[0]


def load_checkpoint(path: str | os.PathLike) -> tuple[ModelFile, dict[str, Any] | None]:
    """Read a model file and the training state saved with it, if any."""
    mf, training = _read(path)
    return replace(mf, path=Path(path)), training


def _read(path: str | os.PathLike) -> tuple[ModelFile, dict[str, Any] | None]:
    """A model file's model and training state."""
    d = safe_load(path)
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a chipprune model file (convert third-party weights with `chip import`)")
    _check_fields(d, str(path))
    if external.is_external(d["arch"]):
        return _library_model(d, str(path)), d.get("training")
    if "widths" not in d:
        raise ModelFileError(f"{path}: damaged model file: no 'widths'")
    _check_widths(d["arch"], d["widths"], str(path))
    try:
        head = (d["num_classes"], _head_inputs(d["arch"], d["widths"]))
    except (ValueError, TypeError, KeyError, RuntimeError) as e:  # widths the architecture cannot be built with
        raise ModelFileError(f"{path}: its widths do not fit {d['arch']}: {reason(e)}") from None
    if not any(tuple(t.shape) == head for t in d["state_dict"].values()):  # before a head of so many rows is built
        raise ModelFileError(f"{path}: damaged model file: no head of its {d['num_classes']} classes in its weights")
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
    """Raise a ModelFileError naming the first field of a model file dict that is missing or not what chipprune
    writes there: of another kind, out of range, nested too deep (one validator per field, all applied as the file is
    read; a library model's structure is checked against its architecture as it is built)."""

    def finite(x: object) -> bool:
        try:
            return type(x) in (int, float) and math.isfinite(x)  # type: ignore[arg-type]
        except OverflowError:  # an int beyond float64
            return False

    def numbers(v: object) -> bool:
        return isinstance(v, list | tuple) and len(v) == 3 and all(finite(x) for x in v)

    def kwargs(v: object) -> bool:
        try:
            external.check_kwargs(v)
        except ValueError as e:
            raise ModelFileError(f"{source}: damaged model file: model_kwargs: {e}") from None
        return True

    library = isinstance(d.get("arch"), str) and external.is_external(d["arch"])
    checks = {
        "arch": lambda v: isinstance(v, str) and (v in ARCHS or external.is_external(v)),
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
        "meta": lambda v: isinstance(v, dict) and structure.is_plain(v, finite=True),
        "training": lambda v: v is None or isinstance(v, dict),
        # a library model's source and structure
        "model_kwargs": kwargs,
        "input_size": lambda v: type(v) is int and 1 <= v <= external.MAX_INPUT_SIZE,
        "versions": lambda v: (
            isinstance(v, dict)
            and len(v) <= len(external.LIBRARIES)
            and all(isinstance(k, str) and isinstance(x, str) and len(x) <= 64 for k, x in v.items())
        ),
        "structure": lambda v: (
            isinstance(v, dict) and v.keys() == {"attributes", "calls"} and all(isinstance(x, dict) for x in v.values())
        ),
    }
    required = {"arch", "num_classes", "mean", "std", "classes", "state_dict"}
    required |= {"model_kwargs", "input_size", "structure"} if library else set()
    for name, ok in checks.items():
        if name not in d and name in required:
            raise ModelFileError(f"{source}: damaged model file: no {name!r}")
        if name in d and not ok(d[name]):
            what = f"unknown architecture {d[name]!r:.40}" if name == "arch" and isinstance(d[name], str) else None
            what = what or f"invalid {name!r}"
            raise ModelFileError(f"{source}: damaged model file: {what}")


def _library_model(d: dict[str, Any], source: str) -> ModelFile:
    """A library model from a model file's dict (fields checked by _check_fields): built from its source, its
    recorded structure restored and its tensors assigned with their shapes, all checked on the meta device first."""
    kwargs, size = d["model_kwargs"], d["input_size"]
    if kwargs.get("num_classes", d["num_classes"]) != d["num_classes"]:
        raise ModelFileError(
            f"{source}: damaged model file: model_kwargs: num_classes {kwargs['num_classes']}, where the file has "
            f"{d['num_classes']} classes"
        )
    try:
        library_source = external.parse(d["arch"], kwargs)
    except (ValueError, ImportError) as e:
        raise ModelFileError(f"{source}: {e}") from None
    made_with = d.get("versions", {}).get(library_source.library)
    if made_with != external.version(library_source.library):
        warnings.warn(
            f"{source} was written with {library_source.library} {made_with}, this is "
            f"{external.version(library_source.library)}: its recorded calls may not match the library's code",
            stacklevel=3,
        )
    _check_finite(d["state_dict"], source)
    recorded = structure.Structure(d["structure"]["attributes"], d["structure"]["calls"])
    try:
        model = structure.rebuild(
            lambda: external.build(library_source), recorded, d["state_dict"], size, d["num_classes"]
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelFileError(f"{source}: its structure does not fit {d['arch']}: {reason(e)}") from None
    return ModelFile(
        d["arch"], model, tuple(d["mean"]), tuple(d["std"]), list(d["classes"]), d.get("meta", {}), kwargs, size
    )


def _check_widths(arch: str, widths: dict[str, int], source: str) -> None:
    """Refuse, before anything is built, widths of other convs than the architecture's or wider than it at full
    width (pruning only removes channels): the model built then takes no more memory than the full architecture.
    (A model file's head must also have the rows of its classes: its own weights back every size.)"""
    full = get_arch(arch).widths_for_rates([0.0] * get_arch(arch).num_rates)
    odd = sorted(set(widths) ^ set(full))
    if odd:
        raise ModelFileError(f"{source}: its widths do not fit {arch}: {', '.join(odd[:5])}")
    wide = [conv for conv, c in widths.items() if c > full[conv]]
    if wide:
        raise ModelFileError(
            f"{source}: its widths do not fit {arch}: {wide[0]} has {widths[wide[0]]} channels, "
            f"{arch} at full width {full[wide[0]]}"
        )


def _load_state(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load weights, or raise one error listing every mismatched name and shape."""
    ours = model.state_dict()
    optional = {k for k in ours if k.endswith("num_batches_tracked") or models.is_structure(model, k)}
    problems = [f"missing {k}" for k in ours if k not in state and k not in optional]
    problems += [f"unexpected {k}" for k in state if k not in ours]
    problems += [
        f"{k}: shape {tuple(v.shape)} where the model has {tuple(ours[k].shape)}"
        for k, v in state.items()
        if k in ours and not models.is_structure(model, k) and v.shape != ours[k].shape
    ]
    problems += [
        f"{k}: {v.dtype} where the model has {ours[k].dtype}"
        for k, v in state.items()
        if k in ours and v.dtype != ours[k].dtype and (v.is_complex() or not _same_kind(v.dtype, ours[k].dtype))
    ]
    problems += models.state_problems(model, state)
    if problems:
        shown = "; ".join(problems[:12]) + (f"; … ({len(problems)} in all)" if len(problems) > 12 else "")
        raise ModelFileError(f"{source}: weights do not fit the architecture: {shown}")
    _check_finite(state, source)
    try:
        model.load_state_dict(state, strict=False)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:  # what the checks above did not foresee
        raise ModelFileError(f"{source}: weights do not fit the architecture: {reason(e)}") from None


def _head_inputs(arch: str, widths: dict[str, int] | None = None) -> int:
    """The input features of the classifier (the last Linear) of an architecture at `widths` (no wider than at full
    width), built with one class: on the meta device (nothing allocated) where the architecture builds there."""
    try:
        with torch.device("meta"):
            model = create_model(arch, widths, 1)
    except (NotImplementedError, RuntimeError):
        model = create_model(arch, widths, 1)
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].in_features


def _same_kind(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether tensors of dtype `a` load into `b` without losing what they mean: float into float, int into int."""
    return a.is_floating_point == b.is_floating_point and (a == torch.bool) == (b == torch.bool)


def parse_normalization(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`imagenet`, `cifar`, or `m1,m2,m3:s1,s2,s3`."""
    if text in NORMALIZATIONS:
        return NORMALIZATIONS[text]
    try:
        mean, std = (tuple(float(v) for v in part.split(",")) for part in text.split(":"))
    except ValueError:
        raise ModelFileError(f"normalization must be imagenet, cifar or m1,m2,m3:s1,s2,s3, got {text!r}") from None
    if len(mean) != 3 or len(std) != 3 or not all(map(math.isfinite, mean + std)) or min(std) <= 0:
        raise ModelFileError(f"normalization needs 3 finite means and 3 finite positive stds, got {text!r}")
    return mean, std


def import_weights(
    arch: str, weights: str | os.PathLike, normalize: str = "imagenet", classes: list[str] | None = None
) -> ModelFile:
    """A model file from a third-party checkpoint: plain state_dict, or a dict holding `state_dict`.

    Accepts the `module.` prefix of DataParallel, the head named `linear` (public CIFAR ResNets) or `fc`
    (CHIP/HRank, torchvision), and pruned widths, read from the conv weights' shapes."""
    mean, std = parse_normalization(normalize)
    state = {_rename(k): v for k, v in _state_dict(weights).items()}
    full = create_model(arch)
    # Pruned widths from the conv weights' shapes; a tensor of another rank keeps the full width, and the shape
    # check of _load_state lists it.
    widths = {conv: _rows(state.get(f"{conv}.weight"), 4) or c for conv, c in full.widths.items()}  # type: ignore[union-attr, operator]
    head = state.get(f"{get_arch(arch).head}.weight")
    num_classes = _rows(head, 2) or get_arch(arch).num_classes
    _check_widths(arch, widths, str(weights))
    inputs = _head_inputs(arch, widths)
    if head is not None and head.dim() == 2 and head.shape[1] != inputs:  # refused before a head is built
        raise ModelFileError(
            f"{weights}: weights do not fit the architecture: head: shape {tuple(head.shape)} where the model has "
            f"({num_classes}, {inputs})"
        )
    model = create_model(arch, widths, num_classes)
    _load_state(model, state, str(weights))
    if classes is None:
        classes = CIFAR10_CLASSES if num_classes == 10 else unnamed_classes(num_classes)
    return ModelFile(arch, model, mean, std, classes, {"imported_from": Path(weights).name})


def _state_dict(weights: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a weights file: a plain state dict, or a dict holding one under `state_dict`."""
    ckpt = safe_load(weights, "weights file")
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelFileError(f"{weights}: expected a state_dict of tensors, or a dict holding one under 'state_dict'")
    return state


def library_model(
    arch: str,
    model_kwargs: dict[str, Any] | None = None,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = False,
    input_size: int | None = None,
    normalize: str | None = None,
) -> ModelFile:
    """A torchvision or timm model as a model file: random weights, the library's own (`pretrained`: downloaded),
    or a local state dict (`.pt`/`.pth` read with weights_only, or `.safetensors`). Input size and normalization
    are the library's unless given."""
    try:
        source = external.parse(arch, model_kwargs)
    except (ValueError, ImportError) as e:
        raise ModelFileError(str(e)) from None
    if input_size is not None and not 1 <= input_size <= external.MAX_INPUT_SIZE:
        raise ModelFileError(f"{arch}: an input side from 1 to {external.MAX_INPUT_SIZE} pixels, not {input_size}")
    try:
        model = external.build(source, pretrained)
    except ValueError as e:
        raise ModelFileError(str(e)) from None
    except Exception as e:  # a download fails in whatever way the network does
        raise ModelFileError(f"{arch}: the library's pretrained weights could not be had: {reason(e)}") from None
    meta: dict[str, Any] = {"pretrained": True} if pretrained else {}
    if weights is not None:
        state = _state_dict(weights)
        _load_state(model, {k.removeprefix("module."): v for k, v in state.items()}, str(weights))
        meta = {"imported_from": Path(weights).name}
    config = external.defaults(source, model)
    mean, std = parse_normalization(normalize) if normalize else (config.mean, config.std)
    classes = unnamed_classes(config.num_classes)
    return ModelFile(arch, model, mean, std, classes, meta, source.kwargs, input_size or config.input_size)


def _listed(names: set[str]) -> str:
    """A few names, quoted, and how many there are in all."""
    shown = ", ".join(repr(n) for n in sorted(names)[:3])
    return shown + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")


def unnamed_classes(n: int) -> list[str]:
    """The class names of a model whose classes were not named (ImageNet weights): class_0, class_1, …"""
    return [f"class_{i}" for i in range(n)]


def _rows(t: Tensor | None, dim: int) -> int:
    """The first dimension of a `dim`-d tensor, or 0 if it is absent or of another rank."""
    return int(t.shape[0]) if t is not None and t.dim() == dim else 0


def _rename(key: str) -> str:
    """A third-party parameter name in our naming."""
    key = key.removeprefix("module.")
    return "fc." + key.removeprefix("linear.") if key.startswith("linear.") else key


def _check_finite(state: dict[str, Tensor], source: str) -> None:
    """Refuse weights holding NaN or Inf: they evaluate to chance without a word."""
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ModelFileError(f"{source}: damaged weights: non-finite values (NaN or Inf) in {bad}")
