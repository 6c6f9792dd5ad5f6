#!/usr/bin/env bash
# The README's test command: set up .venv and Mosquitto, lint, type-check, and
# run the whole test suite against a real broker, real SQLite and real runtimes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev --require-mosquitto
echo "== ruff" >&2
.venv/bin/ruff check .
echo "== mypy" >&2
.venv/bin/mypy
echo "== pytest" >&2
.venv/bin/pytest -p no:cacheprovider "$@"
