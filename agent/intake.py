"""Chunk intake: the artifact transfers under way and everything that arrives for them.

A transfer is one artifact (a model, or a version's sample inputs) being fetched. Its bytes
come two ways: answers to the device's own manifest and chunk requests, and the sealed
frames of its wave's broadcast (:mod:`agent.broadcast`), which the device opens with the
key its signed desired state carried. Each chunk is checked against the manifest's digest
as it is written (:class:`~agent.artifacts.ArtifactStore`); a corrupt one is counted and
asked for again, and too many fail the artifact.

What to request, when to listen and when a transfer is complete is the planner's to decide
(:mod:`agent.reconciler`, from :meth:`Intake.views`); the updater executes those steps and
asks this module to send them. A transfer's failure is the updater's to record: intake
calls ``fail(digest, reason)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgefleet_proto import artifact_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.topics import Kind

from agent.artifacts import ArtifactStore, Download
from agent.broadcast import Reception, open_chunk, open_manifest
from agent.diskspace import FreeSpace
from agent.errors import ArtifactError, ChunkRejected, DiskFull, SealRejected
from agent.reconciler import TransferView
from agent.state import Assignment

log = logging.getLogger(__name__)

# Corrupt chunks tolerated per transfer before the artifact is refused.
MAX_CHUNK_REJECTIONS = 64


class Publisher(Protocol):
    @property
    def connected(self) -> bool: ...

    def topic(self, kind: Kind) -> str: ...

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> Any: ...

    def listen(self, topics: frozenset[str]) -> None: ...


EmitEvent = Callable[[str, str, str, dict[str, str]], None]


def event_attrs(a: Assignment) -> dict[str, str]:
    """The attributes every event about an assignment carries."""
    return {
        "tenant": a.tenant,
        "model": a.model_name,
        "version": a.model_version,
        "digest": a.digest,
        "rollout_id": a.rollout_id,
    }


@dataclass
class Transfer:
    assignment: Assignment
    download: Download | None = None
    manifest_requested_at: float | None = None
    outstanding: dict[int, float] = field(default_factory=dict)
    rejected: int = 0
    # The assignment's sample inputs rather than its model.
    sample: bool = False
    # Its wave broadcast (agent.broadcast): subscribed since, last heard from (monotonic),
    # whether it said every chunk went out, and whether the controller heard we listen.
    reception: Reception | None = None
    listening: bool = False
    heard_at: float = -math.inf
    broadcast_done: bool = False
    told: bool = False
    # Where the chunks came from, and broadcast chunks refused by reason ("sealed", "digest").
    resumed: int = 0
    from_broadcast: int = 0
    from_requests: int = 0
    refused: dict[str, int] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return self.assignment.sample_digest if self.sample else self.assignment.digest

    @property
    def size(self) -> int:
        return self.assignment.sample_size if self.sample else self.assignment.size

    def broadcast_until(self, quiet_s: float) -> float:
        """Until when the broadcast may still bring chunks: ``quiet_s`` after it was last heard."""
        if not self.listening or self.broadcast_done:
            return -math.inf
        return self.heard_at + quiet_s

    def view(self, quiet_s: float = 0.0) -> TransferView:
        d = self.download
        return TransferView(
            digest=self.digest,
            has_manifest=d is not None,
            manifest_requested_at=self.manifest_requested_at,
            chunks=d.chunks if d else 0,
            have=frozenset(d.have) if d else frozenset(),
            outstanding=dict(self.outstanding),
            bytes_have=d.bytes_have if d else 0,
            bytes_total=d.size if d else self.size,
            listening=self.listening,
            broadcast_until=self.broadcast_until(quiet_s),
        )


class Intake:
    """The transfers under way, and the manifests, chunks and broadcast frames for them."""

    def __init__(
        self,
        device_id: str,
        artifacts: ArtifactStore,
        link: Publisher,
        emit: EmitEvent,
        space: FreeSpace,
        clock: Callable[[], float],
        fail: Callable[[str, str], None],
    ) -> None:
        self.device_id = device_id
        self.artifacts = artifacts
        self.link = link
        self.emit = emit
        self.space = space
        self.clock = clock
        self.fail = fail
        self.transfers: dict[str, Transfer] = {}
        # The wave broadcast topics the link was last told to subscribe to.
        self.listened: frozenset[str] = frozenset()

    def views(self, quiet_s: float) -> dict[str, TransferView]:
        """What the planner sees of each transfer."""
        return {d: t.view(quiet_s) for d, t in self.transfers.items()}

    # -- sent -------------------------------------------------------------------

    def request_manifest(self, t: Transfer) -> None:
        t.manifest_requested_at = self.clock()
        self._request(artifact_pb2.ChunkRequest(digest=t.digest, want_manifest=True))

    def request_chunks(self, digest: str, indices: Sequence[int]) -> None:
        t = self.transfers[digest]
        now = self.clock()
        for i in indices:
            t.outstanding[i] = now
        self._request(artifact_pb2.ChunkRequest(digest=digest, indices=indices))

    def listen(self, t: Transfer, reception: Reception | None) -> None:
        """Subscribe to the transfer's wave broadcast; its announcement brings the manifest."""
        t.reception = reception
        t.listening, t.told, t.heard_at = True, False, self.clock()
        self.follow_broadcasts()

    def follow_broadcasts(self) -> None:
        """Keep the link subscribed to the broadcasts of the transfers under way, and no other."""
        topics = frozenset(
            t.reception.topic for t in self.transfers.values() if t.listening and t.reception is not None
        )
        if topics != self.listened:
            self.link.listen(topics)
            self.listened = topics

    def ask_again(self) -> None:
        """Forget what is in flight, so it is asked for again (a new session, space back)."""
        for t in self.transfers.values():
            t.manifest_requested_at = None
            t.outstanding.clear()

    def on_link_up(self) -> None:
        # Requests in flight may be lost with the old session.
        self.ask_again()
        for t in self.transfers.values():
            # The broadcast's announcement comes again with the subscription: say we listen again.
            t.told = False

    def _request(self, request: artifact_pb2.ChunkRequest) -> None:
        self.link.publish(self.link.topic(Kind.ARTIFACT_REQUEST), encode(request))

    # -- received ---------------------------------------------------------------

    def on_artifact(self, resp: artifact_pb2.ArtifactResponse) -> None:
        body = resp.WhichOneof("body")
        if body == "manifest":
            self._on_manifest(resp.manifest)
        elif body == "chunk":
            self._on_chunk(resp.chunk)
        elif body == "error":
            t = self.transfers.get(resp.error.digest)
            if t is not None:
                self.fail(t.digest, f"controller cannot serve the artifact: {resp.error.reason}")

    def _on_manifest(self, manifest: artifact_pb2.ArtifactManifest) -> None:
        t = self.transfers.get(manifest.digest)
        if t is None or t.download is not None:
            return
        try:
            if not t.sample and manifest.format != t.assignment.format:
                raise ArtifactError(f"manifest format {manifest.format!r} is not {t.assignment.format!r}")
            t.download = self.artifacts.start(manifest.digest, manifest, t.size)
        except DiskFull as exc:
            # Not the artifact's fault: the manifest is asked for again once there is room.
            self.space.hit(str(exc))
            return
        except (ArtifactError, OSError) as exc:
            self.fail(manifest.digest, f"bad manifest: {exc}")
            return
        log.info(
            "manifest received device=%s digest=%s size=%d chunks=%d",
            self.device_id,
            manifest.digest[:12],
            manifest.size,
            t.download.chunks,
        )

    def _on_chunk(self, chunk: artifact_pb2.Chunk) -> None:
        t = self.transfers.get(chunk.digest)
        if t is None or t.download is None:
            return
        t.outstanding.pop(chunk.index, None)
        if chunk.index in t.download.have:
            return
        try:
            self.artifacts.write_chunk(t.download, chunk.index, chunk.offset, chunk.data)
            t.from_requests += 1
        except ChunkRejected as exc:
            t.rejected += 1
            log.warning(
                "chunk rejected device=%s digest=%s index=%d rejected=%d error=%s",
                self.device_id,
                chunk.digest[:12],
                chunk.index,
                t.rejected,
                exc,
            )
            attrs = {
                **event_attrs(t.assignment),
                "index": str(chunk.index),
                "rejected": str(t.rejected),
                "source": "request",
                "reason": "digest",
            }
            self.emit("chunk_rejected", "warning", str(exc), attrs)
            if t.rejected > MAX_CHUNK_REJECTIONS:
                self.fail(chunk.digest, f"more than {MAX_CHUNK_REJECTIONS} corrupt chunks")
        except DiskFull as exc:
            # The chunk is asked for again once there is room; requests stop until then.
            self.space.hit(str(exc))
        except OSError as exc:
            log.error(
                "chunk write failed device=%s digest=%s error=%s", self.device_id, chunk.digest[:12], exc
            )

    def on_wave_frame(self, topic: str, frame: artifact_pb2.WaveFrame) -> None:
        """A frame of a wave broadcast this device listens to: its announcement or a sealed chunk."""
        t = self.transfers.get(frame.digest)
        if t is None or t.reception is None or t.reception.topic != topic or not t.listening:
            return
        t.heard_at = self.clock()
        body = frame.WhichOneof("body")
        if body == "announcement":
            self._on_announcement(t, frame.announcement)
        elif body == "chunk":
            self._on_sealed_chunk(t, frame.chunk)

    def _on_announcement(self, t: Transfer, announcement: artifact_pb2.WaveAnnouncement) -> None:
        assert t.reception is not None
        if t.download is None:
            try:
                manifest = open_manifest(t.reception.key, t.digest, announcement)
            except SealRejected as exc:
                self._refused(t, "sealed", "manifest", exc)
                return
            if manifest.digest != t.digest:
                self._refused(t, "digest", "manifest", SealRejected("the manifest is for another artifact"))
                return
            self._on_manifest(manifest)
        if announcement.done:
            if not t.broadcast_done:
                log.info(
                    "broadcast ended device=%s digest=%s have=%d/%d",
                    self.device_id,
                    t.digest[:12],
                    len(t.download.have) if t.download else 0,
                    t.download.chunks if t.download else 0,
                )
            t.broadcast_done = True
        elif t.download is not None and not t.told and not t.download.complete:
            # Nothing comes back: the controller starts the broadcast once its wave listens.
            self._request(artifact_pb2.ChunkRequest(digest=t.digest, listening=True))
            t.told = True

    def _on_sealed_chunk(self, t: Transfer, sealed: artifact_pb2.SealedChunk) -> None:
        assert t.reception is not None
        d = t.download
        # Before the manifest a chunk can be neither placed nor checked: it is asked for later.
        if d is None or sealed.index in d.have or not 0 <= sealed.index < d.chunks:
            return
        try:
            data = open_chunk(t.reception.key, t.digest, d.manifest.chunk_size, sealed)
        except SealRejected as exc:
            self._refused(t, "sealed", str(sealed.index), exc)
            return
        offset, _ = d.chunk_range(sealed.index)
        try:
            self.artifacts.write_chunk(d, sealed.index, offset, data)
            t.from_broadcast += 1
        except ChunkRejected as exc:
            self._refused(t, "digest", str(sealed.index), exc)
        except DiskFull as exc:
            self.space.hit(str(exc))
        except OSError as exc:
            log.error("chunk write failed device=%s digest=%s error=%s", self.device_id, t.digest[:12], exc)

    def _refused(self, t: Transfer, reason: str, index: str, exc: Exception) -> None:
        """A broadcast chunk (or manifest) refused: counted by reason; what it should have brought
        is asked for by request once the broadcast ends."""
        t.refused[reason] = t.refused.get(reason, 0) + 1
        log.warning(
            "broadcast chunk rejected device=%s digest=%s index=%s reason=%s count=%d error=%s",
            self.device_id,
            t.digest[:12],
            index,
            reason,
            t.refused[reason],
            exc,
        )
        attrs = {
            **event_attrs(t.assignment),
            "index": index,
            "source": "broadcast",
            "reason": reason,
            "rejected": str(t.refused[reason]),
        }
        self.emit("chunk_rejected", "warning", str(exc), attrs)
