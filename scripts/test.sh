#!/usr/bin/env bash
# The project's test command (README, .ci/run): set up, start services, install the test browser,
# lint, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/services.sh
scripts/browser.sh
.venv/bin/ruff check gatt workers service app migrations tests bench clients scripts
.venv/bin/python -m pytest "$@"
