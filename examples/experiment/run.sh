#!/usr/bin/env bash
# One command for the experiment in docs/experiment.md: GAtt job, then adherence of the base model
# and of the checkpoint on held-out dialogues with held-out instructions.
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/setup.sh >/dev/null
start=$(date +%s)
rm -rf var/experiment
.venv/bin/python -m workers.run examples/experiment/job.yaml
trained=$(date +%s)
checkpoint=$(.venv/bin/python -c "import json; print(json.load(open('var/experiment/job/summary.json'))['final_checkpoint'])")
.venv/bin/python -m workers.evaluate --model default --checkpoint "$checkpoint" \
  --heldout examples/heldout.jsonl --dialogues "${DIALOGUES:-12}" --turns "${TURNS:-6}" \
  --instructions examples/experiment/heldout_instructions.json --max-new-tokens 32 --attention \
  --train-corpus examples/dialogues.jsonl --train-instructions var/experiment/job/instructions.jsonl \
  --out var/experiment/eval
end=$(date +%s)
echo "wall time: job $((trained - start)) s, evaluation $((end - trained)) s"
