"""What the console's pages compute, from domain records alone: device statuses and filters,
alerts, rollout progress by wave, the actions a rollout's state allows, its gates in words."""

from __future__ import annotations

from typing import Any

from controller.console import views
from controller.fleet import Condition, Device, ModelState, Reported
from controller.rollout_engine import Command
from controller.rollouts import Rollout, RolloutDevice, RolloutEvent


def _device(
    device_id: str,
    online: bool = True,
    phases: tuple[str, ...] = ("active",),
    tags: tuple[str, ...] = (),
    profile: str = "",
    conditions: tuple[Condition, ...] = (),
) -> Device:
    models = [
        ModelState(f"t{i}", "digits", "1", "sha", phase, 0, 0, "bad model" if phase == "failed" else "")
        for i, phase in enumerate(phases)
    ]
    return Device(
        device_id=device_id,
        tags=list(tags),
        created_at=0.0,
        online=online,
        last_seen=1.0,
        agent_version="0.1.0",
        reported=Reported(1, 1, models, conditions=list(conditions)),
        reported_received_at=1.0,
        desired_generation=1,
        profile=profile,
    )


def _rollout(
    devices: list[tuple[str, str, int]],
    state: str = "running",
    wave: int = 1,
    plan: dict[str, Any] | None = None,
) -> Rollout:
    return Rollout(
        id="r1",
        model="digits",
        version="2",
        tenant="default",
        digest="sha",
        status="failed" if state == "failed" else "in_progress",
        state=state,
        wave=wave,
        waves=2,
        reason="wave 1 of 2: error rate 0.300 (30/100 inferences on 1 devices) exceeds 0.05",
        created_at=10.0,
        plan=plan or {"waves": [{"count": 1, "percent": None, "soak_s": 30.0}], "gates": {}},
        devices=[RolloutDevice(d, status, "", 1.0, w) for d, status, w in devices],
    )


def test_a_device_is_offline_failed_updating_or_online_in_that_order() -> None:
    fleet = [
        _device("a", online=False, phases=("failed",)),
        _device("b", phases=("active", "failed")),
        _device("c", phases=("active", "downloading")),
        _device("d"),
        _device("e", phases=()),
    ]
    assert [views.device_status(d) for d in fleet] == ["offline", "failed", "updating", "online", "online"]
    assert views.status_counts(fleet) == {"online": 2, "offline": 1, "updating": 1, "failed": 1}


def test_device_filters_combine_search_tag_profile_and_status() -> None:
    fleet = [
        _device("cam-1", tags=("site-a",), profile="coral"),
        _device("cam-2", online=False, tags=("site-b",), profile="coral"),
        _device("mic-1", tags=("site-a", "audio"), profile="pi4"),
    ]

    def ids(**kw: str) -> list[str]:
        return [d.device_id for d in views.filter_devices(fleet, **kw)]

    assert ids(query=" CAM ") == ["cam-1", "cam-2"]
    assert ids(query="audio") == ["mic-1"]
    assert ids(tag="site-a", profile="coral") == ["cam-1"]
    assert ids(status="offline") == ["cam-2"]
    assert ids(tag="site-a", status="offline") == []


def test_alerts_name_failed_devices_their_conditions_and_stopped_rollouts() -> None:
    full = Condition("disk_full", "0 bytes free", 1, 2)
    fleet = [_device("a", phases=("failed",)), _device("b", conditions=(full,)), _device("c")]
    paused = _rollout([("a", "failed", 1)], state="paused")
    running = _rollout([("c", "pending", 1)])
    assert views.alerts(fleet, [paused, running]) == [
        ("error", "device a failed an update: bad model", "/ui/devices/a"),
        ("warning", "device b: disk_full: 0 bytes free", "/ui/devices/b"),
        (
            "warning",
            "rollout r1 (digits 2) is paused: wave 1 of 2: error rate 0.300 (30/100 inferences on 1 devices)"
            " exceeds 0.05",
            "/ui/rollouts/r1",
        ),
    ]


def test_rollout_progress_counts_settled_devices_per_wave_with_its_soak() -> None:
    rollout = _rollout(
        [("a", "active", 1), ("b", "failed", 2), ("c", "downloading", 2), ("d", "waiting", 2)], wave=2
    )
    view = views.rollout_view(rollout)
    assert (view.done, view.total, view.percent) == (2, 4, 50)
    assert view.waves == [
        views.WaveView(1, 1, {"active": 1}, False, 30.0),
        views.WaveView(2, 3, {"downloading": 1, "failed": 1, "waiting": 1}, True, None),
    ]


def test_actions_are_enabled_in_the_states_the_engine_accepts_them_in() -> None:
    actions = {a.command: a for a in views.actions()}
    assert set(actions) == {c.value for c in Command} | {"retry-failed"}
    assert actions["retry-failed"].states == ("failed", "paused", "running")
    assert actions["pause"].label == "Pause" and actions["pause"].states == ("awaiting_approval", "running")
    assert actions["resume"].states == ("paused",)
    assert actions["approve"].states == ("awaiting_approval",)
    assert "succeeded" in actions["rollback"].states and "succeeded" not in actions["abort"].states


def test_gates_and_shadow_are_stated_in_words_and_unset_gates_left_out() -> None:
    plan = {
        "gates": {
            "max_failure_fraction": 0.1,
            "max_error_rate": 0.05,
            "max_latency_ratio": None,
            "min_reporting_fraction": 0.0,
            "min_inferences": 20,
            "min_confidence_ratio": None,
            "max_prediction_psi": 0.2,
        },
        "shadow": {"soak_s": 60.0, "min_agreement": 0.95, "max_deviation": None, "min_compared": 20},
    }
    assert views.gate_texts(plan) == [
        "devices failing to update at most 10%",
        "error rate at most 0.05",
        "devices reporting by the end of the soak at least 0%",
        "judged on devices with at least 20 inferences",
        "predicted-class PSI at most 0.2",
        "shadow for 60 s, agreement at least 0.95",
    ]
    assert views.gate_texts({}) == []


def test_event_log_is_newest_first_and_bounded() -> None:
    events = [RolloutEvent(float(i), "set_desired", 1, f"d{i}", "running", "") for i in range(300)]
    log = views.event_log(events)
    assert len(log) == views.EVENT_LOG_LIMIT and log[0].device_id == "d299" and log[-1].device_id == "d100"


def test_validation_summary_gives_the_figures_a_variant_was_judged_on() -> None:
    report = {
        "task": "classifier",
        "gate": 0.99,
        "samples": 200,
        "top1_agreement": 0.995,
        "max_abs_deviation": 0.0123,
    }
    assert views.validation_summary(report) == (
        "top-1 agreement 99.50%, gate 99.00%, max |deviation| 0.0123, 200 samples"
    )
    assert views.validation_summary({"reference": True}).startswith("the reference")


def test_device_history_lists_the_rollouts_that_targeted_it_newest_first() -> None:
    old = _rollout([("a", "active", 1)])
    new = Rollout(**{**old.__dict__, "id": "r2", "created_at": 20.0})
    other = Rollout(**{**old.__dict__, "id": "r3", "devices": [RolloutDevice("b", "active", "", 1.0, 1)]})
    assert [r.id for r, _ in views.device_rollouts("a", [old, new, other])] == ["r2", "r1"]
