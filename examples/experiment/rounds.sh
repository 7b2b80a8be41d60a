#!/usr/bin/env bash
# The comparison the source article leaves open (docs/experiment.md, "Objectives and rounds"): one
# training objective per run, a job of ROUNDS rounds (each round samples with the model the round
# before trained), then every round's model on the held-out protocol of run.sh. Objectives sample
# the same turns with the same seed, so runs of one seed cost the same sampling.
#   OBJECTIVE=sft|dpo|sft+dpo   ROUNDS=3   SEED=0   FAMILY=emoji   HISTORY=corpus
#   SETS="--set ..." (job overrides; default: run J's recipe, reward.max_echo 0.5 and one replayed
#     corpus dialogue per example, which objective dpo cannot train and so does not get)
#   CONDITIONS=none,once (default; all five as run.sh with CONDITIONS=none,once,every_turn,...)
#   BASE=<an earlier evaluation's folder> (its base-model report, same settings only; default: the
#     first round's evaluation runs the base model once and the later rounds reuse it)
#   DIALOGUES=64 TURNS=8 (the held-out evaluation's size)
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/setup.sh >/dev/null
OBJECTIVE=${OBJECTIVE:-sft}
ROUNDS=${ROUNDS:-3}
SEED=${SEED:-0}
FAMILY=${FAMILY:-emoji}
HISTORY=${HISTORY:-corpus}
CONDITIONS=${CONDITIONS:-none,once}
if [ "$OBJECTIVE" = dpo ]; then
  SETS=${SETS:-"--set reward.max_echo=0.5"}
else
  SETS=${SETS:-"--set reward.max_echo=0.5 --set data.replay=1"}
fi
OUT=${OUT:-var/experiment/rounds-$OBJECTIVE-$SEED}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
start=$(date +%s)
rm -rf "$OUT"
mkdir -p "$OUT"
cat examples/dialogues.jsonl examples/train_large.jsonl > "$OUT/corpus.jsonl"
# shellcheck disable=SC2086  # SETS is a list of arguments
.venv/bin/python -m workers.run examples/experiment/job.yaml --set "seed=$SEED" --set "output_dir=$OUT/job" \
  --set "data.corpus=$OUT/corpus.jsonl" --set "data.instructions=examples/experiment/${FAMILY}_train.json" \
  --set "data.train_history=$HISTORY" --set "training.objective=$OBJECTIVE" --set "rounds.count=$ROUNDS" $SETS
trained=$(date +%s)
base=${BASE:-}
for r in $(seq 1 "$ROUNDS"); do
  if [ "$r" = 1 ]; then dir="$OUT/job"; else dir="$OUT/job/rounds/$r"; fi
  # The round's model: the last checkpoint its training wrote (steps are numbered across rounds).
  checkpoint=$(find "$dir/train/checkpoints" -maxdepth 1 -name 'step-*' | sort | tail -1)
  [ -n "$checkpoint" ] || { echo "round $r wrote no checkpoint under $dir" >&2; exit 1; }
  .venv/bin/python -m workers.evaluate --model default --checkpoint "$checkpoint" \
    --heldout examples/heldout.jsonl --dialogues "${DIALOGUES:-64}" --turns "${TURNS:-8}" \
    --instructions "examples/experiment/${FAMILY}_heldout.json" --conditions "$CONDITIONS" \
    --max-new-tokens 24 --temperature 0.7 --batch-prompts 32 --threads "$OMP_NUM_THREADS" \
    --train-corpus "$OUT/corpus.jsonl" --train-instructions "$OUT/job/instructions.jsonl" \
    ${base:+--base-from "$base"} --out "$OUT/eval-round-$r"
  base=${base:-$OUT/eval-round-1}
done
end=$(date +%s)
echo "wall time: job $((trained - start)) s, evaluations $((end - trained)) s"
