#!/usr/bin/env bash
# The comparison the source article leaves open (docs/experiment.md, "Objectives and rounds"): one
# training objective per run, a job of ROUNDS rounds (each round samples with the model the round
# before trained), then every round's model on the held-out protocol of run.sh. Objectives sample
# the same turns with the same seed, so runs of one seed cost the same sampling.
#   OBJECTIVE=sft+dpo|sft|dpo   ROUNDS=3   SEED=0   FAMILY=emoji   HISTORY=corpus
#   SETS="--set ..." (more job overrides; job.yaml holds the recipe, whose replayed corpus
#     dialogues objective dpo cannot train, so it runs with data.replay 0)
#   CONDITIONS=none,once (default; all five as run.sh with CONDITIONS=none,once,every_turn,...)
#   SAMPLES_FROM=<an earlier run of another objective, same seed> (its round-1 samples: the
#     objectives then differ in training alone; later rounds sample with their own models)
#   BASE=<an earlier evaluation's folder> (its base-model report, same settings only; default: the
#     first round's evaluation runs the base model once and the later rounds reuse it)
#   DIALOGUES=64 TURNS=8 (the held-out evaluation's size)
set -euo pipefail
cd "$(dirname "$0")/../.."
OBJECTIVE=${OBJECTIVE:-sft+dpo}
ROUNDS=${ROUNDS:-3}
SEED=${SEED:-0}
FAMILY=${FAMILY:-emoji}
HISTORY=${HISTORY:-corpus}
CONDITIONS=${CONDITIONS:-none,once}
SETS=${SETS:-}
if [ "$OBJECTIVE" = dpo ]; then
  SETS="--set data.replay=0 $SETS"
fi
# run.sh with rounds: the same job and evaluation, each round's model evaluated.
OUT=${OUT:-var/experiment/rounds-$OBJECTIVE-$SEED} ROUNDS=$ROUNDS SEED=$SEED FAMILY=$FAMILY HISTORY=$HISTORY \
  CONDITIONS=$CONDITIONS SETS="$SETS --set training.objective=$OBJECTIVE" exec examples/experiment/run.sh
