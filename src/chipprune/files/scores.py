"""The scores file of `chip score`: JSON holding the per-channel scores of every prunable conv of one model (a
registry architecture, for --sparsity), or the importance of every channel class of every dependency group (`of`
"groups": a library model, for --flops-target and --ratio), keyed by the group's root layer.

`chip prune --scores` reads it back as untrusted input: a regular file of bounded size (never a FIFO or a device),
JSON without NaN, Infinity or numbers beyond float64, nesting within bounds, the model's architecture, every conv of
the model with one finite number per channel. Anything else is a ScoresError of one line naming the file."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Literal

import torch
from torch import Tensor

from ..criteria import CRITERIA
from .fileio import read_file, reason, save_json

FORMAT = "chipprune-scores/1"
MAX_BYTES = 16 << 20  # ResNet-50's scores take about 0.5 MB
PROVENANCE = {"criterion": str, "images": int, "seed": int, "processes": int}  # what made the scores


class ScoresError(ValueError):
    """A scores file that cannot be used for this model (the message is one line naming the file)."""


Of = Literal["convs", "groups"]  # what a file's `layers` are: conv outputs, or dependency groups by their root layer


def write_scores(
    path: str | os.PathLike, arch: str, provenance: dict[str, Any], scores: dict[str, Tensor], of: str = "convs"
) -> None:
    """Save the scores of every conv (or group), with the architecture and their provenance."""
    layers = {name: s.tolist() for name, s in scores.items()}
    save_json({"format": FORMAT, "arch": arch, **provenance, "of": of, "layers": layers}, path)


def read_scores(
    path: str | os.PathLike, arch: str, widths: dict[str, int] | None, of: str = "convs"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The float64 scores of every conv of `widths` (conv -> channels; None: every entry of the file) from a file
    written for `arch` with `of` entries, and their provenance (criterion, and images, seed, processes where
    given)."""
    raw = read_file(path, limit=MAX_BYTES, what="scores file", error=ScoresError)
    try:
        d = json.loads(raw, parse_constant=_not_finite, parse_float=_finite, parse_int=_integer)
    except RecursionError:
        raise ScoresError(f"{path}: cannot read scores JSON (nested too deeply)") from None
    except ValueError as e:  # not JSON, not UTF-8, or a number that is not a finite float64
        raise ScoresError(f"{path}: cannot read scores JSON ({reason(e)})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ScoresError(f"{path}: not a scores file written by `chip score`")
    if not isinstance(d.get("arch", arch), str):
        raise ScoresError(f"{path}: damaged scores file: invalid 'arch'")
    if d.get("arch", arch) != arch:
        raise ScoresError(f"{path}: scores of a {_short(d['arch'])} model, not of this {arch}")
    if d.get("of", "convs") != of:
        raise ScoresError(
            f"{path}: scores of {_short(d['of'])}, not of the {of} this needs "
            "(a registry architecture's convs are for --sparsity, a library model's groups for --flops-target)"
        )
    provenance = {k: d[k] for k in PROVENANCE if k in d}
    bad = [k for k, v in provenance.items() if type(v) is not PROVENANCE[k] or (isinstance(v, int) and v < 0)]
    if "criterion" not in provenance or (not bad and provenance["criterion"] not in CRITERIA):
        bad.insert(0, "criterion")
    if bad:
        raise ScoresError(f"{path}: damaged scores file: invalid {bad[0]!r}")
    layers = d.get("layers")
    if not isinstance(layers, dict):
        raise ScoresError(f"{path}: damaged scores file: 'layers' is not a mapping of conv names to scores")
    if widths is None:
        widths = {name: len(v) if isinstance(v, list) else -1 for name, v in layers.items()}
    for conv, c in widths.items():
        values = layers.get(conv)
        if not isinstance(values, list) or len(values) != c:
            raise ScoresError(f"{path}: no scores for the {c} channels of {conv}; were they made for another model?")
        odd = [v for v in values if type(v) not in (int, float)]
        if odd:
            raise ScoresError(f"{path}: the scores of {conv} hold {_short(odd[0])}: expected numbers")
    return {conv: torch.tensor(layers[conv], dtype=torch.float64) for conv in widths}, provenance


def _finite(text: str) -> float:
    """A JSON number as a float, refused unless finite (1e400 would read as inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {_short(text)} is beyond float64")
    return value


def _integer(text: str) -> int | float:
    """A JSON integer: an int where float64 holds it exactly enough, else a finite float."""
    return int(text) if len(text) <= 18 else _finite(text)


def _not_finite(text: str) -> float:
    raise ValueError(f"{text} is not a score: expected finite numbers")


def _short(value: object) -> str:
    """A value for a message: its repr, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
