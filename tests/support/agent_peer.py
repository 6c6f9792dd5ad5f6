"""The controller's side of the protocol, small enough to read in one go.

Logged in as ``edgefleet-controller``, it publishes a retained DesiredState signed
whole with its Ed25519 key (assignments signed too, unless a test asks otherwise)
and answers ChunkRequests from model files on disk, like the real controller does.
It records what it saw (requests, reported states, telemetry, events) so tests
can assert on the conversation. Knobs let a test make it misbehave on purpose:
corrupt a chunk once, stop answering after N chunks.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from edgefleet_proto import artifact_pb2, fleet_pb2
from edgefleet_proto.codec import decode, encode
from edgefleet_proto.signing import desired_bytes, key_id, manifest_bytes
from edgefleet_proto.topics import Kind, Topic
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.broker import CONTROLLER_USER, Broker
from tests.support.waiting import wait_until


def public_key(key: Ed25519PrivateKey) -> bytes:
    """The raw 32 bytes an agent pins."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign_state(key: Ed25519PrivateKey, desired: fleet_pb2.DesiredState) -> fleet_pb2.DesiredState:
    """``desired`` signed whole by ``key``, as the controller publishes it."""
    desired.state_key_id = key_id(public_key(key))
    desired.state_signature = key.sign(desired_bytes(desired))
    return desired


@dataclass
class Served:
    path: Path
    manifest: artifact_pb2.ArtifactManifest


@dataclass
class Peer:
    broker: Broker
    device_id: str
    chunk_size: int = 4096
    artifacts: dict[str, Served] = field(default_factory=dict)
    requests: list[artifact_pb2.ChunkRequest] = field(default_factory=list)
    reported: list[fleet_pb2.ReportedState] = field(default_factory=list)
    statuses: list[fleet_pb2.DeviceStatus] = field(default_factory=list)
    telemetry: list[fleet_pb2.Telemetry] = field(default_factory=list)
    events: list[fleet_pb2.Event] = field(default_factory=list)
    corrupt_once: set[tuple[str, int]] = field(default_factory=set)
    # Chunks whose first request goes unanswered (lost in flight).
    drop_once: set[tuple[str, int]] = field(default_factory=set)
    serve_limit: int | None = None
    # Per digest, the most chunks served (e.g. a sample left half downloaded).
    digest_limits: dict[str, int] = field(default_factory=dict)
    chunks_sent: int = 0
    sent: list[tuple[str, int]] = field(default_factory=list)
    paused: threading.Event = field(default_factory=threading.Event)
    # A persistent session: the broker keeps what arrives while the peer is away.
    persistent: bool = False
    # Acknowledge each telemetry window as stored, as the controller does once it stored it.
    ack_telemetry: bool = True
    # The controller's signing key; a test may swap it (a rotation) between publications.
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        password = uuid.uuid4().hex
        self.broker.add_user(CONTROLLER_USER, password)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"peer-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.username_pw_set(CONTROLLER_USER, password)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.connected = threading.Event()
        props = None
        if self.persistent:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", self.broker.port, clean_start=not self.persistent, properties=props)
        self.client.loop_start()
        wait_until(self.connected.is_set, 10, "peer connected")

    def topic(self, kind: Kind, device_id: str | None = None) -> str:
        return str(Topic(device_id or self.device_id, kind))

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        kinds = (Kind.ARTIFACT_REQUEST, Kind.REPORTED, Kind.STATUS, Kind.TELEMETRY, Kind.EVENTS)
        client.subscribe([(self.topic(k), 1) for k in kinds])
        self.connected.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    # -- artifacts ------------------------------------------------------------

    def add_artifact(self, path: Path, fmt: str = "onnx", claim_digest: str | None = None) -> str:
        """Serve ``path``; with ``claim_digest`` the manifest lies about the whole-file digest."""
        data = path.read_bytes()
        digest = claim_digest or hashlib.sha256(data).hexdigest()
        hashes = [
            hashlib.sha256(data[i : i + self.chunk_size]).digest()
            for i in range(0, len(data), self.chunk_size)
        ]
        manifest = artifact_pb2.ArtifactManifest(
            digest=digest, size=len(data), chunk_size=self.chunk_size, chunk_sha256=hashes, format=fmt
        )
        self.artifacts[digest] = Served(path, manifest)
        return digest

    def _answer(self, req: artifact_pb2.ChunkRequest) -> None:
        served = self.artifacts.get(req.digest)
        out = self.topic(Kind.ARTIFACT_RESPONSE)
        if served is None:
            err = artifact_pb2.ArtifactError(digest=req.digest, reason="unknown digest")
            self.client.publish(out, encode(artifact_pb2.ArtifactResponse(error=err)), qos=1)
            return
        if req.want_manifest:
            self.client.publish(out, encode(artifact_pb2.ArtifactResponse(manifest=served.manifest)), qos=1)
        for index in req.indices:
            with self.lock:
                if self.serve_limit is not None and self.chunks_sent >= self.serve_limit:
                    return
                limit = self.digest_limits.get(req.digest)
                if limit is not None and sum(1 for d, _ in self.sent if d == req.digest) >= limit:
                    return
                if (req.digest, index) in self.drop_once:
                    self.drop_once.discard((req.digest, index))
                    continue
                self.chunks_sent += 1
                self.sent.append((req.digest, index))
                corrupt = (req.digest, index) in self.corrupt_once
                self.corrupt_once.discard((req.digest, index))
            offset = index * served.manifest.chunk_size
            with open(served.path, "rb") as f:  # one chunk from disk, never the whole file
                f.seek(offset)
                data = f.read(served.manifest.chunk_size)
            if corrupt:
                data = bytes(b ^ 0xFF for b in data)
            chunk = artifact_pb2.Chunk(digest=req.digest, index=index, offset=offset, data=data)
            self.client.publish(out, encode(artifact_pb2.ArtifactResponse(chunk=chunk)), qos=1)

    # -- desired state --------------------------------------------------------

    def publish_desired(self, generation: int, *models: fleet_pb2.ModelAssignment) -> None:
        self.publish_state(
            fleet_pb2.DesiredState(
                device_id=self.device_id,
                generation=generation,
                models=models,
                issued_at_ms=int(time.time() * 1000),
            )
        )

    def publish_state(self, desired: fleet_pb2.DesiredState) -> None:
        """Publish ``desired`` (retained) signed with the peer's key."""
        signed = encode(sign_state(self.key, desired))
        self.client.publish(self.topic(Kind.DESIRED), signed, qos=1, retain=True).wait_for_publish(10)

    def assignment(
        self,
        digest: str,
        version: str,
        name: str = "linear",
        tenant: str = "default",
        signed: bool = True,
        sample: Path | None = None,
        signature: fleet_pb2.ModelSignature | None = None,
    ) -> Any:
        """An assignment of a served artifact; ``sample`` (an .npz) is served and attached too."""
        served = self.artifacts[digest]
        m = fleet_pb2.ModelAssignment(
            tenant=tenant,
            model_name=name,
            model_version=version,
            artifact_digest=digest,
            artifact_size=served.manifest.size,
            format="onnx",
            runtime="onnxruntime",
            rollout_id=f"r-{version}",
        )
        if sample is not None:
            m.sample_digest = self.add_artifact(sample, fmt="npz")
            m.sample_size = sample.stat().st_size
        if signature is not None:
            m.model_signature.CopyFrom(signature)
        if signed:
            m.key_id = key_id(public_key(self.key))
            m.signature = self.key.sign(manifest_bytes(name, version, "", digest, served.manifest.size))
        return m

    def publish_raw(self, kind: Kind, payload: bytes, retain: bool = False) -> None:
        self.client.publish(self.topic(kind), payload, qos=1, retain=retain).wait_for_publish(10)

    # -- what the agent said --------------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        kind = Topic.parse(msg.topic).kind
        message = decode(kind, bytes(msg.payload))
        with self.lock:
            if kind == Kind.ARTIFACT_REQUEST:
                self.requests.append(message)  # type: ignore[arg-type]
            elif kind == Kind.REPORTED:
                self.reported.append(message)  # type: ignore[arg-type]
            elif kind == Kind.STATUS:
                self.statuses.append(message)  # type: ignore[arg-type]
            elif kind == Kind.TELEMETRY:
                self.telemetry.append(message)  # type: ignore[arg-type]
            elif kind == Kind.EVENTS:
                self.events.append(message)  # type: ignore[arg-type]
        if kind == Kind.ARTIFACT_REQUEST and not self.paused.is_set():
            self._answer(message)  # type: ignore[arg-type]
        if kind == Kind.TELEMETRY and self.ack_telemetry:
            ack = fleet_pb2.TelemetryAck(device_id=self.device_id, seqs=[message.seq])  # type: ignore[attr-defined]
            self.client.publish(self.topic(Kind.TELEMETRY_ACK), encode(ack), qos=1)

    def requested_indices(self, digest: str, since: int = 0) -> list[int]:
        with self.lock:
            return [i for r in self.requests[since:] if r.digest == digest for i in r.indices]

    def last_reported(self) -> fleet_pb2.ReportedState | None:
        with self.lock:
            return self.reported[-1] if self.reported else None

    def entry(self, tenant: str, digest: str) -> fleet_pb2.ModelStatus | None:
        last = self.last_reported()
        if last is None:
            return None
        return next((m for m in last.models if m.tenant == tenant and m.artifact_digest == digest), None)

    def wait_active(
        self, digest: str, tenant: str = "default", timeout: float = 30.0
    ) -> fleet_pb2.ReportedState:
        def active() -> fleet_pb2.ReportedState | None:
            e = self.entry(tenant, digest)
            return self.last_reported() if e is not None and e.phase == fleet_pb2.MODEL_PHASE_ACTIVE else None

        return wait_until(active, timeout, f"{tenant} active on {digest[:12]}")

    def event_kinds(self) -> list[str]:
        with self.lock:
            return [e.kind for e in self.events]
