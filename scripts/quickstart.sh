#!/usr/bin/env bash
# Install chipprune, then run the main job on the JPEG CIFAR-10 in ../shared (override with CHIP_SHARED): prune the
# public CIFAR-10 ResNet-56 with CHIP at the paper's first configuration, recover it with a short fine-tune distilled
# from the dense model (one epoch over 10,000 training images), and print the three top-1s side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${CHIP_SHARED:-../shared}
out=${CHIP_RUN_DIR:-runs/quickstart}

python -m pip install -q -c constraints.txt -e ".[dev]"

chip import --arch resnet56 --weights "$shared/weights/resnet56-4bfd9763.th" --normalize imagenet --out "$out/resnet56.pt"
chip prune "$out/resnet56.pt" --data "$shared/data" --sparsity paper-1 --criterion chip --out "$out/resnet56-chip-paper1.pt"
rm -rf "$out/recovered"  # a run folder of an earlier quickstart: start the fine-tune afresh
chip finetune "$out/resnet56-chip-paper1.pt" --data "$shared/data" --teacher parent --epochs 1 --train-subset 10000 \
    --warmup-epochs 0 --out-dir "$out/recovered"
for model in resnet56 resnet56-chip-paper1 recovered/last; do
    chip eval "$out/$model.pt" --data "$shared/data" --json > "$out/$model-eval.json"
    chip profile "$out/$model.pt" --json > "$out/$model-profile.json"
done
python - "$out" <<'EOF'
import json, sys
out = sys.argv[1]
rows = [("dense ResNet-56 (public weights)", "resnet56"), ("CHIP paper-1, right after pruning", "resnet56-chip-paper1"),
        ("CHIP paper-1, after 1 distilled epoch of 10,000 images", "recovered/last")]
print(f"\n{'model':56} {'top-1':>7} {'FLOPs':>8}   (JPEG CIFAR-10 test split, 10,000 images)")
for label, name in rows:
    top1 = json.load(open(f"{out}/{name}-eval.json"))["top1"]
    flops = json.load(open(f"{out}/{name}-profile.json"))["flops"]
    print(f"{label:56} {top1:6.2f}% {flops / 1e6:6.1f} M")
EOF
