"""Per-device limits without a broker: token buckets on a driven clock, bounded log lines,
event and telemetry quotas and message counters over a real SQLite file."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from edgefleet_proto import fleet_pb2

from controller import message_counters
from controller.device_events import MAX_ATTRIBUTES_CHARS, MAX_MESSAGE_CHARS, DeviceEvents
from controller.device_quotas import CaptureQuota, TelemetryQuota
from controller.errors import ConfigError
from controller.log_bounds import MAX_LINE_CHARS, BadMessageLog, LineBound, bounded_line, clip
from controller.message_counters import MessageCounters
from controller.rate_limits import DeviceBuckets, Limit, NewestWins
from tests.unit.controller.helpers import Parts

pytestmark = pytest.mark.both_backends


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_lets_through_at_most_burst_plus_rate_times_elapsed() -> None:
    clock = Clock()
    buckets = DeviceBuckets(Limit("bytes", rate=1000, burst=4000), clock)
    passed = 0
    for step in range(200):
        clock.now = 100.0 + step * 0.05
        if buckets.allow("cam-1", 300):
            passed += 300
        assert passed <= 4000 + 1000 * (clock.now - 100.0)
    assert passed >= 1000 * 9  # and it does keep serving at the rate
    # Each device has its own bucket.
    assert buckets.allow("cam-2", 4000) and not buckets.allow("cam-2", 1)


def test_a_cost_above_the_burst_passes_only_from_a_full_bucket() -> None:
    clock = Clock()
    buckets = DeviceBuckets(Limit("bytes", rate=100, burst=100), clock)
    assert buckets.allow("d", 250)  # full: passes, leaves a debt of 150
    clock.now += 1.0
    assert not buckets.allow("d", 1)
    clock.now += 1.5
    assert buckets.allow("d", 100)


def test_snapshots_over_the_rate_wait_newest_first_and_the_older_ones_are_dropped() -> None:
    clock = Clock()
    held: NewestWins[str] = NewestWins(DeviceBuckets(Limit("reported", rate=1, burst=2), clock))
    assert held.offer("cam-1", "reported", "r1") == (True, 0)
    assert held.offer("cam-1", "reported", "r2") == (True, 0)
    # Over the rate: held, each newer one replacing (dropping) the one before.
    assert held.offer("cam-1", "reported", "r3") == (False, 0)
    assert held.offer("cam-1", "reported", "r4") == (False, 1)
    assert held.offer("cam-1", "status", "s1") == (False, 0)
    assert held.offer("cam-2", "reported", "other") == (True, 0), "each device has its own bucket"
    assert held.due() == []
    clock.now += 1.0
    assert held.due() == ["r4"], "one token: the first held, newest of its kind"
    clock.now += 1.0
    assert held.due() == ["s1"] and held.held() == 0
    # One let through while an older one waits drops the older one: the newest is handled last.
    assert held.offer("cam-1", "reported", "r5") == (False, 0)
    clock.now += 1.0
    assert held.offer("cam-1", "reported", "r6") == (True, 1)
    assert held.due() == [] and held.held() == 0


def test_buckets_are_kept_for_the_most_recent_devices_only() -> None:
    buckets = DeviceBuckets(Limit("n", 1, 1), Clock(), capacity=2)
    for device in ("a", "b", "c"):
        assert buckets.allow(device)
    assert not buckets.allow("c")
    assert buckets.allow("a")  # forgotten, so full again


def test_clip_cuts_and_escapes_what_a_device_chose() -> None:
    assert clip("model\nname") == "model\\nname"
    long = clip("x" * 10_000)
    assert long.startswith("x" * 200) and long.endswith("...(+9800 chars)") and len(long) < 230
    line = bounded_line("event message=%r attributes=%s count=%d", "m" * 100_000, "a\n" * 50_000, 7)
    assert len(line) <= MAX_LINE_CHARS + 30 and "\n" not in line and line.endswith("count=7")


def test_bad_message_lines_are_rate_limited_per_device_and_kind(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    bad = BadMessageLog(logging.getLogger("controller.test"), per_s=1.0, burst=3, clock=clock)
    with caplog.at_level(logging.WARNING):
        logged = [
            bad.warning("cam-1", "payload rejected device=%s reason=%s", "cam-1", "x" * 5000)
            for _ in range(50)
        ]
        assert logged.count(True) == 3
        assert bad.warning("cam-1", "another problem device=%s", "cam-1")
        assert bad.warning("cam-2", "payload rejected device=%s reason=%s", "cam-2", "short")
        clock.now += 1.0
        assert bad.warning("cam-1", "payload rejected device=%s reason=%s", "cam-1", "late")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6 and all(len(line) < 300 for line in lines)
    assert lines[-1] == "payload rejected device=cam-1 reason=late (held back 47 similar lines)"


def test_the_log_handlers_cut_any_line_that_did_not_go_through_clip() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(LineBound())
    logger = logging.getLogger("controller.test.line_bound")
    logger.addHandler(handler)
    try:
        logger.warning("capture chunk rejected upload=%s", "u" * 1_000_000)
        logger.warning("short line %d", 7)
    finally:
        logger.removeHandler(handler)
    first, second = stream.getvalue().splitlines()
    assert len(first) <= MAX_LINE_CHARS + 30 and first.endswith("chars)")
    assert second == "short line 7"


def event(i: int, message: str = "m") -> fleet_pb2.Event:
    msg = fleet_pb2.Event(device_id="d", at_ms=i, kind=f"k{i}", severity="warning", message=message)
    return msg


def test_events_are_cut_to_bounds_and_the_oldest_dropped_past_the_quota(
    tmp_path: Path, store_url: str
) -> None:
    parts = Parts(tmp_path, database_url=store_url)
    parts.fleet.register("d")
    parts.fleet.register("other")
    counters = MessageCounters()
    events = DeviceEvents(parts.store, quota=20, counters=counters)
    big = event(0, "x" * 50_000)
    for a in range(100):
        big.attributes[f"key-{a:03d}-" + "k" * 200] = "v" * 5000
    events.ingest("d", big, received_at=1.0)
    (stored,) = parts.telemetry.events("d")
    assert len(stored.message) == MAX_MESSAGE_CHARS and stored.message.endswith("\u2026")
    assert len(json.dumps(stored.attributes)) <= MAX_ATTRIBUTES_CHARS
    assert int(stored.attributes["attributes_omitted"]) > 90
    events.ingest("other", event(1), received_at=1.0)
    for i in range(1, 60):
        events.ingest("d", event(i), received_at=1.0 + i)
    kept = parts.telemetry.events("d", limit=1000)
    assert 18 <= len(kept) <= 20
    # The newest are kept, by arrival; the other device's events are not touched.
    assert kept[0].kind == "k59" and {e.kind for e in kept} == {f"k{i}" for i in range(60 - len(kept), 60)}
    assert len(parts.telemetry.events("other")) == 1
    counters.flush(parts.store)
    (count,) = message_counters.read(parts.store)
    assert (count.counter, count.device_id, count.kind, count.reason) == (
        "quota",
        "d",
        "events",
        "dropped_oldest",
    )
    assert count.value == 60 - len(kept)


def test_counts_about_unregistered_devices_are_kept_only_as_rejections(
    tmp_path: Path, store_url: str
) -> None:
    parts = Parts(tmp_path, database_url=store_url)
    parts.fleet.register("cam-1")
    counters = MessageCounters()
    counters.rejected("events", "rate_limited", 2)
    counters.rate_limited("cam-1", "events", 2)
    counters.rate_limited("ghost", "events", 5)
    counters.bytes_served("cam-1", 100)
    counters.flush(parts.store)
    counters.bytes_served("cam-1", 50)
    counters.flush(parts.store)
    got = {(c.counter, c.device_id, c.kind, c.reason): c.value for c in message_counters.read(parts.store)}
    assert got == {
        ("rejected", "", "events", "rate_limited"): 2,
        ("rate_limited", "cam-1", "events", ""): 2,
        ("bytes_served", "cam-1", "", ""): 150,
    }


def window(seq: int, names: int) -> fleet_pb2.Telemetry:
    msg = fleet_pb2.Telemetry(device_id="d", seq=seq, window_start_ms=seq, window_end_ms=seq + 1)
    for n in range(names):
        msg.models.add(tenant="default", model_name=f"model-{n:04d}", model_version="1", inference_count=1)
    return msg


def test_telemetry_past_the_quota_drops_the_devices_oldest_windows(tmp_path: Path, store_url: str) -> None:
    parts = Parts(tmp_path, database_url=store_url)
    parts.fleet.register("d")
    parts.fleet.register("quiet")
    counters = MessageCounters()
    quota = TelemetryQuota(parts.store, 200_000, counters)
    parts.telemetry.observers.append(quota.observe)
    parts.telemetry.ingest_telemetry("quiet", window(1, 1), received_at=1.0)
    for seq in range(1, 80):
        parts.telemetry.ingest_telemetry("d", window(seq, 40), received_at=float(seq))
        assert quota.stored_bytes("d") <= 200_000 + 20_000
    seqs = [t.seq for t in parts.telemetry.telemetry("d", limit=1000)]
    assert seqs[0] == 79 and len(seqs) < 79 and seqs == sorted(seqs, reverse=True)
    assert seqs == list(range(79, 79 - len(seqs), -1))  # the oldest went first
    assert len(parts.telemetry.telemetry("quiet")) == 1
    counters.flush(parts.store)
    (count,) = message_counters.read(parts.store)
    assert (count.device_id, count.kind, count.value) == ("d", "telemetry", 79 - len(seqs))


def test_captured_data_past_the_quota_is_refused(tmp_path: Path, store_url: str) -> None:
    parts = Parts(tmp_path, database_url=store_url)
    parts.fleet.register("d")
    staging = tmp_path / "staging"
    (staging / "d" / "up1").mkdir(parents=True)
    (staging / "d" / "up1" / "000000.part").write_bytes(b"x" * 600)
    counters = MessageCounters()
    quota = CaptureQuota(parts.store, staging, 1000, counters, clock=Clock())
    chunk = fleet_pb2.CaptureChunk(upload_id="up2", data=b"y" * 300)
    assert quota.admit("d", chunk)
    assert not quota.admit("d", chunk)  # 600 staged + 300 + 300 > 1000
    assert quota.admit("other-device", chunk)
    counters.flush(parts.store)
    assert [(c.device_id, c.kind, c.reason, c.value) for c in message_counters.read(parts.store)] == [
        ("d", "capture", "refused", 1)
    ]


def test_bad_limits_are_refused_naming_the_setting(tmp_path: Path, store_url: str) -> None:
    settings = Parts(tmp_path, database_url=store_url).settings
    with pytest.raises(ConfigError, match="events_per_s must be positive"):
        settings.with_changes(events_per_s=0)
    with pytest.raises(ConfigError, match=r"chunk_bytes_burst \(10\) must hold at least one chunk"):
        settings.with_changes(chunk_bytes_burst=10)
