"""Who may log in to the broker, and which topic each account may publish or subscribe to.

Mosquitto reads these rules from deploy/mosquitto/edgefleet.acl and the password file the
controller writes. A broker cluster that asks an HTTP service instead (EMQX's HTTP
authenticator and authorizer, or a HiveMQ extension calling the same routes) gets the same
answers from :mod:`controller.api.broker_auth`, decided here without I/O:

- the controller's accounts own the whole ``edgefleet/`` tree: its own and, for its other
  processes, ``edgefleet-controller-N`` (:mod:`controller.roles`), all with its password;
- a device (username = device id) may touch only its own subtree, in the directions the
  contract uses (:data:`DEVICE_RULES`, the ACL's ``pattern`` lines; a test keeps them equal);
- a device may subscribe to any wave broadcast's topic (:data:`WAVE_RULE`), and publish on none:
  each broadcast artifact is sealed with a key only the devices assigned it get;
- every account's client id must equal its username, as ``use_username_as_clientid`` makes
  it on Mosquitto, so no client can take over another's session.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from edgefleet_proto.topics import PREFIX, TopicError, validate_device_id
from edgefleet_proto.wave import WaveError, WaveTopic, is_wave_topic

from controller.mosquitto_auth import verify_password
from controller.roles import is_controller_account

ROOT = PREFIX.split("/")[0]
# The prefix of an MQTT 5 shared subscription ($share/{group}/{filter}), which the controller's
# ingest processes may use; the filter after it is what is checked.
SHARE_PREFIX = "$share/"


class Access(StrEnum):
    READ = "read"
    WRITE = "write"
    READWRITE = "readwrite"


class Action(StrEnum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"


# A device's rights under edgefleet/v1/devices/{its id}/, as deploy/mosquitto/edgefleet.acl says.
DEVICE_RULES: tuple[tuple[Access, str], ...] = (
    (Access.READ, "desired"),
    (Access.WRITE, "desired/request"),
    (Access.READWRITE, "reported"),
    (Access.READWRITE, "status"),
    (Access.WRITE, "telemetry"),
    (Access.READ, "telemetry/ack"),
    (Access.WRITE, "events"),
    (Access.WRITE, "artifact/request"),
    (Access.READ, "artifact/response"),
    (Access.WRITE, "results/#"),
    (Access.WRITE, "capture"),
)


# Every device's right on the wave broadcasts, as the ACL's pattern line says (no %u in it).
WAVE_RULE: tuple[Access, str] = (Access.READ, "edgefleet/v1/waves/+/+")


@dataclass(frozen=True)
class Decision:
    allowed: bool
    # Why, for the controller's log (never sent to the broker).
    reason: str


def allow(reason: str) -> Decision:
    return Decision(True, reason)


def deny(reason: str) -> Decision:
    return Decision(False, reason)


def authenticate(
    username: str,
    clientid: str,
    password: str,
    controller_user: str,
    controller_hash: str,
    device_hash: Callable[[str], str | None],
) -> Decision:
    """A login: the password against the stored hash, and the client id bound to the username.
    ``device_hash`` looks a registered device's password hash up (None when unknown)."""
    if clientid != username:
        return deny(f"client id {clientid!r} is not the username")
    stored: str | None = controller_hash
    if username != controller_user and not is_controller_account(username):
        try:
            validate_device_id(username)
        except TopicError:
            return deny("not a device id")
        stored = device_hash(username)
    if stored is None:
        return deny("unknown device")
    if not verify_password(password, stored):
        return deny("wrong password")
    return allow("password matches")


def authorize(
    username: str,
    clientid: str,
    topic: str,
    action: str,
    controller_user: str,
    is_device: Callable[[str], bool],
) -> Decision:
    """A publish or subscribe by a logged-in client. Only the two actions the contract uses are
    known; anything else is refused."""
    if clientid != username:
        return deny(f"client id {clientid!r} is not the username")
    try:
        wanted = Action(action)
    except ValueError:
        return deny(f"unknown action {action!r}")
    if username == controller_user or is_controller_account(username):
        if wanted is Action.SUBSCRIBE and topic.startswith(SHARE_PREFIX):
            # $share/{group}/{filter}: the group name is the subscriber's choice.
            _, _, rest = topic[len(SHARE_PREFIX) :].partition("/")
            topic = rest
        inside = topic == ROOT or topic.startswith(f"{ROOT}/")
        return allow("the controller owns the tree") if inside else deny(f"outside {ROOT}/")
    if not is_device(username):
        return deny("unknown device")
    if is_wave_topic(topic):
        return _wave_access(topic, wanted)
    own = f"{PREFIX}/{username}/"
    if not topic.startswith(own):
        return deny("not the device's own subtree")
    rest = topic[len(own) :]
    if "+" in rest or "#" in rest:
        # A device subscribes to the exact topics it reads (and MQTT publishes to no wildcard);
        # a filter could cover topics it may not read.
        return deny("a device names topics without wildcards")
    needed = (
        (Access.READ, Access.READWRITE) if wanted is Action.SUBSCRIBE else (Access.WRITE, Access.READWRITE)
    )
    for access, pattern in DEVICE_RULES:
        if access in needed and _matches(pattern, rest):
            return allow(f"{access.value} {pattern}")
    return deny(f"no {wanted.value} right on {rest!r}")


def _wave_access(topic: str, wanted: Action) -> Decision:
    """A device reads a wave broadcast's exact topic; it never publishes on one."""
    if wanted is not Action.SUBSCRIBE:
        return deny("only the controller publishes wave broadcasts")
    try:
        WaveTopic.parse(topic)
    except WaveError as exc:
        # Wildcards included: a device subscribes to the broadcasts its desired state names.
        return deny(f"not a wave broadcast topic: {exc}")
    return allow(f"{WAVE_RULE[0].value} {WAVE_RULE[1]}")


def _matches(pattern: str, topic: str) -> bool:
    """MQTT matching of a rule's filter (``+``, trailing ``#``) against a concrete topic."""
    want, got = pattern.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            # 'a/#' also matches 'a' itself, as in MQTT and Mosquitto's ACL.
            return True
        if i >= len(got) or (level != "+" and level != got[i]):
            return False
    return len(want) == len(got)
