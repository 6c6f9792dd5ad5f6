from __future__ import annotations

from pathlib import Path

import pytest

from agent.conditions import DISK_FULL, Conditions
from agent.outbox import Outbox, OutboxSender


def test_rows_come_back_oldest_first_and_survive_reopen(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_records=10)
    for i in range(5):
        box.append("telemetry", f"t{i}".encode(), i)
    box.close()
    box = Outbox(tmp_path / "outbox.db", max_records=10)
    assert [r.payload for r in box.oldest(3)] == [b"t0", b"t1", b"t2"]
    first = box.oldest(1)[0]
    box.delete(first.id)
    assert [r.payload for r in box.oldest(10)] == [b"t1", b"t2", b"t3", b"t4"]
    assert [r.payload for r in box.oldest(10, after_id=first.id + 2)] == [b"t3", b"t4"]
    assert box.oldest(10)[0].kind == "telemetry"


def test_bound_drops_oldest_and_counts_persistently(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_records=3)
    dropped = [box.append("events", bytes([i]), i) for i in range(7)]
    assert dropped == [0, 0, 0, 1, 1, 1, 1]
    assert [r.payload for r in box.oldest(10)] == [bytes([4]), bytes([5]), bytes([6])]
    assert len(box) == 3 and box.dropped() == 4
    box.close()
    assert Outbox(tmp_path / "outbox.db", max_records=3).dropped() == 4


def test_sequence_numbers_survive_restart(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_records=3)
    assert [box.next_seq() for _ in range(3)] == [1, 2, 3]
    box.close()
    assert Outbox(tmp_path / "outbox.db", max_records=3).next_seq() == 4


class Ack:
    def __init__(self) -> None:
        self.done = False
        self.ok = False
        self.reason = ""


def test_sender_deletes_only_acknowledged_rows_in_order(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_records=100)
    for i in range(5):
        box.append("telemetry", bytes([i]), i)
    sent: list[tuple[bytes, Ack]] = []

    def publish(kind: str, payload: bytes) -> Ack:
        ack = Ack()
        sent.append((payload, ack))
        return ack

    now = [0.0]
    sender = OutboxSender(box, publish, window=2, clock=lambda: now[0])
    sender.pump(connected=False)
    assert sent == []
    sender.pump(connected=True)
    assert [p for p, _ in sent] == [b"\x00", b"\x01"]
    sender.pump(connected=True)
    assert len(sent) == 2, "window full"

    sent[0][1].done, sent[0][1].ok = True, True
    sent[1][1].done, sent[1][1].reason = True, "Not authorized"
    sender.pump(connected=True)
    assert [r.payload for r in box.oldest(10)] == [b"\x01", b"\x02", b"\x03", b"\x04"]
    assert len(sent) == 2, "paused after a refusal"

    now[0] = 100.0
    sender.pump(connected=True)
    assert [p for p, _ in sent[2:]] == [b"\x01", b"\x02"]


class Sent:
    """What a sender published, with the broker's answer set by the test."""

    def __init__(self) -> None:
        self.log: list[tuple[bytes, Ack]] = []

    def __call__(self, kind: str, payload: bytes) -> Ack:
        ack = Ack()
        self.log.append((payload, ack))
        return ack

    def payloads(self, since: int = 0) -> list[bytes]:
        return [p for p, _ in self.log[since:]]

    def puback_all(self) -> None:
        for _, ack in self.log:
            ack.done, ack.ok = True, True


def telemetry_box(tmp_path: Path, count: int) -> Outbox:
    box = Outbox(tmp_path / "outbox.db", max_records=100)
    for seq in range(1, count + 1):
        box.append("telemetry", f"w{seq}".encode(), seq, seq=seq)
    return box


def test_a_window_stays_until_the_controller_acknowledges_it_not_the_broker(tmp_path: Path) -> None:
    box = telemetry_box(tmp_path, 3)
    box.append("events", b"e", 4)
    sent = Sent()
    sender = OutboxSender(box, sent, window=8, clock=lambda: 0.0)
    sender.pump(connected=True)
    assert sent.payloads() == [b"w1", b"w2", b"w3", b"e"]
    sent.puback_all()
    sender.pump(connected=True)
    assert [r.payload for r in box.oldest(10)] == [b"w1", b"w2", b"w3"], "the event goes at PUBACK"
    assert len(sent.log) == 4, "nothing sent twice before the acknowledgement is due"

    sender.acknowledge([2, 3, 99])
    assert [r.payload for r in box.oldest(10)] == [b"w1"]
    box.close()
    assert [r.seq for r in Outbox(tmp_path / "outbox.db", max_records=100).oldest(10)] == [1]


def test_a_window_not_acknowledged_in_time_is_sent_again_and_so_are_all_after_a_reconnect(
    tmp_path: Path,
) -> None:
    box = telemetry_box(tmp_path, 3)
    now = [0.0]
    sent = Sent()
    sender = OutboxSender(box, sent, window=8, clock=lambda: now[0], ack_timeout_s=10.0)
    sender.pump(connected=True)
    sent.puback_all()
    sender.pump(connected=True)
    sender.acknowledge([1])
    now[0] = 9.9
    sender.pump(connected=True)
    assert len(sent.log) == 3
    now[0] = 10.0
    sender.pump(connected=True)
    assert sent.payloads(3) == [b"w2", b"w3"], "oldest first"

    sent.puback_all()
    sender.pump(connected=True)
    box.append("telemetry", b"w4", 4, seq=4)
    sender.link_up()
    sender.pump(connected=True)
    assert sent.payloads(5) == [b"w2", b"w3", b"w4"], "unacknowledged first, then the new window"
    sender.acknowledge([2, 3, 4])
    assert len(box) == 0


def test_sequence_numbers_continue_after_the_stored_windows(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_records=10)
    box.append("telemetry", b"w", 0, seq=41)
    box.close()
    assert Outbox(tmp_path / "outbox.db", max_records=10).next_seq() == 42


def test_an_outbox_that_cannot_be_opened_counts_records_and_opens_once_it_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agent.outbox.REOPEN_S", 0.0)
    folder = tmp_path / "not-yet"
    box = Outbox(folder / "outbox.db", max_records=10)
    assert box.append("telemetry", b"w1", 1, seq=box.next_seq()) == 0
    assert box.unwritable == 1 and len(box) == 0 and box.oldest(10) == [] and box.dropped() == 0

    folder.mkdir()
    box.append("telemetry", b"w2", 2, seq=box.next_seq())
    assert [(r.payload, r.seq) for r in box.oldest(10)] == [(b"w2", 2)]
    assert box.unwritable == 1
    box.close()


def test_a_write_refused_while_the_disk_shows_space_drops_the_oldest_telemetry_for_it(tmp_path: Path) -> None:
    """As under a disk quota (EDQUOT): statvfs shows room, yet the database may not grow."""
    conditions = Conditions()
    box = Outbox(tmp_path / "outbox.db", max_records=10_000, conditions=conditions)
    box.append("events", b"e" * 3000, 0)
    for seq in range(1, 101):
        box.append("telemetry", bytes(3000), seq, seq=seq)
    assert box._db is not None
    (pages,) = box._db.execute("PRAGMA page_count").fetchone()
    box._db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "database or disk is full"

    for seq in range(101, 121):
        box.append("telemetry", bytes(3000), seq, seq=seq)
    records = box.oldest(10_000)
    seqs = [r.seq for r in records if r.seq is not None]
    assert seqs[-20:] == list(range(101, 121)) and seqs[0] > 1, "the newest in place of the oldest"
    assert records[0].kind == "events", "telemetry goes first"
    assert box.unwritable == 0 and box.dropped_for_space() == seqs[0] - 1
    held = conditions.active()
    assert [c.kind for c in held] == [DISK_FULL] and "telemetry outbox" in held[0].message
