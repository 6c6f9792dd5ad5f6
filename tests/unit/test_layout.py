"""The agent and the controller stay apart, and a device install stays small."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONTROLLER_ONLY = {
    "controller",
    "fastapi",
    "uvicorn",
    "sqlite_utils",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "starlette",
    "httpx",
    "onnx",
}
AGENT_ONLY = {"agent"}


def imported_modules(package: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


@pytest.mark.parametrize(("package", "forbidden"), [("agent", CONTROLLER_ONLY), ("controller", AGENT_ONLY)])
def test_halves_never_import_each_other(package: str, forbidden: set[str]) -> None:
    offenders = {
        f: sorted(n & forbidden) for f, n in imported_modules(REPO / package).items() if n & forbidden
    }
    assert offenders == {}


@pytest.mark.parametrize("folder", ["examples", "bench"])
def test_examples_and_benchmarks_never_import_test_modules_other_than_the_shared_helpers(folder: str) -> None:
    """Examples use only the product; benchmarks may use tests/support (real brokers, models),
    never a test module."""
    allowed = set() if folder == "examples" else {"tests.support"}
    offenders = {}
    for path in (REPO / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [module or ""]
            bad = [
                n for n in names if n.split(".")[0] == "tests" and not any(n.startswith(a) for a in allowed)
            ]
            if bad:
                offenders[str(path.relative_to(REPO))] = bad
    assert offenders == {}


def test_test_modules_never_import_each_other() -> None:
    """Shared helpers live in tests/support; a test module or a conftest is imported by pytest alone."""
    offenders = {}
    for path in (REPO / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                last = node.module.split(".")[-1]
                if node.module.startswith("tests.") and (last.startswith("test_") or last == "conftest"):
                    offenders.setdefault(str(path.relative_to(REPO)), []).append(node.module)
    assert offenders == {}


def test_contract_imports_only_protobuf_and_stdlib() -> None:
    allowed_third_party = {"google", "grpc", "edgefleet_proto"}
    for f, names in imported_modules(REPO / "proto" / "edgefleet_proto").items():
        foreign = {n for n in names if n not in sys.stdlib_module_names and n not in allowed_third_party}
        assert not foreign, f"{f} imports {foreign}"


def test_agent_extra_does_not_pull_controller_dependencies() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    agent = {
        req.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower()
        for req in project["optional-dependencies"]["agent"]
    }
    base = {req.split(">")[0].split("<")[0].split("[")[0].strip().lower() for req in project["dependencies"]}
    controller_only = {
        "fastapi",
        "uvicorn",
        "sqlite-utils",
        "sqlalchemy",
        "alembic",
        "psycopg",
        "httpx",
        "onnx",
    }
    assert not (agent | base) & (controller_only | {"python-multipart"})
    assert {"paho-mqtt", "onnxruntime", "grpcio", "protobuf", "psutil"} <= agent
    scripts = project["scripts"]
    assert scripts == {"edgefleet": "controller.cli:main", "edgefleet-agent": "agent.cli:main"}
