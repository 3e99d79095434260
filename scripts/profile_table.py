"""Prints the table of docs/configurations.md: every paper preset, profiled by `chip profile --json`."""

import json
import subprocess

from chipprune.models import ARCHS

print("| arch | preset | sparsity | params | FLOPs | params ↓ | FLOPs ↓ |")
print("|---|---|---|---|---|---|---|")
for arch in ("resnet56", "resnet110", "vgg16_bn", "resnet50"):
    for preset in ("dense", *ARCHS[arch].presets):
        extra = [] if preset == "dense" else ["--sparsity", preset]
        r = json.loads(
            subprocess.run(
                ["chip", "profile", "--arch", arch, *extra, "--json"], check=True, capture_output=True, text=True
            ).stdout
        )
        print(
            f"| {arch} | {preset} | `{r.get('sparsity', '—')}` | {r['params']} | {r['flops']} "
            f"| {100 * r['params_reduction']:.1f}% | {100 * r['flops_reduction']:.1f}% |"
        )
