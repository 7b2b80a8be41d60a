#!/usr/bin/env bash
# The article's DPO question on the experiment's recipe (docs/experiment.md, "Objectives and
# rounds"): SFT+DPO, SFT alone and DPO alone trained on the very same round-1 samples, so their
# sampling cost is equal and they differ in training alone, each evaluated by run.sh's held-out
# protocol, then one table of the three.
#   SEED=0 FAMILY=emoji HISTORY=corpus (as run.sh)
#   FROM=<a run of run.sh with job.yaml's sft+dpo recipe and this seed> (its samples, and its
#     evaluation where it has one; default: run it first, into var/experiment/objectives-sft+dpo-$SEED)
#     or a folder of samples alone: examples/experiment/samples-seed-0 is seed 0's
#   OBJECTIVES="sft dpo" (those trained on FROM's samples)
#   SETS="--set training.dpo.rejected=worst" TAG=worst (more job overrides for those objectives,
#     and a tag for their folders: var/experiment/objectives-<objective>-<TAG>-<SEED>)
#   BASE=examples/experiment/base-eval.json (the base model's report; see run.sh)
# On 2 cores, alone: the sft+dpo run about 80-130 minutes (job 43-65, the trained model's half of
# the evaluation 38-62), each other objective its training and that half of the evaluation (SFT
# alone on samples-seed-0: 18 + 40 minutes, DPO alone 16 + 45).
set -euo pipefail
cd "$(dirname "$0")/../.."
export SEED=${SEED:-0} FAMILY=${FAMILY:-emoji} HISTORY=${HISTORY:-corpus}
export BASE=${BASE:-examples/experiment/base-eval.json}
FROM=${FROM:-}
if [ -z "$FROM" ]; then
  FROM=var/experiment/objectives-sft+dpo-$SEED
  SETS= OUT=$FROM examples/experiment/run.sh  # the recipe as job.yaml has it
fi
evals=()
[ -f "$FROM/eval/adherence.json" ] && evals+=("$FROM/eval")
for objective in ${OBJECTIVES:-sft dpo}; do
  out=var/experiment/objectives-$objective${TAG:+-$TAG}-$SEED
  # DPO alone trains on preference pairs only: a replayed corpus dialogue has no rejected reply.
  sets="${SETS:-} --set training.objective=$objective"
  [ "$objective" = dpo ] && sets="$sets --set data.replay=0"
  OUT=$out SAMPLES_FROM=$FROM SETS="$sets" examples/experiment/run.sh
  evals+=("$out/eval")
done
.venv/bin/python examples/experiment/summary.py "${evals[@]}"
