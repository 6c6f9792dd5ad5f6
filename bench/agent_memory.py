"""Resident memory of the agent process, beside bare processes measured in the same run,
and what each import costs it.

Starts mosquitto and real ``edgefleet-agent`` processes (``python -m agent.cli run``)
and reads their RSS (psutil):

- idle: connected, serving no model (read in every agent before its model arrives);
- one ONNX model: after a small conv net arrived through the desired state and
  answered 20 Infer calls;
- LiteRT-only: a fresh agent serving only a TFLite model (tflite-micro's
  sine_float.tflite) through LiteRT, after 20 Infer calls;
- idle with ``[api] enabled = false``: no local socket, so no gRPC.

Baselines in the same run: a bare Python interpreter; Python with numpy and
onnxruntime imported and the same model loaded in one session, and Python with
LiteRT and the TFLite model (what an app running the model itself would pay).
Every figure is the median of ``--runs`` fresh processes; the machine is shared,
so single runs are noisy. The agent's sources are byte-compiled first, as an installed
wheel's are.

With ``--imports`` it also runs each agent under ``python -X importtime -m agent.cli
run`` and prints what each package costs: its import time (median over the runs,
including whatever it was first to import) and the RSS it adds, read in a fresh
interpreter importing the agent's modules package by package in the agent's own
order, then the runtime the model needed.

Run: ``.venv/bin/python bench/agent_memory.py [--runs 3] [--imports]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgefleet_proto import inference_pb2, inference_pb2_grpc

from agent.tensors import from_arrays
from tests.support.agent_peer import Peer
from tests.support.broker import REPO, Broker
from tests.support.models import sine_float_tflite, small_conv
from tests.support.waiting import wait_until

MB = 1024 * 1024
# The goals: an idle agent in MB, a serving agent as a ratio to its bare runtime.
IDLE_GOAL_MB = 40.0
SERVING_GOAL = 1.15


def rss_of(code: str) -> float:
    """RSS of a fresh interpreter running ``code`` and then waiting to be measured."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code + "\nimport sys; print('ok', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ok"
    time.sleep(0.5)
    rss = psutil.Process(proc.pid).memory_info().rss / MB
    proc.communicate("", timeout=10)
    return rss


def settle_rss(pid: int, seconds: float = 2.0) -> float:
    time.sleep(seconds)
    return psutil.Process(pid).memory_info().rss / MB


@dataclass(frozen=True)
class AgentRun:
    idle: float
    # None for an agent that was given no model.
    loaded: float | None
    # The agent's stderr: its log, and -X importtime's lines when asked for.
    log: str
    # The shared libraries mapped once the model served (/proc/PID/maps).
    libraries: frozenset[str]


def mapped_libraries(pid: int) -> frozenset[str]:
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return frozenset(
        Path(p[5]).name for p in (line.split() for line in lines) if len(p) > 5 and ".so" in p[5]
    )


def agent_run(
    folder: Path,
    broker: Broker,
    model: Path | None,
    fmt: str = "onnx",
    python_flags: Sequence[str] = (),
    api: bool = True,
) -> AgentRun:
    """A fresh agent process: RSS idle, then once ``model`` serves and answered 20 calls
    (without a model or with the local API off: idle only)."""
    device = f"mem-{uuid.uuid4().hex[:6]}"
    password = uuid.uuid4().hex
    broker.add_user(device, password)
    data = folder / device
    config = folder / f"{device}.toml"
    socket = folder / f"{device}.sock"
    config.write_text(
        f'device_id = "{device}"\ndata_dir = "{data}"\nsocket = "{socket}"\n'
        f'[mqtt]\nport = {broker.port}\npassword = "{password}"\n'
        # The bench's protocol peer does not sign.
        "[security]\nallow_unsigned = true\n" + ("" if api else "[api]\nenabled = false\n")
    )
    log_path = folder / f"{device}.log"
    with log_path.open("wb") as log:
        agent = subprocess.Popen(
            [sys.executable, *python_flags, "-m", "agent.cli", "run", "--config", str(config)],
            cwd=REPO,
            stdout=log,
            stderr=log,
        )
    peer = Peer(broker, device)
    try:
        wait_until(lambda: b"agent ready" in log_path.read_bytes(), 30, "agent ready")
        idle = settle_rss(agent.pid)
        if model is None or not api:
            return AgentRun(idle, None, log_path.read_text(errors="replace"), mapped_libraries(agent.pid))
        digest = peer.add_artifact(model, fmt=fmt)
        assignment = peer.assignment(digest, "1", name="m")
        assignment.format, assignment.runtime = fmt, "litert" if fmt == "tflite" else "onnxruntime"
        peer.publish_desired(1, assignment)
        peer.wait_active(digest)
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            spec = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10).models[0].inputs[0]
            x = np.zeros([d if d > 0 else 1 for d in spec.shape], np.dtype(spec.dtype))
            for _ in range(20):
                stub.Infer(inference_pb2.InferRequest(inputs=from_arrays({spec.name: x})), timeout=10)
        loaded = settle_rss(agent.pid)
        libraries = mapped_libraries(agent.pid)
    finally:
        peer.close()
        agent.terminate()
        agent.wait(20)
    return AgentRun(idle, loaded, log_path.read_text(errors="replace"), libraries)


# --- memory: medians beside their baselines ---------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}"


def memory(folder: Path, broker: Broker, runs: int) -> None:
    model = small_conv(folder / "conv.onnx")
    tflite = sine_float_tflite()
    bare, raw_onnx, raw_litert = [], [], []
    onnx_runs: list[AgentRun] = []
    litert_runs: list[AgentRun] = []
    no_api: list[float] = []
    for _ in range(runs):
        bare.append(rss_of("pass"))
        raw_onnx.append(
            rss_of(
                "import numpy as np, onnxruntime as ort\n"
                f"s = ort.InferenceSession({str(model)!r}, providers=['CPUExecutionProvider'])\n"
                "s.run(None, {'image': np.zeros((1, 3, 32, 32), np.float32)})"
            )
        )
        raw_litert.append(
            rss_of(
                "import numpy as np\nfrom ai_edge_litert.interpreter import Interpreter\n"
                f"i = Interpreter(model_path={str(tflite)!r}); i.allocate_tensors(); i.invoke()"
            )
        )
        onnx_runs.append(agent_run(folder, broker, model, "onnx"))
        litert_runs.append(agent_run(folder, broker, tflite, "tflite"))
        no_api.append(agent_run(folder, broker, None, api=False).idle)
    idle = [r.idle for r in onnx_runs + litert_runs]
    onnx = [r.loaded for r in onnx_runs if r.loaded is not None]
    litert = [r.loaded for r in litert_runs if r.loaded is not None]
    rows = [
        ("agent idle, no model", idle, "bare python", bare, f"<= {IDLE_GOAL_MB:.0f} MB"),
        ("agent idle, local API off", no_api, "bare python", bare, f"<= {IDLE_GOAL_MB:.0f} MB"),
        ("agent, one ONNX model", onnx, "python + onnxruntime + model", raw_onnx, f"<= {SERVING_GOAL}x"),
        ("agent, LiteRT model only", litert, "python + LiteRT + model", raw_litert, f"<= {SERVING_GOAL}x"),
    ]
    print(f"agent RSS (psutil), MB, median of {runs} fresh processes each (idle: {len(idle)});")
    print("shared 2-core machine, so figures move by a few MB between runs (range in brackets)")
    print(f"    {'figure':26} {'median':>7} {'range':>11}   {'baseline':29} {'median':>7}  ratio  goal")
    for name, values, base_name, base, goal in rows:
        m, b = median(values), median(base)
        print(
            f"    {name:26} {m:7.1f} {'(' + spread(values) + ')':>11}   {base_name:29} {b:7.1f}"
            f"  {m / b:5.2f}  {goal}"
        )
    print(f"    agent idle over bare python: {median(idle) - median(bare):+.1f} MB")
    print(
        f"    agent over its runtime: ONNX {median(onnx) - median(raw_onnx):+.1f} MB, "
        f"LiteRT {median(litert) - median(raw_litert):+.1f} MB"
    )
    onnx_in_litert = sum(any("onnxruntime" in lib for lib in r.libraries) for r in litert_runs)
    litert_in_onnx = sum(any("litert" in lib.lower() for lib in r.libraries) for r in onnx_runs)
    print(
        f"    LiteRT-only agents that mapped onnxruntime: {onnx_in_litert} of {runs}; "
        f"ONNX agents that mapped LiteRT: {litert_in_onnx} of {runs}"
    )


# --- imports: what each package costs -------------------------------------------------------

START_UP = "python start-up"
FIRST_PARTY = ("agent", "edgefleet_proto")


@dataclass(frozen=True)
class Imported:
    name: str
    # The module whose import led to this one ("" at the top).
    parent: str
    # Its own cost: microseconds (-X importtime's self column) or MB of RSS.
    own: float
    # Imported after the agent said it was ready: on the first model's load, not at start.
    lazy: bool


def parse_importtime(log: str) -> list[Imported]:
    """``-X importtime`` lines of an agent's log, in completion order (a module after those it
    imported), with their parents read from the indentation."""
    rows: list[tuple[str, int, int, bool]] = []
    ready = False
    for line in log.splitlines():
        if "agent ready" in line:
            ready = True
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own_us, _, label = line.removeprefix("import time:").split("|")
        rows.append((label.strip(), (len(label) - len(label.lstrip(" "))) // 2, int(own_us), ready))
    out: list[Imported] = []
    for i, (name, depth, own, lazy) in enumerate(rows):
        parent = next((n for n, d, _, _ in rows[i + 1 :] if d < depth), "") if depth else ""
        out.append(Imported(name, parent, float(own), lazy))
    return out


def group_of(module: str) -> str:
    """The package a module belongs to: agent, edgefleet_proto, a third-party one, or stdlib."""
    top = module.split(".")[0]
    if top in FIRST_PARTY:
        return top
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin in ("built-in", "frozen"):
        return "stdlib"
    if spec.origin is None:
        # A namespace package (google): the sub-package is the distribution.
        return ".".join(module.split(".")[:2])
    return top if "site-packages" in spec.origin else "stdlib"


def owners(entries: Sequence[Imported]) -> dict[str, str]:
    """Which package pays for each module: its own, except that what a third-party package
    pulls in (asyncio for grpc, typing_extensions for grpc.aio) is charged to that package;
    the stdlib modules our own code imports first (ssl, sqlite3) are a row of their own, and
    what Python's start imports (site, encodings) is ``python start-up``."""
    parent = {e.name: e.parent for e in entries}
    lazy = {e.name: e.lazy for e in entries}
    memo: dict[str, str] = {}

    def owner(name: str) -> str:
        if name not in memo:
            own = group_of(name)
            above = owner(parent[name]) if parent.get(name) in parent else ""
            if own in FIRST_PARTY or (own != "stdlib" and above in FIRST_PARTY):
                memo[name] = own
            elif own == "stdlib" and above in FIRST_PARTY:
                memo[name] = f"stdlib via {above}"
            elif above.startswith("stdlib via"):
                memo[name] = above
            else:
                memo[name] = above or (START_UP if own == "stdlib" else own)
        return memo[name]

    out: dict[str, str] = {}
    for e in entries:
        base = owner(e.name)
        # Paid on the first model's load rather than at start: a row of its own.
        out[e.name] = f"{base} (on load)" if lazy[e.name] and base != START_UP else base
    return out


@dataclass
class GroupCost:
    name: str
    modules: int
    times_ms: list[float]
    rss_mb: float
    importer: str


def group_costs(timed: Sequence[Sequence[Imported]], rss: Sequence[Imported]) -> list[GroupCost]:
    """One row per package: median import time over the runs, RSS added, who imported it first."""
    first = timed[0]
    owner = owners(first)
    groups: dict[str, GroupCost] = {}
    for e in first:
        g = groups.setdefault(owner[e.name], GroupCost(owner[e.name], 0, [], 0.0, ""))
        g.modules += 1
    for g in groups.values():
        # Named by the first of the package's own modules imported from outside it (for the
        # stdlib rows, by the first module imported from outside them).
        entering = [e for e in first if owner[e.name] == g.name and owner.get(e.parent) != g.name]
        own = [e for e in entering if group_of(e.name) == g.name.removesuffix(" (on load)")]
        e = (own or entering)[0]
        g.importer = e.parent or ("(first model's load)" if e.lazy else "(top)")
    for run in timed:
        run_owner = owners(run)
        totals: dict[str, float] = {}
        for e in run:
            totals[run_owner[e.name]] = totals.get(run_owner[e.name], 0.0) + e.own / 1000
        for name, ms in totals.items():
            if name in groups:
                groups[name].times_ms.append(ms)
    rss_owner = owners(rss)
    for e in rss:
        if rss_owner[e.name] in groups:
            groups[rss_owner[e.name]].rss_mb += e.own
    return list(groups.values())


# Replays the agent's imports in a fresh interpreter (each top-level import of its log in
# order: the start's, then the first model's) and measures each module's own RSS: what its
# loading added, less what the modules it imported added.
RSS_REPLAY = """
import importlib, json, os, sys
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 1048576
bootstrap = sys.modules["_frozen_importlib"]
original = bootstrap._load_unlocked
stack, records, lazy = [], [], False
def load(spec):
    stack.append([spec.name, rss(), 0.0])
    try:
        return original(spec)
    finally:
        name, start, children = stack.pop()
        total = rss() - start
        records.append([name, stack[-1][0] if stack else "", total - children, lazy])
        if stack:
            stack[-1][2] += total
start = rss()
bootstrap._load_unlocked = load
eager, on_load = json.loads(sys.argv[1])
for names, lazy in ((eager, False), (on_load, True)):
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            pass
print(json.dumps([start, records]))
"""


def replay_rss(entries: Sequence[Imported]) -> tuple[float, list[Imported]]:
    """(RSS of the replaying interpreter before, each module's own RSS in MB)."""
    tops = [e for e in entries if not e.parent and group_of(e.name) != "stdlib"]
    eager = [e.name for e in tops if not e.lazy]
    on_load = [e.name for e in tops if e.lazy]
    out = subprocess.run(
        [sys.executable, "-c", RSS_REPLAY, json.dumps([eager, on_load])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    start, records = json.loads(out)
    return float(start), [Imported(n, p, float(mb), bool(lazy)) for n, p, mb, lazy in records]


def imports(folder: Path, broker: Broker, runs: int) -> None:
    scenarios = {
        "ONNX": (small_conv(folder / "conv.onnx"), "onnx"),
        "LiteRT-only": (sine_float_tflite(), "tflite"),
    }
    print()
    print(f"what each import costs the agent: python -X importtime -m agent.cli run, median of {runs} runs;")
    print("RSS added: the agent's imports replayed in that order in a fresh interpreter, each")
    print("module's own RSS (what it added less what the modules it imported added)")
    for label, (model, fmt) in scenarios.items():
        timed = [
            parse_importtime(agent_run(folder, broker, model, fmt, ("-X", "importtime")).log)
            for _ in range(runs)
        ]
        start, rss = replay_rss(timed[0])
        groups = group_costs(timed, rss)
        print(f"  agent serving one {label} model (python before its imports: {start:.1f} MB)")
        print(f"    {'package':26} {'modules':>7} {'import ms':>9} {'+RSS MB':>8}  first imported by")
        for g in sorted(groups, key=lambda g: -g.rss_mb):
            print(f"    {g.name:26} {g.modules:7d} {median(g.times_ms):9.1f} {g.rss_mb:8.1f}  {g.importer}")
        total_ms = median([sum(e.own for e in run) / 1000 for run in timed])
        total_rss = sum(g.rss_mb for g in groups)
        print(f"    {'all':26} {len(timed[0]):7d} {total_ms:9.1f} {total_rss:8.1f}")


SOURCES = ("agent", "proto/edgefleet_proto")


def compile_sources() -> None:
    """The agent's and the contract's bytecode, as ``pip install`` leaves it on a device:
    without it (PYTHONDONTWRITEBYTECODE in a checkout) every start compiles them, which
    costs the agent hundreds of ms and about 2 MB. Hash-checked, so a source edited after
    this is never served by stale bytecode."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "--invalidation-mode", "checked-hash", *SOURCES],
        cwd=REPO,
        env=env,
        check=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per figure (median)")
    parser.add_argument("--imports", action="store_true", help="also print what each import costs")
    args = parser.parse_args()
    compile_sources()
    with tempfile.TemporaryDirectory(prefix="efm-") as tmp:
        folder = Path(tmp)
        broker = Broker(folder / "mosquitto").start()
        try:
            memory(folder, broker, args.runs)
            if args.imports:
                imports(folder, broker, args.runs)
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
