#!/usr/bin/env bash
# The README's demo command: a broker, the controller and three agents on this
# machine; a model uploaded, rolled out, inference answered, telemetry shown.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh agent,controller,demo
exec .venv/bin/python examples/demo.py "$@"
