"""A pruned model's structure as plain data: what pruning changed, against a fresh build of its architecture.

Pruning changes structural attributes of modules (a conv's channel counts and groups, a norm's feature count or
normalized_shape, split sizes), and chipprune's tracing replaces calls whose arguments hold channel counts (a
reshape, a split, a channel shuffle). Both are recorded as JSON values, so that a model file of any architecture
holds no pickled module: loading builds the architecture, sets the attributes back, installs the calls and then
takes the tensors with their new shapes."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, NamedTuple, cast

from torch import Tensor, nn

from . import tracing

Plain = bool | int | float | str | None | list["Plain"] | dict[str, "Plain"]


class Structure(NamedTuple):
    """Per module name: the attributes pruning changed, and the calls of its forward it replaced."""

    attributes: dict[str, dict[str, Plain]]
    calls: dict[str, list[dict[str, Plain]]]


def record(model: nn.Module, fresh: nn.Module) -> Structure:
    """What `model` changed against `fresh`, the same architecture as built; ValueError naming the module and
    attribute of a changed value that is not plain data, or of a module that is not the one built."""
    built = dict(fresh.named_modules())
    attributes: dict[str, dict[str, Plain]] = {}
    for name, module in model.named_modules():
        if type(built.get(name)) is not type(module):
            raise ValueError(f"{name or 'the model'}: a {type(module).__name__} where the architecture builds "
                             f"{type(built.get(name)).__name__ if name in built else 'nothing'}")  # fmt: skip
        changed = {
            key: _plain(value, f"{name}.{key}")
            for key, value in vars(module).items()
            if not key.startswith("_") and key != "training" and _differs(value, vars(built[name]).get(key))
        }
        if changed:
            attributes[name] = changed
    calls = {name: [_call(site, r) for site, r in chosen.items()] for name, chosen in _replacements(model).items()}
    return Structure(attributes, calls)


def restore(model: nn.Module, structure: Structure) -> None:
    """Set the recorded attributes on `model` (a fresh build) and install the recorded calls."""
    modules = dict(model.named_modules())
    for name, changed in structure.attributes.items():
        if name not in modules:
            raise ValueError(f"{name}: no such module in the architecture")
        for key, value in changed.items():
            # Only what record writes: a plain attribute the module has as built (never a private one or a method).
            if key.startswith("_") or key not in vars(modules[name]) or not _is_plain(vars(modules[name])[key]):
                raise ValueError(f"{name}.{key}: not a structural attribute of {type(modules[name]).__name__}")
            setattr(modules[name], key, _typed(value, vars(modules[name])[key]))
    replacements = {name: dict(_uncall(c) for c in calls) for name, calls in structure.calls.items()}
    missing = sorted(set(replacements) - set(modules))
    if missing:
        raise ValueError(f"{missing[0]}: no such module in the architecture")
    tracing.install(model, replacements)


def assign(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Make the tensors of `state` the parameters and buffers of `model`, whatever their shapes (load_state_dict
    with assign=True still refuses new shapes); ValueError listing the names that do not match one to one."""
    ours = model.state_dict(keep_vars=True)
    problems = [f"missing {k}" for k in ours if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in ours]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; … ({len(problems)} in all)" if len(problems) > 8 else "")
        raise ValueError(f"the tensors do not fit the architecture: {shown}")
    modules = dict(model.named_modules())
    for key, tensor in state.items():
        owner, _, name = key.rpartition(".")
        module = modules[owner]
        if name in module._parameters:
            old = module._parameters[name]
            module._parameters[name] = nn.Parameter(tensor, requires_grad=old is None or old.requires_grad)
        else:
            module._buffers[name] = tensor


def _differs(value: Any, built: Any) -> bool:
    """Whether an attribute's value is not the built one (values other than plain data compare by type)."""
    if _is_plain(value) and _is_plain(built):
        return bool(value != built)
    return type(value) is not type(built) and (_is_plain(value) or _is_plain(built))


def _is_plain(value: Any) -> bool:
    """Numbers, strings, None, and tuples, lists and str-keyed dicts of them."""
    if isinstance(value, bool | int | float | str) or value is None:
        return True
    if isinstance(value, tuple | list):
        return all(_is_plain(v) for v in value)
    return isinstance(value, dict) and all(isinstance(k, str) and _is_plain(v) for k, v in value.items())


def _plain(value: Any, where: str) -> Plain:
    """`value` as JSON data (tuples as lists), or ValueError naming `where`."""
    if not _is_plain(value):
        raise ValueError(f"{where}: pruning changed it to a {type(value).__name__}, which a model file cannot record")
    if isinstance(value, tuple | list):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v, where) for k, v in value.items()}
    return value  # type: ignore[no-any-return]


def _typed(value: Plain, old: Any) -> Any:
    """A recorded value with the container types of the built one (lists back to tuples)."""
    if isinstance(value, list) and isinstance(old, tuple | list):
        items = [_typed(v, old[i] if i < len(old) else None) for i, v in enumerate(value)]
        return type(old)(items) if isinstance(old, tuple) else items
    return value


def _replacements(model: nn.Module) -> dict[str, dict[tracing.Site, tracing.Replacement]]:
    """The calls tracing.install replaced, per module name."""
    found = {}
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            override = getattr(hook, "__self__", None)
            if isinstance(override, tracing.Override):
                found[name] = override.replacements
    return found


def _call(site: tracing.Site, replacement: tracing.Replacement) -> dict[str, Plain]:
    """A replaced call as JSON: where it is in the library's source, and what replaces it."""
    file, line, count = site
    value: Plain
    if isinstance(replacement, tracing.Index):
        value = [_key(k) for k in replacement.key]
    else:
        value = _plain(replacement[0], type(replacement).__name__)
    return {"file": _library_path(file), "line": line, "count": count, "kind": type(replacement).__name__,
            "value": value}  # fmt: skip


KINDS = ("Split", "Index", "Shape", "Gather")


def _uncall(call: dict[str, Plain]) -> tuple[tracing.Site, tracing.Replacement]:
    """A replaced call read back; ValueError for one that is not one."""
    kind, value, line, count = call.get("kind"), call.get("value"), call.get("line"), call.get("count")
    if not (kind in KINDS and isinstance(line, int) and isinstance(count, int) and isinstance(call.get("file"), str)):
        raise ValueError(f"not a recorded call: {str(call)[:80]}")
    site = (_source_path(str(call["file"])), line, count)
    if kind == "Index" and isinstance(value, list):
        return site, tracing.Index(tuple(_unkey(k) for k in value))
    if kind == "Shape" and isinstance(value, int):
        return site, tracing.Shape(value)
    if kind in ("Split", "Gather") and isinstance(value, list) and all(isinstance(v, int) for v in value):
        return site, (tracing.Split if kind == "Split" else tracing.Gather)(tuple(cast(list[int], value)))
    raise ValueError(f"not a recorded call: {str(call)[:80]}")


def _key(k: Any) -> Plain:
    """One entry of an indexing key as JSON."""
    if isinstance(k, slice):
        return {"slice": [k.start, k.stop, k.step]}
    return "..." if k is Ellipsis else _plain(k, "an indexing key")


def _unkey(k: Plain) -> Any:
    """One entry of an indexing key read back."""
    if isinstance(k, dict):
        return slice(*k["slice"])  # type: ignore[misc]
    return Ellipsis if k == "..." else k


def _library_path(file: str) -> str:
    """A source file's path from the folder that holds its top-level package (timm/layers/activations.py); a file
    outside any package as it is."""
    path = Path(file)
    if not (path.parent / "__init__.py").exists():
        return file
    top = path.parent
    while (top.parent / "__init__.py").exists():
        top = top.parent
    return path.relative_to(top.parent).as_posix()


def _source_path(recorded: str) -> str:
    """The installed file of a path recorded by _library_path: under the folder its top-level package is in."""
    if os.path.isabs(recorded):
        return recorded
    package = importlib.import_module(recorded.split("/")[0])
    return os.path.join(os.path.dirname(os.path.dirname(str(package.__file__))), *recorded.split("/"))
