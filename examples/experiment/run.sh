#!/usr/bin/env bash
# One command for the experiment in docs/experiment.md: a GAtt job, then adherence of the base model
# and of the checkpoint on held-out dialogues with held-out instructions, under the instruction
# given once, on every turn, never, and the same with the corpus's own replies as history.
#   MODE=all|last (data.sample_turns)   SEED=0 (the job's seed; the evaluation stays the same)
#   FAMILY=emoji (examples/experiment/<FAMILY>_train.json and <FAMILY>_heldout.json)
#   HISTORY=corpus|sampled|both (data.train_history: what each sampled reply is trained after)
#   SETS="--set reward.max_echo=0.5 ..." (more job overrides; say them where the run is documented)
#   CONDITIONS=none,once (fewer conditions, faster; all runs share one random stream, so the base
#     model's replies then differ from a five-condition evaluation's)
#   ROUNDS=1 (rounds.count; with more, each round's model is evaluated into eval-round-<r>, the
#     base model once, in the first evaluation: examples/experiment/rounds.sh)
#   EVAL_ROUNDS="2 3" (the rounds evaluated; default: every round)
#   SAMPLES_FROM=var/experiment/<earlier run> (train on that run's round-1 samples instead of
#     sampling again, to compare training settings on the very same candidates; the job refuses
#     them unless every setting they depend on is this run's: samples-settings.json). Or a folder
#     holding samples.jsonl and samples-settings.json alone: examples/experiment/samples-seed-0
#     is the round-1 samples of job.yaml's recipe, seed 0 (2026-12-01, session 17). Later
#     rounds' samples under rounds/<r>/ are taken too (drawn by the models of a run with the same
#     settings, so a deterministic rerun of the earlier rounds' training makes those models again)
#   BASE=var/experiment/<earlier run>/eval (reuse that run's base-model evaluation: the base model's
#     replies do not depend on the job, and they are half the evaluation's time; refused unless it
#     was run with the same evaluation settings). BASE=examples/experiment/base-eval.json is the
#     base model's report under the default settings (made 2026-12-01 by run.sh at commit 0cf2bbf,
#     before the evaluation ran chunk by chunk: the same runs, other draws; make it again after a
#     change to what is sampled, the verifiers or the evaluation's measures).
#     BASE=examples/experiment/base-eval-none-once.json: the same with CONDITIONS=none,once,
#     made 2026-12-02 (session 21) at commit b18b1e8, in chunk order
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/setup.sh >/dev/null
MODE=${MODE:-all}
SEED=${SEED:-0}
HISTORY=${HISTORY:-corpus}
FAMILY=${FAMILY:-emoji}
OUT=${OUT:-var/experiment/$FAMILY-$MODE-$HISTORY-$SEED}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
start=$(date +%s)
rm -rf "$OUT"
mkdir -p "$OUT"
# The training corpus: the 48 bundled dialogues and 160 more (examples/train_large.jsonl); no
# user turn is shared with the held-out dialogues (the evaluation checks and reports it).
cat examples/dialogues.jsonl examples/train_large.jsonl > "$OUT/corpus.jsonl"
if [ -n "${SAMPLES_FROM:-}" ]; then
  from=$SAMPLES_FROM/job
  [ -f "$SAMPLES_FROM/samples.jsonl" ] && from=$SAMPLES_FROM  # a folder of samples alone
  mkdir -p "$OUT/job"
  cp "$from/samples.jsonl" "$from/samples-settings.json" "$OUT/job/"
  # Later rounds' samples too where there are (rounds/<r>/): the job then only trains those
  # rounds, and their settings must match this run's, training included.
  for r in $(seq 2 "${ROUNDS:-1}"); do
    if [ -f "$from/rounds/$r/samples.jsonl" ]; then
      mkdir -p "$OUT/job/rounds/$r"
      cp "$from/rounds/$r/samples.jsonl" "$from/rounds/$r/samples-settings.json" "$OUT/job/rounds/$r/"
    fi
  done
fi
.venv/bin/python -m workers.run examples/experiment/job.yaml --set "seed=$SEED" --set "output_dir=$OUT/job" \
  --set "data.corpus=$OUT/corpus.jsonl" --set "data.instructions=examples/experiment/${FAMILY}_train.json" \
  --set "data.sample_turns=$MODE" --set "data.train_history=$HISTORY" --set "rounds.count=${ROUNDS:-1}" ${SETS:-}
trained=$(date +%s)
evaluate() {  # evaluate CHECKPOINT OUT_DIR, with the base model's report from $base when set
  .venv/bin/python -m workers.evaluate --model default --checkpoint "$1" \
    --heldout examples/heldout.jsonl --dialogues "${DIALOGUES:-64}" --turns "${TURNS:-8}" \
    --instructions-per-dialogue "${PER_DIALOGUE:-1}" --instructions "examples/experiment/${FAMILY}_heldout.json" \
    --conditions "${CONDITIONS:-none,once,every_turn,once_fixed,every_turn_fixed}" \
    --max-new-tokens 24 --temperature 0.7 --batch-prompts 32 --threads "$OMP_NUM_THREADS" \
    --train-corpus "$OUT/corpus.jsonl" --train-instructions "$OUT/job/instructions.jsonl" \
    ${base:+--base-from "$base"} --out "$2"
}
base=${BASE:-}
if [ "${ROUNDS:-1}" = 1 ]; then
  evaluate "$(.venv/bin/python -c "import json; print(json.load(open('$OUT/job/summary.json'))['final_checkpoint'])")" "$OUT/eval"
else
  for r in ${EVAL_ROUNDS:-$(seq 1 "$ROUNDS")}; do
    if [ "$r" = 1 ]; then dir="$OUT/job"; else dir="$OUT/job/rounds/$r"; fi
    # The round's model: the last checkpoint its training wrote (steps are numbered across rounds).
    checkpoint=$(find "$dir/train/checkpoints" -maxdepth 1 -name 'step-*' | sort | tail -1)
    [ -n "$checkpoint" ] || { echo "round $r wrote no checkpoint under $dir" >&2; exit 1; }
    evaluate "$checkpoint" "$OUT/eval-round-$r"
    base=${base:-$OUT/eval-round-$r}
  done
fi
end=$(date +%s)
echo "wall time: job $((trained - start)) s, evaluation $((end - trained)) s"
