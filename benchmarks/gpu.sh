#!/usr/bin/env bash
# Every GPU measurement the project still owes, in one call of at most about 8 minutes on one GPU:
#
#   bash benchmarks/gpu.sh OUTDIR [--data DIR] [--weights FILE] [--epochs E] [--dry-run]
#
# 1. ci_speed: channel independence on CUDA, per layer shape and for whole networks (ResNet-50 at N = 640);
# 2. train_speed: training throughput against the plain fp32 loop (target: >= 5x on the dense ResNet-56, batch 256);
# 3. latency: CUDA latency of the dense and pruned ResNet-56s;
# 4. fine-tune: the public ResNet-56 pruned to paper-1 by CHIP and by L1, each distilled from it for E epochs
#    (default 30), side by side.
# Each step's output lands in OUTDIR (NAME.txt, JSON, the runs' metrics.jsonl and curves.png), with one line per
# step in OUTDIR/steps.jsonl (command, exit code, seconds). A failed step does not stop the others; the exit code
# is then 1. --dry-run runs the same steps at toy sizes on the CPU (tests/test_benchmarks.py runs it).
# --data and --weights default to the JPEG CIFAR-10 and the public ResNet-56 weights in ../shared (CHIP_SHARED).
set -euo pipefail
if (($# < 1)) || [[ $1 == -* ]]; then
    echo "usage: bash benchmarks/gpu.sh OUTDIR [--data DIR] [--weights FILE] [--epochs E] [--dry-run]" >&2
    exit 2
fi
out=$1
shift
shared=${CHIP_SHARED:-../shared}
data=$shared/data
weights=$shared/weights/resnet56-4bfd9763.th
epochs=30
dry=0
while (($#)); do
    case $1 in
        --data) data=$2; shift 2 ;;
        --weights) weights=$2; shift 2 ;;
        --epochs) epochs=$2; shift 2 ;;
        --dry-run) dry=1; shift ;;
        *) echo "gpu.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
: > "$out/steps.jsonl"

if ((dry)); then
    device=cpu
    ci=(--toy)
    train=(--steps 1 --batch-size 16 --configs dense --teacher-configs dense --device cpu)
    latency=(--repeats 1 --configs dense)
    finetune=(--epochs 1 --train-subset 64 --batch-size 32 --workers 0)
else
    device=cuda
    ci=(--cuda-only --quick)
    train=(--steps 50 --configs "dense,paper-1,paper-1 round-to 8,paper-1 round-to 16" --device cuda)
    latency=(--repeats 30)
    finetune=(--epochs "$epochs" --workers 8)
fi

failed=0
step() {  # NAME COMMAND...: run it, its output in OUTDIR/NAME.txt, a line in OUTDIR/steps.jsonl
    local name=$1 rc=0 start end
    shift
    start=$(date +%s.%N)
    echo "== $name: $*" >&2
    "$@" > "$out/$name.txt" 2>&1 || rc=$?
    end=$(date +%s.%N)
    python -c 'import json, sys; a = sys.argv; print(json.dumps({"step": a[1], "command": a[2:-3], "rc": int(a[-3]),
        "seconds": round(float(a[-1]) - float(a[-2]), 2)}))' "$name" "$@" "$rc" "$start" "$end" >> "$out/steps.jsonl"
    if ((rc)); then
        echo "== $name failed ($rc); see $out/$name.txt" >&2
        failed=1
    fi
}

step ci_speed python "$here/ci_speed.py" "${ci[@]}"
step train_speed python "$here/train_speed.py" "${train[@]}" --json "$out/train_speed.json"
step latency python "$here/latency.py" "${latency[@]}" --json "$out/latency.json"
step import chip import --arch resnet56 --weights "$weights" --out "$out/resnet56.pt"
for criterion in chip l1; do
    step "prune-$criterion" chip prune "$out/resnet56.pt" --data "$data" --sparsity paper-1 --criterion "$criterion" \
        --device "$device" --out "$out/paper1-$criterion.pt" --json
    rm -rf "$out/finetune-$criterion"
    step "finetune-$criterion" chip finetune "$out/paper1-$criterion.pt" --data "$data" --teacher parent \
        --device "$device" --out-dir "$out/finetune-$criterion" "${finetune[@]}"
done
exit "$failed"
