"""The device's side of the contract: its MQTT link, outbox and updater, and what each inbound message does.

:class:`Session` owns no thread and no process concern. The agent's service
(:mod:`agent.service`) is a session that also serves models, runs tenant
pipelines and talks to systemd; the fleet simulator of the test suite runs
thousands of sessions in a few processes, each on its own broker login, so the
simulated devices speak exactly this code and cannot drift from the agent.

A subclass sets ``device_id``, ``link``, ``outbox``, ``sender``, ``updater`` and
``window_began`` before using it, says what goes into a telemetry window
(:meth:`_telemetry`), and may override :meth:`_desired_taken` to act on a desired
state the updater took (the service configures its observer and tenants there).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from edgefleet_proto import artifact_pb2, fleet_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.topics import Kind

from agent.errors import OutboxError
from agent.link import Inbound, Link, LinkDown, LinkUp, Publication, Rejected, WaveInbound, now_ms
from agent.outbox import Outbox, OutboxSender
from agent.telemetry import build_telemetry
from agent.updater import Updater

log = logging.getLogger(__name__)


class Session:
    device_id: str
    link: Link
    outbox: Outbox
    sender: OutboxSender
    updater: Updater
    # Start of the telemetry window in progress, on the monotonic clock: a window lasts
    # what that clock says, so a jump of the device's clock never stretches or inverts one.
    window_began: float

    def _publish_record(self, kind: str, payload: bytes) -> Publication:
        return self.link.publish(self.link.topic(Kind(kind)), payload)

    def emit(self, kind: str, severity: str, message: str, attributes: dict[str, str]) -> None:
        event = fleet_pb2.Event(
            device_id=self.device_id,
            at_ms=now_ms(),
            kind=kind,
            severity=severity,
            message=message,
            attributes=attributes,
        )
        try:
            self.outbox.append(Kind.EVENTS.value, encode(event), event.at_ms)
        except OutboxError as exc:
            # An event that cannot be stored (a full disk) is lost, not the step that emitted it.
            log.error("event not stored device=%s kind=%s error=%s", self.device_id, kind, exc)

    def _handle(self, event: Any) -> None:
        try:
            self._dispatch(event)
        except Exception:
            # No message may kill the agent (a retained one would do it again at
            # every start): what failed is logged with its traceback, the loop goes on.
            log.exception("inbound message failed device=%s event=%s", self.device_id, type(event).__name__)

    def _dispatch(self, event: Any) -> None:
        if isinstance(event, Inbound):
            if isinstance(event.message, fleet_pb2.DesiredState):
                refused = self.updater.on_desired(event.message)
                if refused:
                    # The generation lets the controller tell which of its states was refused.
                    generation = str(event.message.generation)
                    self._payload_rejected(Kind.DESIRED.value, refused, generation=generation)
                elif int(event.message.generation) == self.updater.state.desired_generation:
                    # Not for an older (replayed) state: it must not undo the newer one's tenants
                    # and monitoring. The same generation again (retained, after a restart) does.
                    self._desired_taken(event.message)
            elif isinstance(event.message, artifact_pb2.ArtifactResponse):
                self.updater.intake.on_artifact(event.message)
            elif isinstance(event.message, fleet_pb2.TelemetryAck):
                self.sender.acknowledge(event.message.seqs)
        elif isinstance(event, WaveInbound):
            self.updater.intake.on_wave_frame(event.topic, event.frame)
        elif isinstance(event, Rejected):
            self._payload_rejected(event.topic, event.reason)
        elif isinstance(event, LinkUp):
            self._request_desired()
            self.updater.on_link_up()
            self.sender.link_up()
        elif isinstance(event, LinkDown):
            log.info("working offline device=%s reason=%s", self.device_id, event.reason)

    def _desired_taken(self, msg: fleet_pb2.DesiredState) -> None:
        """The updater took ``msg`` as the newest desired state (or saw it again)."""

    def _request_desired(self) -> None:
        """Ask the controller for this device's desired state at every connection, beside the
        broker's retained copy: a broker that lost it (or a cluster node that never had it)
        must not leave the device behind. The answer is verified like any desired state."""
        request = fleet_pb2.DesiredRequest(
            device_id=self.device_id,
            applied_generation=max(0, self.updater.state.desired_generation),
        )
        self.link.publish(self.link.topic(Kind.DESIRED_REQUEST), encode(request))

    def _payload_rejected(self, topic: str, reason: str, **attributes: str) -> None:
        log.warning("payload rejected device=%s topic=%s error=%s", self.device_id, topic, reason)
        self.emit("payload_rejected", "warning", reason, {"topic": topic, **attributes})

    def _close_window(self) -> None:
        """Send the window in progress, stamped by the device's clock as it ends (a jump of that
        clock moves the windows after it, as the controller should see them) and as long as the
        monotonic clock says it lasted."""
        began, self.window_began = self.window_began, time.monotonic()
        end = now_ms()
        self._telemetry(end - round((self.window_began - began) * 1000), end)

    def _telemetry(self, window_start: int, window_end: int) -> None:
        """Queue the window from ``window_start`` to ``window_end`` (ms): :meth:`queue_telemetry`
        with what the device measured in it."""
        raise NotImplementedError

    def queue_telemetry(
        self,
        window_start_ms: int,
        window_end_ms: int,
        system: fleet_pb2.SystemStats,
        models: list[fleet_pb2.ModelStats],
        tenants: list[fleet_pb2.TenantStats] | None = None,
        shadows: list[fleet_pb2.ShadowStats] | None = None,
        drift: list[fleet_pb2.DriftSketch] | None = None,
    ) -> fleet_pb2.Telemetry:
        """Number one telemetry window and store it in the outbox, whence the sender publishes it."""
        telemetry = build_telemetry(
            self.device_id,
            self.outbox.next_seq(),
            window_start_ms,
            window_end_ms,
            system,
            models,
            self.outbox.dropped(),
            tenants,
            shadows,
            drift,
        )
        telemetry.outbox_unwritable = self.outbox.unwritable
        telemetry.outbox_dropped_for_space = self.outbox.dropped_for_space()
        dropped = self.outbox.append(
            Kind.TELEMETRY.value, encode(telemetry), window_end_ms, seq=telemetry.seq
        )
        if dropped:
            log.warning("outbox full device=%s dropped=%d", self.device_id, dropped)
        return telemetry
