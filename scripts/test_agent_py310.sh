#!/usr/bin/env bash
# The agent's tests on Python 3.10, in .venv310 (made by scripts/setup_env.sh dev when
# the machine has a 3.10 interpreter; skipped, saying so, when it has none).
# Left out: agent tests that import the controller (a Python 3.11 program) or its test
# helpers, and those that make their models with scikit-learn (a large install that the
# 3.11 run covers). The integration tests are those of the agent's process on its own: broker
# link, convergence, signing, TLS, systemd, installation and accelerators.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! [ -f .venv310/.edgefleet-ready ]; then
  echo "== agent tests on Python 3.10: skipped, no Python 3.10 interpreter (python3.10 or pyenv) here" >&2
  exit 0
fi
left_out='^\s*(from|import) (controller|tests\.(unit|integration)\.controller|tests\.support\.(localfleet|controller_process|controller_calls|model_files)|skl2onnx|sklearn)\b'
mapfile -t unit < <(grep -L -E "$left_out" tests/unit/agent/test_*.py)
integration=(
  tests/integration/agent/test_agent_converge.py
  tests/integration/agent/test_agent_signing.py
  tests/integration/agent/test_agent_tls.py
  tests/integration/agent/test_agent_systemd.py
  tests/integration/agent/test_agent_install.py
  tests/integration/agent/test_agent_accelerators.py
)
# Makes its reference model with scikit-learn inside a helper.
deselected=(--deselect tests/unit/agent/test_agent_runtime_litert.py::test_float_and_int8_mlps_agree_with_the_onnx_reference)
echo "== agent tests on $(.venv310/bin/python -V)" >&2
exec .venv310/bin/pytest -p no:cacheprovider -q "${deselected[@]}" "${unit[@]}" "${integration[@]}"
