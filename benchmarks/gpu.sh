#!/usr/bin/env bash
# Every GPU measurement the project still owes, in one call of a few minutes on one GPU, the most important first:
#
#   bash benchmarks/gpu.sh OUTDIR [--data DIR] [--epochs E] [--parallel N] [--dry-run]
#
# 1. recovery: the recovery study's long schedule (experiments/recovery.py --studies gpu): the committed parent
#    (results/recovery/parent.safetensors) fine-tuned as the control, and pruned to paper-1 by CHIP and by L1 with
#    seeds 0 and 1, each distilled from it for E epochs (default 30), N runs side by side on the GPU (default 5);
#    its log is OUTDIR/recovery/runs.jsonl, its models and run folders OUTDIR/runs/;
# 2. train_speed: training throughput against the plain fp32 loop (target: >= 5x on the dense ResNet-56, batch 256);
# 3. latency: CUDA latency of the dense and pruned ResNet-56s;
# 4. ci_speed: channel independence on CUDA, per layer shape and for whole networks (ResNet-50 at N = 640);
# 5. same_batches: the test that the in-memory batches on the GPU are the CPU's for the same seed.
# Each step's output lands in OUTDIR (NAME.txt, JSON), with one line per step in OUTDIR/steps.jsonl (command, exit
# code, seconds). A failed step does not stop the others; the exit code is then 1. --dry-run runs the same steps at
# toy sizes on the CPU (tests/test_benchmarks.py runs it). --data defaults to the JPEG CIFAR-10 in ../shared
# (CHIP_SHARED).
set -euo pipefail
if (($# < 1)) || [[ $1 == -* ]]; then
    echo "usage: bash benchmarks/gpu.sh OUTDIR [--data DIR] [--epochs E] [--parallel N] [--dry-run]" >&2
    exit 2
fi
out=$1
shift
data=${CHIP_SHARED:-../shared}/data
epochs=30
parallel=5
dry=0
while (($#)); do
    case $1 in
        --data) data=$2; shift 2 ;;
        --epochs) epochs=$2; shift 2 ;;
        --parallel) parallel=$2; shift 2 ;;
        --dry-run) dry=1; shift ;;
        *) echo "gpu.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
: > "$out/steps.jsonl"

if ((dry)); then
    device=cpu
    recovery=(--epochs 1 --parallel 2 --batch-size 32 --train-subset 64)
    train=(--steps 1 --batch-size 16 --configs dense --teacher-configs dense --device cpu)
    latency=(--repeats 1 --configs dense)
    ci=(--toy)
else
    device=cuda
    recovery=(--epochs "$epochs" --parallel "$parallel")
    train=(--steps 50 --configs "dense,paper-1,paper-1 round-to 8,paper-1 round-to 16" --device cuda)
    latency=(--repeats 30)
    ci=(--cuda-only --quick)
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

step recovery python "$here/../experiments/recovery.py" run --studies gpu --device "$device" --data "$data" \
    --out "$out/recovery" --runs "$out/runs" "${recovery[@]}"
step train_speed python "$here/train_speed.py" "${train[@]}" --json "$out/train_speed.json"
step latency python "$here/latency.py" "${latency[@]}" --json "$out/latency.json"
step ci_speed python "$here/ci_speed.py" "${ci[@]}"
step same_batches python -m pytest -q "$here/../tests/test_data.py" -k same_batches
exit "$failed"
