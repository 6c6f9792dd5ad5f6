"""The install planner: from what a device has to what its bundle asks, no I/O."""

from __future__ import annotations

import hashlib
from pathlib import PurePosixPath

from agent.install import Accounts, Found, Step, Wanted, parse_unit, plan, unit_for, unit_template

CONFIG = PurePosixPath("/etc/edgefleet/agent.toml")
DATA = PurePosixPath("/var/lib/edgefleet-agent")
LINK = (
    PurePosixPath("/etc/systemd/system/multi-user.target.wants/edgefleet-agent.service"),
    PurePosixPath("/etc/systemd/system/edgefleet-agent.service"),
)
WANTED = Wanted(
    groups=("edgefleet", "video", "edgefleet-apps"),
    user="edgefleet",
    user_group="edgefleet",
    user_groups=("video", "edgefleet-apps"),
    dirs=((DATA, 0o750, "edgefleet", "edgefleet"),),
    files=((CONFIG, b"device_id = 'cam-1'\n", 0o640, "root", "edgefleet"),),
    link=LINK,
)
EVERYONE = Accounts(
    users={"root": ["root", "x", "0", "0"], "edgefleet": ["edgefleet", "x", "999", "999"]},
    groups={
        "root": ["root", "x", "0", ""],
        "edgefleet": ["edgefleet", "x", "999", ""],
        "video": ["video", "x", "44", "edgefleet"],
        "edgefleet-apps": ["edgefleet-apps", "x", "998", "edgefleet"],
    },
)


def installed(path: PurePosixPath) -> Found:
    if path == DATA:
        return Found("dir", mode=0o750, uid=999, gid=999)
    if path == CONFIG:
        return Found("file", hashlib.sha256(b"device_id = 'cam-1'\n").hexdigest(), 0o640, 0, 999)
    if path == LINK[0]:
        return Found("link", target=str(LINK[1]))
    return Found("")


def actions(steps: list[Step]) -> list[tuple[str, str]]:
    return [(s.action, s.target) for s in steps]


def test_a_fresh_device_gets_everything_in_order() -> None:
    fresh = Accounts(users={"root": ["root", "x", "0", "0"]}, groups={"root": ["root", "x", "0", ""]})
    assert actions(plan(WANTED, fresh, lambda p: Found(""))) == [
        ("group", "edgefleet"),
        ("group", "video"),
        ("group", "edgefleet-apps"),
        ("user", "edgefleet"),
        ("dir", str(DATA)),
        ("file", str(CONFIG)),
        ("link", str(LINK[0])),
    ]


def test_a_device_installed_as_asked_needs_nothing() -> None:
    assert plan(WANTED, EVERYONE, installed) == []


def test_only_what_differs_is_redone() -> None:
    def drifted(path: PurePosixPath) -> Found:
        if path == CONFIG:
            return Found("file", "another digest", 0o640, 0, 999)
        if path == DATA:
            return Found("dir", mode=0o755, uid=999, gid=999)
        return installed(path)

    left = Accounts(
        users=EVERYONE.users, groups={**EVERYONE.groups, "video": ["video", "x", "44", "someone"]}
    )
    assert actions(plan(WANTED, left, drifted)) == [
        ("join", "edgefleet"),
        ("dir", str(DATA)),
        ("file", str(CONFIG)),
    ]


def test_the_unit_names_this_installations_agent_and_the_folders_it_writes() -> None:
    unit = parse_unit(unit_template())
    assert (unit.user, unit.group, str(unit.runtime_dir)) == (
        "edgefleet",
        "edgefleet",
        "/run/edgefleet-agent",
    )
    assert "edgefleet-apps" in unit.supplementary
    text = unit_for(
        unit, "/opt/edgefleet/bin/edgefleet-agent", CONFIG, [PurePosixPath("/data/ef"), unit.runtime_dir]
    )
    assert "\nExecStart=/opt/edgefleet/bin/edgefleet-agent run --config /etc/edgefleet/agent.toml\n" in text
    assert "\nReadWritePaths=/data/ef /run/edgefleet-agent\n" in text
    assert [line for line in text.splitlines() if line.startswith("ExecStart=")] == [
        "ExecStart=/opt/edgefleet/bin/edgefleet-agent run --config /etc/edgefleet/agent.toml"
    ]
