#!/usr/bin/env bash
# Install chipprune, then run the main job: prune the public CIFAR-10 ResNet-56 with CHIP at the paper's first
# configuration and evaluate it before and after, on the JPEG CIFAR-10 in ../shared (override with CHIP_SHARED).
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${CHIP_SHARED:-../shared}
out=${CHIP_RUN_DIR:-runs/quickstart}

python -m pip install -q -c constraints.txt -e ".[dev]"

chip import --arch resnet56 --weights "$shared/weights/resnet56-4bfd9763.th" --normalize imagenet --out "$out/resnet56.pt"
chip prune "$out/resnet56.pt" --data "$shared/data" --sparsity paper-1 --criterion chip --out "$out/resnet56-chip-paper1.pt"
chip eval "$out/resnet56.pt" --data "$shared/data"
chip eval "$out/resnet56-chip-paper1.pt" --data "$shared/data"
