from __future__ import annotations

from pathlib import Path

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
