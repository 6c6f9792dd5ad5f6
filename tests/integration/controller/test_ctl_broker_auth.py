"""The controller as a broker cluster's authentication and authorization service, called the way
EMQX 5's HTTP authenticator and authorizer call it (POST, a JSON body filled from their
placeholders, the secret in a header): in process for the rules, and on the real controller
process for the comparison with what the real Mosquitto decides with deploy/mosquitto/edgefleet.acl."""

from __future__ import annotations

import hashlib
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
import tomli_w
from paho.mqtt.reasoncodes import ReasonCode

from tests.support.broker import CONTROLLER_USER, Broker
from tests.support.controller_process import connect, init_controller, running
from tests.support.localfleet import Controller
from tests.support.waiting import wait_until

SECRET = "a-broker-secret-only-the-broker-knows"
SECRET_SHA256 = hashlib.sha256(SECRET.encode()).hexdigest()
HEADER = "X-Broker-Secret"


@dataclass
class Service:
    """The controller's HTTP side as a broker and an operator reach it."""

    http: httpx.Client
    token: str
    controller_password: str

    def register(self, device_id: str) -> str:
        created = self.http.post(
            "/v1/devices",
            json={"device_id": device_id, "tags": []},
            headers={"Authorization": f"Bearer {self.token}"},
        )
        assert created.status_code == 201, created.text
        return str(created.json()["mqtt_password"])


@pytest.fixture
def service(broker: Broker, tmp_path: Path) -> Iterator[Service]:
    settings, token = init_controller(broker, tmp_path / "controller")
    with running(broker, settings.with_changes(broker_auth_secret_sha256=SECRET_SHA256), token) as ctl:
        yield Service(ctl.client, token, settings.mqtt_password)


@pytest.fixture
def process(broker: Broker, tmp_path: Path) -> Iterator[Service]:
    """The real controller process, configured by its controller.toml."""
    c = Controller(
        tmp_path / "controller",
        broker.port,
        passwd_file=broker.passwd_file,
        reload_command=broker.reload_command,
    )
    c.init()
    settings = c.data_dir / "controller.toml"
    doc = tomllib.loads(settings.read_text())
    doc["broker_auth_secret_sha256"] = SECRET_SHA256
    settings.write_text(tomli_w.dumps(doc))
    c.start()
    try:
        with httpx.Client(base_url=c.url, timeout=10) as http:
            yield Service(http, c.token, c.mqtt_password())
    finally:
        c.stop()


def ask(service: Service, route: str, body: dict[str, str], secret: str | None = SECRET) -> httpx.Response:
    """One request as EMQX sends it: POST, JSON, the configured header."""
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers[HEADER] = secret
    return service.http.post(f"/broker/{route}", json=body, headers=headers)


def result(response: httpx.Response) -> str:
    # EMQX reads the body only from a 200 (or 204) with a JSON content type.
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["is_superuser"] is False
    return str(body["result"])


def login(service: Service, username: str, password: str, clientid: str | None = None) -> str:
    body = {
        "username": username,
        "password": password,
        "clientid": username if clientid is None else clientid,
    }
    return result(ask(service, "authenticate", body))


def access(service: Service, username: str, topic: str, action: str, clientid: str | None = None) -> str:
    body = {"username": username, "clientid": username if clientid is None else clientid, "topic": topic}
    return result(ask(service, "authorize", {**body, "action": action}))


def test_a_login_is_allowed_only_with_the_accounts_password_and_its_own_client_id(service: Service) -> None:
    password = service.register("dev-a")
    service.register("dev-b")
    assert login(service, "dev-a", password) == "allow"
    assert login(service, CONTROLLER_USER, service.controller_password) == "allow"

    assert login(service, "dev-a", password + "x") == "deny"
    assert login(service, "dev-a", "") == "deny"
    # The client id is bound to the username: dev-a cannot take dev-b's or the controller's session.
    assert login(service, "dev-a", password, clientid="dev-b") == "deny"
    assert login(service, "dev-a", password, clientid=CONTROLLER_USER) == "deny"
    assert login(service, "dev-b", password) == "deny"
    assert login(service, CONTROLLER_USER, password) == "deny"
    assert login(service, "never-registered", password) == "deny"
    assert login(service, "../dev-a", password) == "deny"


def test_only_a_caller_with_the_broker_secret_is_answered_and_nothing_is_audited(service: Service) -> None:
    password = service.register("dev-a")
    body = {"username": "dev-a", "password": password, "clientid": "dev-a"}
    for secret in (None, "wrong", SECRET.upper()):
        refused = ask(service, "authenticate", body, secret=secret)
        assert refused.status_code == 401 and HEADER in refused.json()["detail"], refused.text
    # An operator's token is not the broker's secret.
    as_admin = service.http.post(
        "/broker/authorize",
        json={
            "username": "dev-a",
            "clientid": "dev-a",
            "topic": "edgefleet/v1/devices/dev-a/events",
            "action": "publish",
        },
        headers={"Authorization": f"Bearer {service.token}"},
    )
    assert as_admin.status_code == 401, as_admin.text
    # A body EMQX's template did not fill is refused (EMQX takes a 422 as 'ignore').
    assert ask(service, "authenticate", {"username": "dev-a", "clientid": "dev-a"}).status_code == 422

    for _ in range(3):
        assert result(ask(service, "authenticate", body)) == "allow"
    audited = service.http.get(
        "/v1/audit", params={"limit": 1000}, headers={"Authorization": f"Bearer {service.token}"}
    ).json()
    assert [e["route"] for e in audited] == ["/v1/devices"], audited


def test_an_unconfigured_controller_refuses_every_caller_which_a_broker_takes_as_no_answer(
    broker: Broker, tmp_path: Path
) -> None:
    settings, token = init_controller(broker, tmp_path / "controller")
    with running(broker, settings, token) as ctl:
        answer = ask(
            Service(ctl.client, token, ""),
            "authenticate",
            {"username": "d", "password": "p", "clientid": "d"},
        )
        assert answer.status_code == 401 and "broker_auth_secret_sha256" in answer.json()["detail"]


def topics(device: str, other: str) -> list[str]:
    base = "edgefleet/v1/devices"
    kinds = [
        "desired", "desired/request", "reported", "status", "telemetry", "telemetry/ack", "events",
        "artifact/request", "artifact/response", "results/tenant-1", "results/a/b", "capture", "unknown",
    ]  # fmt: skip
    return [f"{base}/{device}/{k}" for k in kinds] + [
        f"{base}/{other}/desired",
        f"{base}/{other}/telemetry",
        f"{base}/{other}/results/tenant-1",
        f"{base}/{device}",
        "edgefleet/v1/fleet",
        "other/topic",
    ]


def mosquitto_subscribe(client: mqtt.Client, topic: str) -> ReasonCode:
    done = threading.Event()
    codes: list[ReasonCode] = []

    def on_subscribe(c: mqtt.Client, u: object, mid: int, rcs: list[ReasonCode], p: object) -> None:
        codes.extend(rcs)
        done.set()

    client.on_subscribe = on_subscribe
    client.subscribe(topic, qos=1)
    assert done.wait(10), f"no SUBACK for {topic}"
    return codes[0]


@pytest.mark.slow
def test_each_publish_and_subscribe_gets_the_answer_mosquitto_gives_with_the_deploy_acl(
    broker: Broker, process: Service
) -> None:
    """Mosquitto's answers: a publish's PUBACK, and for a subscription whether a message published
    there reaches the device (Mosquitto grants a SUBSCRIBE and checks read rights per message)."""
    password = process.register("dev-a")
    process.register("dev-b")
    device = connect(broker.port, "dev-a", password, client_id="dev-a")
    tool = connect(broker.port, "acl-probe", broker.add_tool_user("acl-probe"), client_id="acl-probe")
    # Published by the tool after each probe: once it arrives, an allowed probe has arrived before it.
    marker = "edgefleet/v1/devices/dev-a/telemetry/ack"
    device.subscribe(marker)
    try:
        for i, topic in enumerate(topics("dev-a", "dev-b")):
            published = device.publish(topic, b"x")
            mosquitto = "deny" if published.is_failure else "allow"
            assert access(process, "dev-a", topic, "publish") == mosquitto, ("publish", topic, published)

            granted = not mosquitto_subscribe(device.client, topic).is_failure
            probe, done = f"probe-{i}".encode(), f"marker-{i}".encode()
            tool.publish(topic, probe)
            tool.publish(marker, done)
            wait_until(lambda d=done: any(m.payload == d for m in list(device.messages)), 10, "the marker")
            read = granted and any(m.topic == topic and m.payload == probe for m in list(device.messages))
            mosquitto = "allow" if read else "deny"
            assert access(process, "dev-a", topic, "subscribe") == mosquitto, ("subscribe", topic, granted)
    finally:
        device.close()
        tool.close()


def test_wildcards_other_actions_and_the_controllers_tree(service: Service) -> None:
    service.register("dev-a")
    # Stricter than Mosquitto, which grants a wildcard filter and then filters each message:
    # a device names its topics exactly.
    assert access(service, "dev-a", "edgefleet/v1/devices/dev-a/#", "subscribe") == "deny"
    assert access(service, "dev-a", "edgefleet/v1/devices/dev-a/+", "subscribe") == "deny"
    # The client id is the username here too, and only the contract's two actions are known.
    own = "edgefleet/v1/devices/dev-a/telemetry"
    assert access(service, "dev-a", own, "publish") == "allow"
    assert access(service, "dev-a", own, "publish", clientid="dev-b") == "deny"
    assert access(service, "dev-a", own, "all") == "deny"
    unknown = "edgefleet/v1/devices/never-registered/telemetry"
    assert access(service, "never-registered", unknown, "publish") == "deny"

    # The controller owns the tree, shared subscriptions of its ingest processes included.
    for topic in ("edgefleet/v1/devices/dev-a/desired", "edgefleet/v1/devices/+/telemetry"):
        for action in ("publish", "subscribe"):
            assert access(service, CONTROLLER_USER, topic, action) == "allow", (topic, action)
    shared = "$share/ingest/edgefleet/v1/devices/+/telemetry"
    assert access(service, CONTROLLER_USER, shared, "subscribe") == "allow"
    assert access(service, CONTROLLER_USER, "other/topic", "publish") == "deny"
    assert access(service, CONTROLLER_USER, "#", "subscribe") == "deny"
    assert access(service, CONTROLLER_USER, own, "subscribe", clientid="test-as-controller") == "deny"
