"""Controller roles: parsing ``--roles``, what each role subscribes to (shared on MQTT 5 when the
process is one of several), and the broker accounts of the controller's processes, which no
device can take."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgefleet_proto.topics import Kind

from controller import transport
from controller.broker_access import authenticate, authorize
from controller.errors import ConfigError
from controller.mosquitto_auth import hash_password
from controller.roles import (
    ALL,
    INBOUND,
    MAX_INSTANCES,
    Role,
    account,
    describe,
    instance_accounts,
    is_controller_account,
    parse_roles,
    subscriptions,
)

ACL = Path(__file__).resolve().parents[3] / "deploy" / "mosquitto" / "edgefleet.acl"


def test_roles_are_parsed_and_bad_ones_named() -> None:
    assert parse_roles("all") == ALL
    assert parse_roles(" ingest, chunks ") == {Role.INGEST, Role.CHUNKS}
    assert describe(parse_roles("engine,api,ingest,chunks")) == "api,ingest,chunks,engine"
    with pytest.raises(ConfigError, match="unknown role 'worker': choose among api, ingest, chunks, engine"):
        parse_roles("ingest,worker")
    with pytest.raises(ConfigError, match="at least one"):
        parse_roles(" , ")


def test_ingest_and_chunks_together_receive_every_inbound_kind_once() -> None:
    kinds = [k for role in Role for k in INBOUND.get(role, ())]
    assert sorted(kinds) == sorted(transport.INBOUND)
    assert len(kinds) == len(set(kinds))


def test_a_process_among_others_subscribes_with_its_roles_shared_group() -> None:
    ingest = subscriptions(frozenset({Role.INGEST}), shared=True)
    assert ("$share/edgefleet-ingest/edgefleet/v1/devices/+/telemetry", Kind.TELEMETRY) in ingest
    assert all(topic.startswith("$share/edgefleet-ingest/") for topic, _ in ingest)
    assert subscriptions(frozenset({Role.CHUNKS}), shared=True) == [
        ("$share/edgefleet-chunks/edgefleet/v1/devices/+/artifact/request", Kind.ARTIFACT_REQUEST)
    ]
    # On MQTT 3.1.1 (no shared subscriptions) and for the API or the engine alone: plain, or none.
    assert all(not t.startswith("$share") for t, _ in subscriptions(ALL, shared=False))
    assert subscriptions(frozenset({Role.API, Role.ENGINE}), shared=True) == []


def test_each_instance_has_an_account_of_its_own_in_the_acl() -> None:
    assert account(1) == "edgefleet-controller-1" and len(set(instance_accounts())) == MAX_INSTANCES
    for bad in (0, MAX_INSTANCES + 1, -1):
        with pytest.raises(ConfigError, match="--instance must be between 1 and 16"):
            account(bad)
    text = ACL.read_text()
    for name in instance_accounts():
        assert f"user {name}\ntopic readwrite edgefleet/#\n" in text


@pytest.mark.parametrize(
    ("name", "controller"),
    [
        ("edgefleet-controller", True),
        ("edgefleet-controller-1", True),
        ("edgefleet-controller-16", True),
        ("edgefleet-controller-17", False),
        ("edgefleet-controller-01", False),
        ("edgefleet-controller-0", False),
        ("edgefleet-controller-ingest", False),
        ("cam-1", False),
    ],
)
def test_controller_accounts_are_recognised_exactly(name: str, controller: bool) -> None:
    assert is_controller_account(name) is controller


def test_an_instance_account_logs_in_with_the_controllers_password_only() -> None:
    ctl_hash = hash_password("ctl-pw")
    # A device registered under that name before it was reserved cannot log in with its own.
    devices = {"edgefleet-controller-2": hash_password("dev-pw"), "cam-1": hash_password("dev-pw")}
    assert authenticate(
        "edgefleet-controller-2",
        "edgefleet-controller-2",
        "ctl-pw",
        "edgefleet-controller",
        ctl_hash,
        devices.get,
    ).allowed
    assert not authenticate(
        "edgefleet-controller-2",
        "edgefleet-controller-2",
        "dev-pw",
        "edgefleet-controller",
        ctl_hash,
        devices.get,
    ).allowed
    # A device cannot take an instance's client id (the id is its username's, always).
    assert not authenticate(
        "cam-1", "edgefleet-controller-2", "dev-pw", "edgefleet-controller", ctl_hash, devices.get
    ).allowed


def test_an_instance_account_has_the_controllers_rights_and_shared_subscriptions() -> None:
    def decide(user: str, topic: str, action: str) -> bool:
        return authorize(user, user, topic, action, "edgefleet-controller", lambda _: True).allowed

    shared = "$share/edgefleet-ingest/edgefleet/v1/devices/+/telemetry"
    assert decide("edgefleet-controller-3", shared, "subscribe")
    assert decide("edgefleet-controller-3", "edgefleet/v1/devices/cam-1/desired", "publish")
    assert not decide("edgefleet-controller-3", "$share/g/other/#", "subscribe")
    # A device gets none of it.
    assert not decide("cam-1", shared, "subscribe")
    assert not decide("cam-1", "edgefleet/v1/devices/cam-2/desired", "publish")
