"""Device groups over a real SQLite file: static lists, dynamic queries, refusals that store nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.errors import GroupExists, GroupNotFound, InvalidGroup
from controller.groups import Groups, Query
from tests.unit.controller.helpers import Parts

pytestmark = pytest.mark.both_backends

PROFILES = Path(__file__).resolve().parents[3] / "firmware_profiles"


@pytest.fixture
def parts(tmp_path: Path, store_url: str) -> Parts:
    p = Parts(tmp_path, database_url=store_url)
    p.fleet.register("cam-1", ["site-a", "camera"])
    p.fleet.register("cam-2", ["site-a"])
    p.fleet.register("cam-3", ["site-b", "camera"])
    return p


@pytest.fixture
def groups(parts: Parts) -> Groups:
    return Groups(parts.store)


def test_a_static_group_lists_its_devices_and_changes_only_by_hand(parts: Parts, groups: Groups) -> None:
    created = groups.create("pilot", devices=["cam-2", "cam-1", "cam-2"], description="first wave")
    assert (created.kind, created.devices, created.query) == ("static", ("cam-1", "cam-2"), None)
    parts.fleet.register("cam-4", ["site-a"])
    assert groups.members("pilot") == ["cam-1", "cam-2"]
    assert groups.add_devices("pilot", ["cam-4", "cam-1"]).devices == ("cam-1", "cam-2", "cam-4")
    assert groups.remove_device("pilot", "cam-1").devices == ("cam-2", "cam-4")
    with pytest.raises(GroupNotFound, match="cam-1 is not in group pilot"):
        groups.remove_device("pilot", "cam-1")


def test_a_dynamic_group_is_its_query_resolved_when_read(parts: Parts, groups: Groups) -> None:
    cameras = groups.create("site-a-cameras", query=Query(tags=("camera", "site-a")))
    assert (cameras.kind, cameras.devices) == ("dynamic", ("cam-1",))
    parts.fleet.register("cam-5", ["camera", "site-a", "outdoor"])
    assert groups.members("site-a-cameras") == ["cam-1", "cam-5"]
    with pytest.raises(InvalidGroup, match="dynamic"):
        groups.add_devices("site-a-cameras", ["cam-2"])
    profile = PROFILES / "coral-dev-board.toml"
    parts.rollouts.profiles.register(profile.read_text(), profile.name)
    parts.rollouts.profiles.assign("cam-3", "coral-dev-board")
    corals = groups.create("corals", query=Query(profile="coral-dev-board"))
    assert corals.devices == ("cam-3",)
    # Replacing the definition may switch the kind.
    assert groups.replace("corals", devices=["cam-2"]).devices == ("cam-2",)
    assert [g.name for g in groups.all()] == ["corals", "site-a-cameras"]
    assert groups.memberships(["corals", "site-a-cameras"]) == {
        "cam-2": ["corals"],
        "cam-1": ["site-a-cameras"],
        "cam-5": ["site-a-cameras"],
    }


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"name": "bad name", "devices": []}, "invalid group name 'bad name'"),
        ({"name": "g", "devices": ["cam-1", "ghost"]}, "unknown devices: ghost"),
        ({"name": "g", "devices": ["cam-1"], "query": Query(tags=("x",))}, "not both"),
        ({"name": "g", "query": Query()}, "needs tags, a profile"),
        ({"name": "g", "query": Query(tags=("bad tag!",))}, "query.tags"),
        ({"name": "g", "query": Query(profile="no-such-board")}, "unknown profile no-such-board"),
        ({"name": "g", "devices": [], "description": "x" * 501}, "description"),
    ],
)
def test_bad_groups_are_refused_naming_the_problem_and_nothing_is_stored(
    groups: Groups, kwargs: dict[str, object], named: str
) -> None:
    with pytest.raises(InvalidGroup, match=named.replace("(", r"\(")):
        groups.create(**kwargs)  # type: ignore[arg-type]
    assert groups.all() == []


def test_a_group_name_is_taken_once_and_unknown_names_are_not_found(groups: Groups) -> None:
    groups.create("pilot", devices=["cam-1"])
    with pytest.raises(GroupExists, match="pilot exists"):
        groups.create("pilot", devices=["cam-2"])
    assert groups.members("pilot") == ["cam-1"]
    for call in (
        lambda: groups.get("nope"),
        lambda: groups.replace("nope", devices=[]),
        lambda: groups.add_devices("nope", ["cam-1"]),
        lambda: groups.delete("nope"),
    ):
        with pytest.raises(GroupNotFound, match="unknown group nope"):
            call()
    with pytest.raises(InvalidGroup, match="unknown devices: ghost"):
        groups.add_devices("pilot", ["cam-2", "ghost"])
    assert groups.members("pilot") == ["cam-1"]
    assert groups.delete("pilot").name == "pilot"
    assert not groups.exists("pilot")
