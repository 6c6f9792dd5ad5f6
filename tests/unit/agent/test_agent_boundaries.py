"""What the agent may import: a device installs edgefleet[agent] and nothing more."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

AGENT = Path(__file__).resolve().parents[3] / "agent"


def test_agent_never_loads_controller_side_packages() -> None:
    code = (
        "import json, sys, agent.cli, agent.service; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'controller', 'fastapi', 'sqlite_utils', 'sqlalchemy', 'alembic', 'psycopg', 'uvicorn', 'onnx',"
        " 'sklearn'})))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out) == []


def test_only_the_runtime_module_imports_a_runtime_library() -> None:
    importers = set()
    for path in AGENT.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n.split(".")[0] in ("onnxruntime", "tflite_runtime", "ai_edge_litert") for n in names):
                importers.add(path.name)
    assert importers == {"runtime.py"}
