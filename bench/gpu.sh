#!/usr/bin/env bash
# The GPU benchmarks in one run (docs/benchmarks.md, "GPU"): what a device session executes.
# Needs torch and transformers only; each step has its own time limit so that one slow step
# (a compilation) cannot take the others' results with it. Results go to ${OUT:-var/gpu}.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-var/gpu}
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)"
} > "$out/machine.txt" 2>&1
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s" >> "$out/steps.txt"
}
steps=${STEPS:-training training-compiled training-flex training-flex-compiled engine-padded engine-packed engine-tokens engine-tokens-32k engine-tokens-2k liger sampling sampling-32}
for name in $steps; do
  case $name in
    training) step training 120 python bench/gpu_training.py ;;
    training-compiled) step training-compiled 120 python bench/gpu_training.py --compile --modes packed ;;
    training-flex) step training-flex 120 python bench/gpu_training.py --attn flex_attention --modes packed ;;
    training-flex-compiled) step training-flex-compiled 150 python bench/gpu_training.py --attn flex_attention --compile --modes packed ;;
    # The job's own training stage, train(): as the CPU lays out micro-batches, and as a GPU job does.
    engine-padded) step engine-padded 150 python bench/gpu_training.py --engine --modes padded ;;
    engine-packed) step engine-packed 240 env TORCH_LOGS=recompiles python bench/gpu_training.py --engine --modes packed --compile ;;
    # The same with micro_batch_tokens: every micro-batch in the same rows, one compiled shape.
    engine-tokens) step engine-tokens 150 env TORCH_LOGS=recompiles python bench/gpu_training.py --engine --modes tokens --compile ;;
    engine-tokens-32k) step engine-tokens-32k 150 python bench/gpu_training.py --engine --modes tokens --compile --tokens-per-step 32768 ;;
    engine-tokens-2k) step engine-tokens-2k 150 python bench/gpu_training.py --engine --modes tokens --compile --row-tokens 2048 ;;
    # Liger's fused linear cross-entropy against ours (needs liger-kernel: see docs/benchmarks.md).
    liger) step liger 200 python bench/gpu_training.py --attn flex_attention --compile --modes packed --losses summed,liger ;;
    sampling) step sampling 330 python bench/sampling.py --size 1b --lengths 512,1024 ;;
    sampling-32) step sampling-32 240 python bench/sampling.py --size 1b --lengths 1024 --prompts 32 ;;
  esac
done
cat "$out/machine.txt" "$out/steps.txt"
for name in $steps; do echo "== $name"; grep -v -i warn "$out/$name.txt" | tail -n 12; done
