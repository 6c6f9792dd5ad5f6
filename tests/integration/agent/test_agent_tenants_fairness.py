"""Three saturating tenants on one real agent: CPU time follows the weights, overflow is dropped and counted."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgefleet_proto import fleet_pb2

from tests.integration.agent.conftest import AgentProcess
from tests.integration.agent.peer import Peer, wait_until
from tests.models import wide_conv

# Inference (about 10 ms a run here), not the sources, must be the bottleneck.
SIZE = 96
WEIGHTS = {"low": 1.0, "mid": 2.0, "high": 4.0}


def tenant(name: str, weight: float, seed: int) -> str:
    return f"""
[[tenants]]
id = "{name}"
weight = {weight}
queue = 4
[tenants.source]
kind = "synthetic"
shape = "{SIZE},{SIZE},3"
seed = {seed}
[tenants.preprocess]
scale = 0.00392156862745098
layout = "nchw"
"""


def test_weights_are_respected_under_overload(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[[str], Peer], tmp_path: Path
) -> None:
    agent = make_agent(telemetry_interval_s=1.0)
    with agent.config.open("a") as f:
        f.write("[scheduler]\nworkers = 2\nintra_op_threads = 1\n")
        for i, (name, weight) in enumerate(WEIGHTS.items()):
            f.write(tenant(name, weight, i))
    peer = make_peer(agent.device_id)
    digest = peer.add_artifact(wide_conv(tmp_path / "conv.onnx", SIZE))
    # Three tenants on one artifact: one loaded copy serves them all.
    peer.publish_desired(1, *(peer.assignment(digest, "1", name="conv", tenant=t) for t in WEIGHTS))
    agent.start()
    agent.wait_ready()
    for t in WEIGHTS:
        peer.wait_active(digest, tenant=t)

    def busy_windows() -> list[dict[str, fleet_pb2.TenantStats]] | None:
        windows = [{s.tenant: s for s in t.tenants} for t in list(peer.telemetry)]
        full = [w for w in windows if all(w.get(t) and w[t].inferences for t in WEIGHTS)]
        # The first full window may have started before every model was active.
        return full[1:5] if len(full) >= 5 else None

    windows = wait_until(busy_windows, 40, "four telemetry windows with every tenant busy")
    busy = {t: sum(w[t].busy_s for w in windows) for t in WEIGHTS}
    total = sum(busy.values())
    for t, weight in WEIGHTS.items():
        share, want = busy[t] / total, weight / sum(WEIGHTS.values())
        assert abs(share - want) / want < 0.10, (t, busy, share, want)
    assert all(
        sum(w[t].dropped for w in windows) > 0 for t in WEIGHTS
    )  # live sources overflow, never queue up
    assert {w[t].weight for w in windows for t in WEIGHTS} == set(WEIGHTS.values())
