"""Wave broadcast on the device: where each artifact is broadcast, and a planner that listens first
and asks only for what the broadcast did not bring, once it is over."""

from __future__ import annotations

import math
from dataclasses import replace

from edgefleet_proto.wave import WaveTopic

from agent.broadcast import reception
from agent.reconciler import Current, Listen, RequestChunks, RequestManifest, TransferView, Wait, plan
from agent.state import Assignment, Desired, DeviceState

DIGEST = "1" * 64
SAMPLE = "2" * 64
KEY = bytes(range(32))
WAVE = "0f" * 16 + "-w1"
NOW = 1000.0


def broadcast_assignment(**changes: str) -> Assignment:
    a = Assignment(
        "default",
        "m",
        "1",
        DIGEST,
        1000,
        wave_id=WAVE,
        artifact_key=KEY.hex(),
        sample_digest=SAMPLE,
        sample_key=(b"s" * 32).hex(),
    )
    return replace(a, **changes)


def steps_for(a: Assignment, *transfers: TransferView) -> list[object]:
    current = Current(state=DeviceState(), transfers={t.digest: t for t in transfers})
    steps = plan(Desired(1, (a,)), current, NOW)
    return [s for s in steps if s.action.value not in ("report",)]


def test_each_artifact_is_received_where_its_wave_broadcasts_it() -> None:
    a = broadcast_assignment()
    got = reception(a)
    assert got is not None and got.topic == str(WaveTopic(WAVE, DIGEST)) and got.key == KEY
    sample = reception(a, sample=True)
    assert sample is not None and sample.topic == str(WaveTopic(WAVE, SAMPLE))
    # Without a wave or a key, or with one that could not open anything: by request only.
    for bad in (
        {"wave_id": ""},
        {"artifact_key": ""},
        {"wave_id": "w/1"},
        {"artifact_key": "zz"},
        {"artifact_key": "ab" * 16},
    ):
        assert reception(broadcast_assignment(**bad)) is None, bad


def test_the_planner_listens_waits_for_the_broadcast_and_asks_only_after_it() -> None:
    a = broadcast_assignment(sample_digest="", sample_key="")
    assert steps_for(a) == [Listen(a)]
    # Listening, announcement not in yet: the broadcast has until broadcast_until.
    waiting = TransferView(DIGEST, listening=True, broadcast_until=NOW + 3)
    assert steps_for(a, waiting) == [Wait(NOW + 3, f"broadcast of {DIGEST[:12]}")]
    with_manifest = replace(waiting, has_manifest=True, chunks=4, have=frozenset({0, 2}))
    assert steps_for(a, with_manifest) == [Wait(NOW + 3, f"broadcast of {DIGEST[:12]}")]
    # It ended (or went quiet): the missing chunks only, by request.
    over = replace(with_manifest, broadcast_until=-math.inf)
    assert steps_for(a, over) == [RequestChunks(DIGEST, (1, 3))]
    # Quiet before the manifest came: the manifest by request.
    assert steps_for(a, replace(waiting, broadcast_until=NOW - 1)) == [RequestManifest(a)]


def test_sample_inputs_are_listened_for_on_their_own_broadcast() -> None:
    a = broadcast_assignment()
    assert steps_for(a) == [Listen(a), Listen(a, sample=True)]
