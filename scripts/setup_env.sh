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
    DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto mosquitto-clients chromium
  elif [ -n "$require_mosquitto" ]; then
    echo "mosquitto is not installed: run 'sudo apt-get install -y mosquitto mosquitto-clients' first" >&2
    exit 1
  fi
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
