"""The rules a broker cluster gets from /broker/authorize are the Mosquitto ACL's, line for line."""

from __future__ import annotations

from pathlib import Path

from controller.broker_access import DEVICE_RULES, WAVE_RULE, authenticate, authorize
from controller.mosquitto_auth import hash_password

ACL = Path(__file__).resolve().parents[3] / "deploy" / "mosquitto" / "edgefleet.acl"
PREFIX = "edgefleet/v1/devices/%u/"


def test_the_device_rules_are_the_pattern_lines_of_the_deploy_acl() -> None:
    patterns = [line.split() for line in ACL.read_text().splitlines() if line.startswith("pattern ")]
    own = [(access, topic) for _, access, topic in patterns if topic.startswith(PREFIX)]
    assert [(access, topic[len(PREFIX) :]) for access, topic in own] == [
        (access.value, topic) for access, topic in DEVICE_RULES
    ]
    # Besides its own subtree, a device reads the wave broadcasts only.
    others = [(access, topic) for _, access, topic in patterns if not topic.startswith(PREFIX)]
    assert others == [(WAVE_RULE[0].value, WAVE_RULE[1])]
    # And the controller's one line: the whole tree.
    assert "user edgefleet-controller\ntopic readwrite edgefleet/#" in ACL.read_text()


def test_a_multi_level_rule_matches_its_parent_and_every_level_below_and_nothing_beside() -> None:
    def publish(topic: str) -> bool:
        return authorize(
            "d", "d", f"edgefleet/v1/devices/d/{topic}", "publish", "ctl", lambda _: True
        ).allowed

    assert publish("results") and publish("results/t") and publish("results/t/u")
    assert (
        not publish("resultsx")
        and not publish("results2/t")
        and not publish("")
        and not publish("/telemetry")
    )


def test_a_stored_hash_decides_a_login_and_a_malformed_one_refuses_it() -> None:
    stored = {"d": hash_password("pw"), "broken": "$6$not-mosquitto"}
    for user, password, allowed in [("d", "pw", True), ("d", "PW", False), ("broken", "pw", False)]:
        got = authenticate(user, user, password, "ctl", hash_password("c"), stored.get).allowed
        assert got is allowed, (user, password)
    assert authenticate("ctl", "ctl", "c", "ctl", hash_password("c"), stored.get).allowed


def test_a_device_subscribes_to_a_wave_broadcast_and_publishes_on_none() -> None:
    def decide(topic: str, action: str) -> bool:
        return authorize("d", "d", topic, action, "ctl", lambda _: True).allowed

    wave = f"edgefleet/v1/waves/{'0f' * 16}-w1/{'ab' * 32}"
    assert decide(wave, "subscribe")
    assert not decide(wave, "publish")
    for filter_ in ("edgefleet/v1/waves/#", f"edgefleet/v1/waves/+/{'ab' * 32}", "edgefleet/v1/waves/w1/+"):
        assert not decide(filter_, "subscribe"), filter_
    # The controller publishes them.
    assert authorize("ctl", "ctl", wave, "publish", "ctl", lambda _: False).allowed
