"""A controller in the test's process (FastAPI app and MQTT transport) over a real Mosquitto,
and plain paho clients connected as its devices."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from paho.mqtt.client import MQTTMessage

from controller import settings as settings_mod
from controller.api import create_app
from controller.service import Controller, InitOptions, initialise
from controller.settings import Settings
from tests.support.broker import Broker
from tests.support.mqtt_peer import Peer
from tests.support.waiting import wait_until


def connect(port: int, username: str, password: str, client_id: str | None = None) -> Peer:
    """Connect, retrying while mosquitto has not yet reloaded its password file."""

    def attempt() -> Peer | None:
        try:
            return Peer(port, username, password, client_id=client_id)
        except (TimeoutError, ConnectionError, OSError):
            return None

    return wait_until(attempt, 10, f"{username} to connect")


def messages_on(peer: Peer, topic: str) -> list[MQTTMessage]:
    return [m for m in list(peer.messages) if m.topic == topic]


@dataclass
class Ctl:
    """The controller under test and a client that sends the admin token."""

    settings: Settings
    token: str
    client: TestClient
    broker: Broker

    @property
    def controller(self) -> Controller:
        controller: Controller = self.client.app.state.controller  # type: ignore[attr-defined]
        return controller

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token}", **kwargs.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kwargs)

    def upload(self, path: Path, name: str, version: str, metadata: str = "{}") -> Any:
        with path.open("rb") as f:
            return self.api(
                "POST",
                f"/v1/models/{name}/versions",
                data={"version": version, "metadata": metadata},
                files={"file": (path.name, f, "application/octet-stream")},
            )

    def register(self, device_id: str, tags: list[str] | None = None) -> dict[str, Any]:
        response = self.api("POST", "/v1/devices", json={"device_id": device_id, "tags": tags or []})
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    def device_peer(self, credentials: dict[str, Any]) -> Peer:
        return connect(
            self.broker.port,
            credentials["mqtt_username"],
            credentials["mqtt_password"],
            client_id=f"{credentials['device_id']}-test",
        )

    def controller_peer(self, client_id: str = "test-as-controller") -> Peer:
        """A client with the controller's rights, beside the running controller (its own account:
        a login with the controller's credentials would take the controller's session over)."""
        return connect(self.broker.port, client_id, self.broker.add_tool_user(client_id), client_id)


def init_controller(broker: Broker, data_dir: Path, **options: Any) -> tuple[Settings, str]:
    token = initialise(
        data_dir,
        InitOptions(
            broker_port=broker.port,
            mosquitto_passwd_file=broker.passwd_file,
            broker_reload_command=broker.reload_command,
            **options,
        ),
    )
    return settings_mod.load(data_dir), token


@contextmanager
def running(broker: Broker, settings: Settings, token: str) -> Iterator[Ctl]:
    with TestClient(create_app(settings)) as client:
        ctl = Ctl(settings, token, client, broker)
        transport = ctl.controller.transport
        assert transport is not None and transport.wait_connected(15), "controller never reached the broker"
        yield ctl
