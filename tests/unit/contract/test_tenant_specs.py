"""What the controller accepts as a tenant spec, the agent parses to the same tenant."""

from __future__ import annotations

import hashlib
from typing import Any

from agent.tenants import from_proto
from controller.tenants import parse_tenants

TOKEN = "cam-app-token-0123456789"


def test_the_agent_parses_every_tenant_the_controller_accepts() -> None:
    docs: list[dict[str, Any]] = [
        {
            "id": "door",
            "model": "conv",
            "source": {"kind": "video", "uri": "/srv/door.avi", "options": {"loop": True, "fps": 15}},
            "preprocess": {"crop": [0, 0, 480, 480], "resize": [32, 32], "color": "rgb", "layout": "nchw",
                           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "batch": True},
            "rate_hz": 15, "weight": 3.0, "queue": 4, "results": ["mqtt", "grpc"], "token": TOKEN,
        },
        {"id": "rows", "model": "digits", "source": {"kind": "csv", "uri": "/srv/rows.csv"},
         "preprocess": {"window": 16, "hop": 8, "dtype": "float32"}},
        {"id": "mic", "model": "kws", "source": {"kind": "microphone", "options": {"sample_rate": 16000}},
         "preprocess": {"features": "log_mel", "n_mels": 40, "window": 16000}},
    ]  # fmt: skip
    by_id = {t.id: from_proto(t.to_proto()) for t in parse_tenants(docs, {"conv", "digits", "kws"})}
    door = by_id["door"]
    assert door.source is not None and door.source.kind == "video" and door.source.flag("loop")
    assert door.preprocess.resize == (32, 32) and door.preprocess.crop == (0, 0, 480, 480)
    assert door.preprocess.layout == "nchw" and door.preprocess.std == (0.229, 0.224, 0.225)
    assert (door.rate_hz, door.weight, door.queue, door.results) == (15, 3.0, 4, frozenset({"grpc", "mqtt"}))
    assert door.token_sha256 == hashlib.sha256(TOKEN.encode()).hexdigest() and door.accepts(TOKEN)
    assert (by_id["rows"].preprocess.window, by_id["rows"].preprocess.hop) == (16, 8)
    assert by_id["rows"].queue == 4 and by_id["rows"].weight == 1.0
    assert by_id["mic"].preprocess.features == "log_mel" and by_id["mic"].source is not None
