"""A three-node NATS JetStream cluster with its MQTT listener on, for tests of a clustered broker.

Debian's ``nats-server`` (2.9.x) runs each node in a temporary folder on free loopback
ports: a client port (unused by EdgeFleet, NATS needs one), a route port joining the
cluster, an MQTT port and a monitoring port (health checks). JetStream is on, and the
MQTT streams (sessions, retained messages, QoS 1 messages) are created with 3 replicas,
so the cluster keeps them with one node down.

Accounts mirror deploy/mosquitto/edgefleet.acl as far as NATS allows. NATS permissions are
per user and on subjects (MQTT topic ``a/b`` is subject ``a.b``), with no ``%u`` patterns:
each device gets its own user whose permissions name its own subtree, written here from
the same table as the ACL's device patterns (:data:`DEVICE_RIGHTS`). What NATS cannot
express is listed in docs/scaling.md ("NATS as the broker"): it binds no client id to the
username, and each user must be allowed to subscribe to ``$MQTT.sub.>``, the subjects
NATS delivers QoS 1 messages on.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet_proto.topics import PREFIX

from tests.support.broker import CONTROLLER_USER, DEPLOY, free_port, wait_for_port

CLUSTER_NAME = "edgefleet"
# NATS delivers an MQTT client's QoS 1 messages through a JetStream consumer whose delivery
# subject is under this prefix; without subscribe permission on it a QoS 1 SUBSCRIBE fails.
QOS1_DELIVERY = "$MQTT.sub.>"


def subject(topic: str) -> str:
    """The NATS subject of an MQTT topic filter (``/`` -> ``.``, ``+`` -> ``*``, ``#`` -> ``>``)."""
    return ".".join({"+": "*", "#": ">"}.get(level, level) for level in topic.split("/"))


def device_rights() -> list[tuple[str, str]]:
    """(access, topic under the device's own subtree) from the Mosquitto ACL's ``pattern`` lines,
    so the NATS accounts cannot drift from it."""
    rights = []
    prefix = f"{PREFIX}/%u/"
    for line in (DEPLOY / "edgefleet.acl").read_text().splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "pattern" and words[2].startswith(prefix):
            rights.append((words[1], words[2][len(prefix) :]))
    if not rights:
        raise RuntimeError("deploy/mosquitto/edgefleet.acl has no device patterns")
    return rights


DEVICE_RIGHTS = device_rights()
# The ACL's pattern lines outside the device's own subtree (wave broadcasts), read by every device.
SHARED_READS = [
    words[2]
    for words in (line.split() for line in (DEPLOY / "edgefleet.acl").read_text().splitlines())
    if len(words) == 3 and words[0] == "pattern" and words[1] == "read" and "%u" not in words[2]
]


def device_permissions(device_id: str, qos1: bool = True) -> dict[str, object]:
    """``qos1=False`` leaves out :data:`QOS1_DELIVERY`: every QoS 1 SUBSCRIBE is then refused,
    as NATS refuses them while its JetStream has no leader."""
    base = f"{PREFIX}/{device_id}/"
    publish = [subject(base + topic) for access, topic in DEVICE_RIGHTS if access in ("write", "readwrite")]
    subscribe = [subject(base + topic) for access, topic in DEVICE_RIGHTS if access in ("read", "readwrite")]
    subscribe += [subject(topic) for topic in SHARED_READS]
    delivery = [QOS1_DELIVERY] if qos1 else []
    return {"publish": {"allow": publish}, "subscribe": {"allow": [*delivery, *subscribe]}}


def fleet_permissions(qos1: bool = True) -> dict[str, object]:
    """The controller's (and the test tools'): the whole tree, as the ACL's ``edgefleet/#``."""
    tree = subject(f"{PREFIX.split('/')[0]}/#")
    delivery = [QOS1_DELIVERY] if qos1 else []
    return {"publish": {"allow": [tree]}, "subscribe": {"allow": [*delivery, tree]}}


@dataclass
class NatsNode:
    name: str
    workdir: Path
    client_port: int = field(default_factory=free_port)
    route_port: int = field(default_factory=free_port)
    mqtt_port: int = field(default_factory=free_port)
    monitor_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config_file(self) -> Path:
        return self.workdir / "nats.conf"

    @property
    def log_file(self) -> Path:
        return self.workdir / "nats.log"

    @property
    def address(self) -> str:
        """The node's MQTT listener as an agent's ``[mqtt] fallback_brokers`` entry."""
        return f"127.0.0.1:{self.mqtt_port}"

    def start(self) -> None:
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        if not Path(binary).exists():
            raise RuntimeError("nats-server is not installed: apt-get install -y nats-server")
        with (self.workdir / "stderr.log").open("ab") as err:
            self.proc = subprocess.Popen(
                [binary, "-c", str(self.config_file)], stdout=subprocess.DEVNULL, stderr=err
            )
        try:
            wait_for_port(self.mqtt_port, timeout=30)
        except TimeoutError:
            raise RuntimeError(f"nats-server {self.name} did not start:\n{self.log()}") from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Crash the node (SIGKILL): no goodbye to its clients or its peers."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def reload(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGHUP)

    def monitor(self, path: str) -> dict[str, object] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}{path}", timeout=2) as r:
                body: dict[str, object] = json.loads(r.read())
                return body
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def log(self, n: int = 4000) -> str:
        parts = [
            p.read_text(errors="replace") for p in (self.workdir / "stderr.log", self.log_file) if p.exists()
        ]
        return "\n".join(parts)[-n:]


@dataclass
class NatsCluster:
    workdir: Path
    size: int = 3
    nodes: list[NatsNode] = field(default_factory=list)
    # username -> (password, permissions)
    users: dict[str, tuple[str, dict[str, object]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.nodes:
            self.nodes = [NatsNode(f"n{i}", self.workdir / f"n{i}") for i in range(self.size)]

    def add_controller(self, password: str, username: str = CONTROLLER_USER, qos1: bool = True) -> None:
        self.users[username] = (password, fleet_permissions(qos1))
        self._reconfigure()

    def add_tool_user(self, username: str, password: str) -> None:
        """An account with the controller's rights, for observers beside the controller."""
        self.users[username] = (password, fleet_permissions())
        self._reconfigure()

    def add_devices(self, credentials: Iterable[tuple[str, str]], qos1: bool = True) -> None:
        """(device id, password) pairs: each device its own user, rights on its own subtree."""
        for device_id, password in credentials:
            self.users[device_id] = (password, device_permissions(device_id, qos1))
        self._reconfigure()

    def render(self, node: NatsNode) -> str:
        routes = ", ".join(f'"nats-route://127.0.0.1:{n.route_port}"' for n in self.nodes)
        users = [
            {"user": name, "password": password, "permissions": perms, "allowed_connection_types": ["MQTT"]}
            for name, (password, perms) in sorted(self.users.items())
        ]
        # JSON is valid NATS configuration syntax for values.
        authorization = f"authorization {{ users: {json.dumps(users)} }}"
        return "\n".join(
            [
                f"server_name: {node.name}",
                f"listen: 127.0.0.1:{node.client_port}",
                f"http: 127.0.0.1:{node.monitor_port}",
                f"log_file: {json.dumps(str(node.log_file))}",
                "jetstream {",
                f"  store_dir: {json.dumps(str(node.workdir / 'jetstream'))}",
                "  max_memory_store: 268435456",
                "  max_file_store: 2147483648",
                "}",
                "cluster {",
                f"  name: {CLUSTER_NAME}",
                f"  listen: 127.0.0.1:{node.route_port}",
                f"  routes: [{routes}]",
                "}",
                "mqtt {",
                f"  listen: 127.0.0.1:{node.mqtt_port}",
                f"  stream_replicas: {self.size}",
                "}",
                authorization,
                "",
            ]
        )

    def _reconfigure(self) -> None:
        for node in self.nodes:
            node.workdir.mkdir(parents=True, exist_ok=True)
            node.config_file.write_text(self.render(node))
            node.reload()
        if any(node.alive() for node in self.nodes):
            # A reload is applied between the server's loops: give each node a moment.
            time.sleep(0.5)

    def start(self, timeout: float = 60.0, tries: int = 3) -> NatsCluster:
        if not self.users:
            raise RuntimeError("add the controller's account before starting the cluster")
        for attempt in range(1, tries + 1):
            self._reconfigure()
            try:
                for node in self.nodes:
                    node.start()
                self.wait_ready(timeout)
                return self
            except RuntimeError as exc:
                self.stop()
                # Another process took a port between free_port() and the bind: new ports for all,
                # since every node names every route port.
                if "address already in use" not in str(exc) or attempt == tries:
                    raise
                for node in self.nodes:
                    shutil.rmtree(node.workdir / "jetstream", ignore_errors=True)
                self.nodes = [NatsNode(n.name, n.workdir) for n in self.nodes]
        raise AssertionError("unreachable")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Every live node sees a JetStream meta leader among all the cluster's peers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.proc is not None and node.proc.poll() is not None:
                    raise RuntimeError(f"nats-server {node.name} exited:\n{node.log()}")
            if all(self._node_ready(n) for n in self.nodes if n.alive()):
                return
            time.sleep(0.2)
        logs = "\n".join(f"--- {n.name}\n{n.log()}" for n in self.nodes)
        raise TimeoutError(f"the NATS cluster has no JetStream leader after {timeout}s:\n{logs}")

    def meta_leader(self) -> NatsNode:
        """The node that leads JetStream's metadata now: killing it makes the cluster elect
        another, the hardest single-node failure for the MQTT state JetStream keeps."""
        for node in self.nodes:
            jsz = node.monitor("/jsz") if node.alive() else None
            meta = jsz.get("meta_cluster") if jsz else None
            leader = meta.get("leader") if isinstance(meta, dict) else None
            if leader:
                return next(n for n in self.nodes if n.name == leader)
        raise RuntimeError("no live node names a JetStream leader")

    def _node_ready(self, node: NatsNode) -> bool:
        jsz = node.monitor("/jsz")
        meta = jsz.get("meta_cluster") if jsz else None
        return isinstance(meta, dict) and bool(meta.get("leader")) and meta.get("cluster_size") == self.size

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.log()}" for n in self.nodes)
