"""The ResNet-56 configurations that the speed benchmarks measure side by side: name -> sparsity and rounding."""

from __future__ import annotations

from typing import NamedTuple

from chipprune.pruning.sparsity import widths


class Config(NamedTuple):
    """A sparsity (a preset or a rate list; None: dense) and the multiple its widths are rounded to (None: floor)."""

    sparsity: str | None = None
    round_to: int | None = None

    def widths(self) -> dict[str, int] | None:
        """Per-conv widths of this configuration (None: dense)."""
        return None if self.sparsity is None else widths("resnet56", self.sparsity, self.round_to)


CONFIGS = {
    "dense": Config(),
    "paper-1": Config("paper-1"),  # widths 9, 13, 19, 27, 38: 65.2 M FLOPs
    "paper-1 round-to 8": Config("paper-1", 8),  # 62.9 M
    "paper-1 round-to 16": Config("paper-1", 16),  # 84.2 M
    "inner 8/16/32": Config("[0.]*3+[0.5]*27"),  # stage outputs kept, inner convs halved: 63.0 M
    "inner 16/16/16": Config("[0.]*12+[0.5]*9+[0.75]*9"),  # 73.9 M
    "paper-2": Config("paper-2"),  # 34.2 M
}


def configs(names: str) -> list[str]:
    """The comma-separated configuration names, dense first (the yardstick of every ratio), checked."""
    wanted = names.split(",")
    unknown = [n for n in wanted if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration {unknown[0]!r}; known: {', '.join(CONFIGS)}")
    return ["dense", *[n for n in wanted if n != "dense"]]
