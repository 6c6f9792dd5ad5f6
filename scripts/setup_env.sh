#!/usr/bin/env bash
# Shared set-up for the README's two commands: a virtual environment in .venv
# with the requested extras, and Mosquitto when we may install it.
# Usage: scripts/setup_env.sh EXTRAS [--require-mosquitto]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="$1"
require_mosquitto="${2:-}"

python=python3
for candidate in python3.11 python3.12 python3.13 python3; do
  if command -v "$candidate" >/dev/null 2>&1; then python="$candidate"; break; fi
done
"$python" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"EdgeFleet needs Python >= 3.11, found {sys.version.split()[0]}")
PY

if ! command -v mosquitto >/dev/null 2>&1 && ! [ -x /usr/sbin/mosquitto ]; then
  if [ "$(id -u)" = "0" ]; then
    echo "== installing mosquitto with apt-get" >&2
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto mosquitto-clients chromium nats-server
  elif [ -n "$require_mosquitto" ]; then
    echo "mosquitto is not installed: run 'sudo apt-get install -y mosquitto mosquitto-clients' first" >&2
    exit 1
  fi
fi
# The clustered-broker tests start a three-node NATS JetStream cluster (tests/support/nats_cluster.py).
if ! command -v nats-server >/dev/null 2>&1 && ! [ -x /usr/sbin/nats-server ] && [ "$(id -u)" = "0" ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y nats-server || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nats-server; }
fi
# The controller's tests run the storage, API and rollout modules on PostgreSQL too (tests/support/postgres.py
# starts Debian's server from /usr/lib/postgresql/<version>/bin in a temporary folder).
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; }
fi
# The console's browser tests drive Debian's chromium.
if ! [ -x /usr/bin/chromium ] && [ "$(id -u)" = "0" ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
fi

if ! "$python" -c "import ensurepip" >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    apt-get install -y python3-venv
  fi
fi
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $python" >&2
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
echo "== installing edgefleet[$extras] into .venv" >&2
.venv/bin/python -m pip install --quiet -e ".[$extras]"

# The agent also runs on the Python 3.10 that Ubuntu 22.04 and JetPack 6 ship, so the
# test command runs the agent's tests there too, in .venv310 (the agent extra and test
# tools only). No 3.10 interpreter on this machine: said, and skipped.
if [[ ",$extras," == *",dev,"* ]]; then
  python310=""
  for candidate in python3.10 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10.*/bin/python; do
    # A pyenv shim exists even when its version is not selected: ask the interpreter itself.
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' >/dev/null 2>&1; then
      python310="$candidate"; break
    fi
  done
  if [ -z "$python310" ]; then
    echo "== no Python 3.10 interpreter (python3.10 or pyenv): the agent's 3.10 tests will be skipped" >&2
    rm -f .venv310/.edgefleet-ready
  else
    # onnxruntime 1.23, the newest with a 3.10 wheel, reads ONNX IR up to 11: the test
    # models are written with an onnx that writes no newer IR.
    agent_test_requirements=(-e ".[agent,tflite]" "pytest>=8" "pytest-timeout>=2.3" "onnx>=1.17,<1.19"
      tflite-micro)
    stamp="$(cat pyproject.toml; echo "${agent_test_requirements[*]}")"
    stamp="$(printf '%s' "$stamp" | sha256sum | cut -d' ' -f1)"
    if [ "$(cat .venv310/.edgefleet-ready 2>/dev/null)" != "$stamp" ]; then
      echo "== installing edgefleet[agent] and the agent's test tools into .venv310 with $python310" >&2
      [ -x .venv310/bin/python ] || "$python310" -m venv .venv310
      .venv310/bin/python -m pip install --quiet "${agent_test_requirements[@]}"
      echo "$stamp" > .venv310/.edgefleet-ready
    fi
  fi
fi
