"""A pruned model's structure as plain data: what pruning changed, against a fresh build of its architecture.

Pruning changes structural attributes of modules (a conv's channel counts and groups, a norm's feature count or
normalized_shape, split sizes), and chipprune's tracing replaces calls whose arguments hold channel counts (a
reshape, a split, a channel shuffle). Both are recorded as JSON values, so that a model file of any architecture
holds no pickled module: loading builds the architecture, sets the attributes back, installs the calls and then
takes the tensors with their new shapes.

A file's structure is untrusted input: nothing it names is imported or read (a recorded call names a source file of
the model's own library, found by path), every value must be one that pruning makes of the built one (a count no
larger, nothing else changed), and the model is first put together on the meta device, where its tensors are
compared with its structure and it runs one image, before anything is allocated."""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..pruning import _tracing as tracing

Plain = bool | int | float | str | None | list["Plain"] | dict[str, "Plain"]
MAX_DEPTH = 32  # nesting of plain data a file may hold (what chipprune writes nests a few levels deep)


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


def rebuild(
    build: Callable[[], nn.Module], structure: Structure, state: dict[str, Tensor], input_size: int, classes: int
) -> nn.Module:
    """The model `build` makes, with `structure` restored and the tensors of `state`; ValueError for a structure or
    tensors that do not fit it, found on the meta device before anything is allocated: values pruning cannot have
    made, tensors of other names, kinds or shapes than the layers' attributes give, calls that break the forward of
    one image of `input_size`, or an output of other than `classes` classes."""
    try:
        with torch.device("meta"):
            model = build()
    except (NotImplementedError, RuntimeError):  # an architecture that computes while it builds: built for real
        model = build()
    restore(model, structure)
    state = fitted(model, state)
    _dry_run(model, state, input_size, classes)
    assign(model, state)
    if not _on_meta(model):
        return model
    model = build()  # state a file does not hold (non-persistent buffers), computed as the model is built
    restore(model, structure)
    assign(model, state)
    return model


def restore(model: nn.Module, structure: Structure) -> None:
    """Set the recorded attributes on `model` (a fresh build) and install the recorded calls; ValueError for
    anything but what `record` writes of a pruned model of this architecture."""
    if not isinstance(structure.attributes, dict) or not isinstance(structure.calls, dict):
        raise ValueError("attributes and calls are not mappings")
    modules = dict(model.named_modules())
    for name, changed in structure.attributes.items():
        module = _module(modules, name)
        if not isinstance(changed, dict):
            raise ValueError(f"{name}: its attributes are not a mapping")
        for key, value in changed.items():
            built = vars(module).get(key) if isinstance(key, str) else None
            # Only what record writes: a plain attribute the module has as built (never a private one or a method).
            if not isinstance(key, str) or key.startswith("_") or key not in vars(module) or not is_plain(built):
                raise ValueError(f"{name}.{str(key)[:40]}: not a structural attribute of {type(module).__name__}")
            if not _prunable(value, built):
                raise ValueError(f"{name}.{key}: {shown(value)} is not what pruning makes of {built!r}")
            setattr(module, key, _typed(value, built))
    package = type(model).__module__.partition(".")[0]
    replacements = {}
    for name, calls in structure.calls.items():
        _module(modules, name)
        if not isinstance(calls, list) or not calls:
            raise ValueError(f"{name}: its calls are not a list of calls")
        replacements[name] = dict(_uncall(c, package) for c in calls)
    tracing.install(model, replacements)


def fitted(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of `state` as `model` (a build, its structure restored) holds them, in its dtypes; ValueError
    listing those that do not fit: other names than its tensors', another kind of dtype, another rank, a dimension
    larger than built (pruning only removes channels), or a layer's tensor of another shape than its attributes
    give."""
    ours = model.state_dict(keep_vars=True)
    problems = [f"missing {k}" for k in ours if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in ours]
    layers = {k: shape for name, m in model.named_modules() for k, shape in _layer_shapes(name, m).items()}
    for key in (k for k in state if k in ours):
        tensor, built = state[key], ours[key]
        expected = layers.get(key, tuple(built.shape))
        if not _same_kind(tensor.dtype, built.dtype):
            problems.append(f"{key}: {tensor.dtype} where the model has {built.dtype}")
        elif tensor.dim() != built.dim() or any(a > b for a, b in zip(tensor.shape, built.shape, strict=False)):
            problems.append(f"{key}: shape {tuple(tensor.shape)} where the model has at most {tuple(built.shape)}")
        elif key in layers and tuple(tensor.shape) != expected:
            problems.append(f"{key}: shape {tuple(tensor.shape)} where its structure gives {expected}")
    if problems:
        listed = "; ".join(problems[:8]) + (f"; … ({len(problems)} in all)" if len(problems) > 8 else "")
        raise ValueError(f"the tensors do not fit the architecture: {listed}")
    return {k: v.to(ours[k].dtype) for k, v in state.items()}


def assign(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Make the tensors of `state` (checked by `fitted`) the parameters and buffers of `model`, whatever their shapes
    (load_state_dict with assign=True still refuses new shapes)."""
    modules = dict(model.named_modules())
    for key, tensor in state.items():
        owner, _, name = key.rpartition(".")
        module = modules[owner]
        if name in module._parameters:
            old = module._parameters[name]
            module._parameters[name] = nn.Parameter(tensor, requires_grad=old is None or old.requires_grad)
        else:
            module._buffers[name] = tensor


def _module(modules: dict[str, nn.Module], name: object) -> nn.Module:
    """The module of a recorded name; ValueError for a name the architecture does not have."""
    module = modules.get(name) if isinstance(name, str) else None
    if module is None:
        raise ValueError(f"{str(name)[:80]}: no such module in the architecture")
    return module


def _prunable(value: Any, built: Any) -> bool:
    """Whether pruning can have made `value` of an attribute's built value: a count (an int) from 1 to the built one,
    a float as finite and from 0 to it, the same number of items in a list or tuple (recorded as a list) or the
    same keys in a dict, each of them so; anything else (a string, a flag, None, a number that is not positive)
    unchanged."""
    if isinstance(built, bool) or not isinstance(built, int | float | tuple | list | dict):
        return type(value) is type(built) and bool(value == built)
    if isinstance(built, int):
        return type(value) is int and (1 <= value <= built if built >= 1 else value == built)
    if isinstance(built, float):
        finite = type(value) in (int, float) and math.isfinite(value)
        return finite and (0 < value <= built if built > 0 else value == built)
    if isinstance(built, dict):
        same_keys = isinstance(value, dict) and value.keys() == built.keys()
        return same_keys and all(_prunable(value[k], built[k]) for k in built)
    return isinstance(value, list | tuple) and len(value) == len(built) and all(map(_prunable, value, built))


def shown(value: Any) -> str:
    """A value from a file as a refusal quotes it: cut short; a container of other than plain data a few levels deep
    by its size (it may be nested beyond what repr takes)."""
    if isinstance(value, list | tuple | dict) and not is_plain(value, depth=4):
        return f"a {type(value).__name__} of {len(value)}"
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _layer_shapes(name: str, module: nn.Module) -> dict[str, tuple[int, ...]]:
    """The shapes a standard layer's attributes give its tensors, by state key (none for other modules); ValueError
    for a conv whose channels its groups do not divide."""
    prefix = f"{name}." if name else ""
    if isinstance(module, nn.modules.conv._ConvNd):
        out, into, groups = module.out_channels, module.in_channels, module.groups
        if out % groups or into % groups:
            raise ValueError(f"{name}: {into} in and {out} out channels in {groups} groups")
        k = tuple(module.kernel_size)
        weight = (into, out // groups, *k) if module.transposed else (out, into // groups, *k)
        shapes = {"weight": weight, "bias": (out,)}
    elif isinstance(module, nn.Linear):
        shapes = {"weight": (module.out_features, module.in_features), "bias": (module.out_features,)}
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        n = (module.num_features,)
        shapes = {"weight": n, "bias": n, "running_mean": n, "running_var": n, "num_batches_tracked": ()}
    elif isinstance(module, nn.GroupNorm):
        shapes = {"weight": (module.num_channels,), "bias": (module.num_channels,)}
    elif isinstance(module, nn.LayerNorm):
        shapes = {"weight": tuple(module.normalized_shape), "bias": tuple(module.normalized_shape)}
    else:
        shapes = {}
    return {prefix + k: shape for k, shape in shapes.items()}


def _same_kind(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether tensors of dtype `a` take the place of `b` without losing what they mean: float for float, integer
    for integer, bool for bool."""
    return (a.is_floating_point, a.is_complex, a == torch.bool) == (b.is_floating_point, b.is_complex, b == torch.bool)


def _dry_run(model: nn.Module, state: dict[str, Tensor], input_size: int, classes: int) -> None:
    """Run one image through `model` built on the meta device, with tensors of the shapes of `state` (nothing
    allocated); ValueError where its structure breaks the forward or its output is not `classes` logits. (Built for
    real, it runs on uninitialized tensors of those shapes.)"""
    device = next(iter(model.state_dict().values()), torch.empty(0)).device
    assign(model, {k: torch.empty_like(v, device=device) for k, v in state.items()})
    training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, 3, input_size, input_size, device=device))
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"one image does not run through it: {type(e).__name__}: {first[:200]}") from None
    finally:
        model.train(training)
    if not isinstance(out, Tensor) or tuple(out.shape) != (1, classes):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"its output for one image is {shape}, not the logits of its {classes} classes")


def _on_meta(model: nn.Module) -> bool:
    """Whether any tensor of `model` (a parameter, a buffer or a plain attribute) has no data."""
    for module in model.modules():
        tensors = [*module._parameters.values(), *module._buffers.values(), *vars(module).values()]
        if any(isinstance(t, Tensor) and t.is_meta for t in tensors):
            return True
    return False


def _differs(value: Any, built: Any) -> bool:
    """Whether an attribute's value is not the built one (values other than plain data compare by type)."""
    if is_plain(value) and is_plain(built):
        return bool(value != built)
    return type(value) is not type(built) and (is_plain(value) or is_plain(built))


def is_plain(value: Any, *, finite: bool = False, depth: int = MAX_DEPTH) -> bool:
    """Numbers (`finite`: finite floats only), strings, None, and tuples, lists and str-keyed dicts of them, nested
    at most `depth` deep."""
    if isinstance(value, float):
        return not finite or math.isfinite(value)
    if isinstance(value, bool | int | str) or value is None:
        return True
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        value = list(value.values())
    items = isinstance(value, tuple | list) and depth > 0
    return items and all(is_plain(v, finite=finite, depth=depth - 1) for v in value)


def _plain(value: Any, where: str) -> Plain:
    """`value` as JSON data (tuples as lists), or ValueError naming `where`."""
    if not is_plain(value):
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


MAX_INT = 2**31 - 1  # a count or an index beyond this is no use and overflows torch's sizes
MAX_ITEMS = 65_536  # items of a recorded split, gather or index: more than any layer's channels
MAX_LINE = 1_000_000  # lines of a library's source file
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _uncall(call: Any, package: str) -> tuple[tracing.Site, tracing.Replacement]:
    """A replaced call read back, in a source file of `package` (the model's library); ValueError for one that is
    not one."""
    fields = {"file", "line", "count", "kind", "value"}
    if not (isinstance(call, dict) and call.keys() == fields and isinstance(call["file"], str)):
        raise ValueError(f"not a recorded call: {shown(call)}")
    kind, value, line, count = call["kind"], call["value"], call["line"], call["count"]
    if not (_count(line, MAX_LINE) and _count(count, MAX_INT)):
        raise ValueError(f"not a recorded call: line {shown(line)}, count {shown(count)}")
    replacement = _replacement(kind, value)
    if replacement is None:
        raise ValueError(f"not a recorded call: {shown(kind)} of {shown(value)}")
    return (_source_path(call["file"], package), line, count), replacement


def _replacement(kind: Any, value: Any) -> tracing.Replacement | None:
    """What replaces a recorded call of `kind`, if `value` is one that tracing makes: split sizes, a permutation to
    gather by, a channel count, a channel slice; None otherwise."""
    if not isinstance(kind, str):
        return None
    items = isinstance(value, list) and 1 <= len(value) <= MAX_ITEMS
    if kind == "Split" and items and all(_count(v, MAX_INT, lo=0) for v in value):
        return tracing.Split(tuple(value))
    if kind == "Gather" and items and all(type(v) is int for v in value) and sorted(value) == list(range(len(value))):
        return tracing.Gather(tuple(value))  # a permutation: no channel read twice
    if kind == "Shape" and _count(value, MAX_INT):
        return tracing.Shape(value)
    if kind == "Index" and items and len(value) <= 8:
        key = tuple(_unkey(k) for k in value)
        if len(key) >= 2 and key[0] == slice(None) and isinstance(key[1], slice):  # [:, a:b, …], as tracing makes
            return tracing.Index(key)
    return None


def _count(value: Any, hi: int, lo: int = 1) -> bool:
    """Whether `value` is an int from `lo` to `hi`."""
    return type(value) is int and lo <= value <= hi


def _key(k: Any) -> Plain:
    """One entry of an indexing key as JSON."""
    if isinstance(k, slice):
        return {"slice": [k.start, k.stop, k.step]}
    return "..." if k is Ellipsis else _plain(k, "an indexing key")


def _unkey(k: Any) -> Any:
    """One entry of an indexing key read back: None, Ellipsis, an int, or a slice of ints with a positive step;
    ValueError for anything else."""
    if k is None or _count(k, MAX_INT, lo=-MAX_INT):
        return k
    if isinstance(k, str) and k == "...":
        return Ellipsis
    bounds = k.get("slice") if isinstance(k, dict) and k.keys() == {"slice"} else None
    if isinstance(bounds, list) and len(bounds) == 3 and all(b is None or _count(b, MAX_INT, -MAX_INT) for b in bounds):
        start, stop, step = bounds
        if step is None or step >= 1:
            return slice(start, stop, step)
    raise ValueError(f"not a recorded call: an indexing key {shown(k)}")


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


def _source_path(recorded: str, package: str) -> str:
    """The installed file of a path recorded by _library_path, which must be a source file of `package` (the model's
    library, imported already): found by its path under the package's folder, nothing imported or run; ValueError
    for any other path (absolute, `..`, another package, a file the package does not have)."""
    parts = recorded.split("/")
    names = [*parts[:-1], parts[-1].removesuffix(".py")]
    root = getattr(sys.modules.get(package), "__file__", None)
    path = os.path.join(os.path.dirname(os.path.dirname(str(root))), *parts)
    if (
        parts[0] != package
        or not parts[-1].endswith(".py")
        or not all(_NAME.fullmatch(n) for n in names)
        or len(parts) > 16
        or root is None
        or not os.path.isfile(path)
    ):
        raise ValueError(f"{recorded[:80]!r}: a recorded call outside the source files of {package}")
    return path
