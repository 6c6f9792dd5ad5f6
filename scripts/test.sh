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
echo "== mypy: the agent and its contract as Python 3.10 reads them" >&2
.venv/bin/mypy --python-version 3.10 -p agent -p edgefleet_proto
echo "== pytest" >&2
if [ $# -eq 0 ]; then
  # Several workers, one test file each at a time (files share their fixtures' processes):
  # most of the suite's time is spent waiting on real brokers, controllers and agents.
  .venv/bin/pytest -p no:cacheprovider -n "${EDGEFLEET_TEST_WORKERS:-3}" --dist loadfile -m "not serial"
  # The demo and the README walkthrough, run as a user runs them, outside any worker.
  .venv/bin/pytest -p no:cacheprovider -m serial
else
  .venv/bin/pytest -p no:cacheprovider "$@"
fi
# The whole suite also runs the agent's tests on Python 3.10 (what Jetsons ship).
if [ $# -eq 0 ]; then
  bash scripts/test_agent_py310.sh
fi
