"""Table tests of the pure planner: builders in, steps out, no I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import pytest

from agent.reconciler import (
    MAX_INDICES_PER_REQUEST,
    Activate,
    CollectGarbage,
    Current,
    Deactivate,
    Fail,
    MarkApplied,
    ModelEntry,
    Phase,
    ReportState,
    RequestChunks,
    RequestManifest,
    Step,
    TransferView,
    Verify,
    Wait,
    build_report,
    chunk_requests,
    plan,
)
from agent.state import Assignment, Desired, DeviceState, Failure, Installed, TenantState

D1, D2, D3 = "1" * 64, "2" * 64, "3" * 64
NOW = 1000.0


def assignment(
    digest: str = D1,
    version: str = "1",
    tenant: str = "default",
    fmt: str = "onnx",
    runtime: str = "onnxruntime",
    rollout_id: str = "",
) -> Assignment:
    return Assignment(tenant, "m", version, digest, 1000, fmt, runtime, rollout_id)


def desired(generation: int, *assignments: Assignment) -> Desired:
    return Desired(generation, assignments)


def device(
    active: tuple[Assignment, ...] | list[Assignment] = (),
    previous: dict[str, Assignment] | None = None,
    applied: int = 0,
    want: Desired | None = None,
    failures: tuple[Failure, ...] | list[Failure] = (),
) -> DeviceState:
    prev = previous or {}
    tenants = {
        a.tenant: TenantState(
            Installed(a, f"/m/{a.digest}.onnx"),
            Installed(prev[a.tenant], "/p") if a.tenant in prev else None,
        )
        for a in active
    }
    return DeviceState(want, applied, tenants, {f.digest: f for f in failures})


def transfer(
    digest: str = D1,
    have: set[int] | None = None,
    chunks: int = 10,
    outstanding: dict[int, float] | None = None,
) -> TransferView:
    have = have or set()
    return TransferView(
        digest,
        has_manifest=True,
        chunks=chunks,
        have=frozenset(have),
        outstanding=outstanding or {},
        bytes_have=100 * len(have),
        bytes_total=100 * chunks,
    )


def expect_steps(want: Desired | None, current: Current, *expected: Step, now: float = NOW) -> None:
    """Plans as if the current report was already published, unless ``current.reported`` is set."""
    if current.reported is None:
        current = replace(current, reported=build_report(want, current), reported_at=now)
    assert plan(want, current, now) == list(expected)


def test_no_desired_state_is_converged() -> None:
    expect_steps(None, Current(DeviceState()))


def test_new_model_asks_for_the_manifest() -> None:
    a = assignment()
    expect_steps(desired(1, a), Current(device(want=desired(1, a))), RequestManifest(a))


def test_disconnected_waits_for_the_broker() -> None:
    a = assignment()
    expect_steps(desired(1, a), Current(device(), connected=False), Wait(math.inf, "broker disconnected"))


def test_manifest_request_waits_then_is_retried_after_the_timeout() -> None:
    a = assignment()
    asked = TransferView(D1, manifest_requested_at=NOW - 1)
    expect_steps(
        desired(1, a), Current(device(), transfers={D1: asked}), Wait(NOW + 4, f"manifest of {D1[:12]}")
    )
    late = TransferView(D1, manifest_requested_at=NOW - 5)
    expect_steps(desired(1, a), Current(device(), transfers={D1: late}), RequestManifest(a))


def test_chunks_are_requested_within_the_window() -> None:
    a = assignment()
    t = transfer(have={0, 1}, outstanding={2: NOW - 1, 3: NOW - 2})
    expect_steps(
        desired(1, a),
        Current(device(), transfers={D1: t}, window=4),
        RequestChunks(D1, (4, 5)),
        Wait(NOW - 2 + 5, f"chunks of {D1[:12]}"),
    )


def test_timed_out_chunks_are_requested_again_first() -> None:
    a = assignment()
    t = transfer(have={0}, outstanding={1: NOW - 9, 2: NOW - 1})
    expect_steps(
        desired(1, a),
        Current(device(), transfers={D1: t}, window=3),
        RequestChunks(D1, (1, 3)),
        Wait(NOW - 1 + 5, f"chunks of {D1[:12]}"),
    )


def test_chunks_are_requested_in_batches_once_half_the_window_is_free() -> None:
    a = assignment()
    t = transfer(chunks=20, have={0, 1}, outstanding={i: NOW - 1 for i in range(2, 7)})
    expect_steps(
        desired(1, a), Current(device(), transfers={D1: t}, window=8), Wait(NOW + 4, f"chunks of {D1[:12]}")
    )
    t = transfer(chunks=20, have={0, 1, 2}, outstanding={i: NOW - 1 for i in range(3, 7)})
    expect_steps(
        desired(1, a),
        Current(device(), transfers={D1: t}, window=8),
        RequestChunks(D1, (7, 8, 9, 10)),
        Wait(NOW + 4, f"chunks of {D1[:12]}"),
    )


def test_a_chunk_lost_in_a_batch_goes_out_with_the_next_batch_after_its_timeout() -> None:
    a = assignment()
    # Chunk 2 of the batch 2..5 never came: its slot is free again, not yet half the window.
    lost = {2: NOW - 5, 3: NOW - 1, 4: NOW - 1, 5: NOW - 1}
    t = transfer(chunks=20, have={0, 1}, outstanding=lost)
    expect_steps(
        desired(1, a),
        Current(device(), transfers={D1: t}, window=4),
        Wait(NOW + 4, f"chunks of {D1[:12]}"),
    )
    del lost[3]  # arrived: half the window is free
    t = transfer(chunks=20, have={0, 1, 3}, outstanding=lost)
    expect_steps(
        desired(1, a),
        Current(device(), transfers={D1: t}, window=4),
        RequestChunks(D1, (2, 6)),
        Wait(NOW + 4, f"chunks of {D1[:12]}"),
    )


def test_the_last_chunks_are_asked_for_as_soon_as_they_all_fit() -> None:
    a = assignment()
    in_flight = {i: NOW - 1 for i in range(2, 7)}
    expect_steps(
        desired(1, a),
        Current(device(), transfers={D1: transfer(chunks=10, have={0, 1}, outstanding=in_flight)}, window=8),
        RequestChunks(D1, (7, 8, 9)),
        Wait(NOW + 4, f"chunks of {D1[:12]}"),
    )
    expect_steps(
        desired(1, a),
        Current(device(), transfers={D1: transfer(chunks=11, have={0, 1}, outstanding=in_flight)}, window=8),
        Wait(NOW + 4, f"chunks of {D1[:12]}"),
    )


@pytest.mark.parametrize(
    ("candidates", "free", "window", "requests"),
    [
        # Less than half the window free: wait for more chunks to arrive.
        (range(10), 3, 8, []),
        (range(10), 4, 8, [(0, 1, 2, 3)]),
        (range(10), 6, 8, [(0, 1, 2, 3, 4, 5)]),
        (range(3), 8, 8, [(0, 1, 2)]),
        # Odd windows round half up; a window of 1 or 2 asks for every chunk on its own.
        (range(10), 2, 5, []),
        (range(10), 3, 5, [(0, 1, 2)]),
        (range(10), 1, 1, [(0,)]),
        (range(10), 1, 2, [(0,)]),
        # The tail: all that is left fits, so nothing is gained by waiting.
        ((7, 8), 2, 8, [(7, 8)]),
        ((7, 8, 9), 2, 8, []),
        ((), 8, 8, []),
        ((5,), 0, 8, []),
        # A window wider than the controller serves per request is split.
        (range(200), 150, 200, [tuple(range(64)), tuple(range(64, 128)), tuple(range(128, 150))]),
    ],
)
def test_chunk_requests_batch_the_free_slots(
    candidates: Sequence[int], free: int, window: int, requests: list[tuple[int, ...]]
) -> None:
    assert chunk_requests(list(candidates), free, window) == requests
    assert all(len(r) <= MAX_INDICES_PER_REQUEST for r in requests)


def test_full_window_only_waits() -> None:
    a = assignment()
    t = transfer(outstanding={0: NOW - 1, 1: NOW - 1})
    expect_steps(
        desired(1, a), Current(device(), transfers={D1: t}, window=2), Wait(NOW + 4, f"chunks of {D1[:12]}")
    )


def test_complete_download_is_verified_then_installed_model_activated() -> None:
    a = assignment()
    done = transfer(have=set(range(10)))
    expect_steps(desired(1, a), Current(device(), transfers={D1: done}), Verify(D1))
    expect_steps(desired(1, a), Current(device(), installed=frozenset({D1})), Activate(a))


def test_converged_marks_the_generation_applied_then_collects_garbage() -> None:
    old, a = assignment(D2, "0"), assignment(D1, "1")
    state = device(active=[a], previous={"default": old})
    installed = frozenset({D1, D2, D3})
    expect_steps(desired(4, a), Current(state, installed=installed), MarkApplied(4))
    applied = replace(state, applied_generation=4)
    # D2 is the previous model: kept as the fallback. D3 and a stale transfer go.
    stale = {"4" * 64: TransferView("4" * 64)}
    expect_steps(
        desired(4, a), Current(applied, installed=installed, transfers=stale), CollectGarbage((D3, "4" * 64))
    )
    expect_steps(desired(4, a), Current(applied, installed=frozenset({D1, D2})))


def test_same_digest_with_new_labels_is_activated_again() -> None:
    a = assignment()
    relabelled = replace(a, model_version="1.0.1", rollout_id="r2")
    expect_steps(
        desired(2, relabelled), Current(device(active=[a]), installed=frozenset({D1})), Activate(relabelled)
    )


def test_failed_artifact_is_not_retried_in_the_same_generation_but_is_in_a_newer_one() -> None:
    a = assignment()
    failed = device(failures=[Failure(D1, "sha256 mismatch", 3)])
    expect_steps(desired(3, a), Current(failed))
    expect_steps(desired(4, a), Current(failed), RequestManifest(a))


def test_assignments_that_cannot_work_here_fail_before_downloading() -> None:
    bad_digest = assignment("XYZ")
    tflite = assignment(D2, tenant="audio", fmt="tflite", runtime="litert")
    expect_steps(
        desired(1, bad_digest, tflite),
        Current(device()),
        Fail(bad_digest, "artifact digest 'XYZ' is not a lowercase hex sha256"),
        Fail(tflite, "runtime 'litert' is not available on this device (have onnxruntime)"),
    )


def test_two_tenants_sharing_an_artifact_download_it_once() -> None:
    a, b = assignment(tenant="a"), assignment(tenant="b")
    expect_steps(desired(1, a, b), Current(device()), RequestManifest(a))
    expect_steps(desired(1, a, b), Current(device(), installed=frozenset({D1})), Activate(a), Activate(b))


def test_tenant_no_longer_desired_is_deactivated() -> None:
    a, gone = assignment(), assignment(D2, tenant="gone")
    expect_steps(desired(2, a), Current(device(active=[a, gone], applied=1)), Deactivate("gone"))


def test_report_lists_active_and_the_desired_entry_with_progress() -> None:
    old, new = assignment(D2, "1", rollout_id="r1"), assignment(D1, "2", rollout_id="r2")
    want = desired(2, new)
    current = Current(device(active=[old], applied=1, want=want), transfers={D1: transfer(have={0, 1, 2})})
    report = build_report(want, current)
    assert report.desired_generation == 2 and report.applied_generation == 1
    assert report.models == (
        ModelEntry("default", "m", "1", D2, Phase.ACTIVE, 1000, 1000, "", "r1"),
        ModelEntry("default", "m", "2", D1, Phase.DOWNLOADING, 300, 1000, "", "r2"),
    )
    failed = replace(current, state=device(active=[old], want=want, failures=[Failure(D1, "bad", 2)]))
    assert build_report(want, failed).models[1].phase == Phase.FAILED
    assert build_report(want, failed).models[1].error == "bad"
    verifying = replace(current, transfers={D1: transfer(have=set(range(10)))})
    assert build_report(want, verifying).models[1].phase == Phase.VERIFYING
    loading = replace(current, transfers={}, installed=frozenset({D1}))
    assert build_report(want, loading).models[1].phase == Phase.LOADING


def test_report_is_published_first_on_change_and_progress_is_throttled() -> None:
    a = assignment()
    want = desired(1, a)
    base = Current(device(want=want), transfers={D1: transfer(have={0}, outstanding={1: NOW})}, window=1)
    first = build_report(want, base)
    assert plan(want, base, NOW) == [ReportState(first), Wait(NOW + 5, f"chunks of {D1[:12]}")]

    progressed = replace(base, transfers={D1: transfer(have={0, 1}, outstanding={2: NOW})}, reported=first)
    assert plan(want, replace(progressed, reported_at=NOW - 0.5), NOW) == [Wait(NOW + 0.5, "progress report")]
    assert plan(want, replace(progressed, reported_at=NOW - 1), NOW) == [
        ReportState(build_report(want, progressed)),
        Wait(NOW + 5, f"chunks of {D1[:12]}"),
    ]
    offline = replace(base, connected=False)
    assert plan(want, offline, NOW) == [Wait(math.inf, "broker disconnected")]


def test_the_window_is_shared_by_every_artifact_in_flight() -> None:
    """The window bounds the requests in flight across artifacts, and each artifact that lacks
    chunks gets an even share of it (the first in plan order takes the remainder)."""
    a, b = assignment(D1, tenant="a"), assignment(D2, tenant="b")
    transfers = {D1: transfer(D1, outstanding={0: NOW - 1, 1: NOW - 1}), D2: transfer(D2)}
    expect_steps(
        desired(1, a, b),
        Current(device(), transfers=transfers, window=3),
        RequestChunks(D2, (0,)),
        Wait(NOW + 4, f"chunks of {D1[:12]}"),
    )
    transfers[D1] = transfer(D1, outstanding={0: NOW - 1, 1: NOW - 1, 2: NOW - 1})
    expect_steps(
        desired(1, a, b),
        Current(device(), transfers=transfers, window=3),
        Wait(NOW + 4, f"chunks of {D1[:12]}"),
    )
    transfers[D1] = transfer(D1, outstanding={0: NOW - 1})
    expect_steps(
        desired(1, a, b),
        Current(device(), transfers=transfers, window=4),
        RequestChunks(D1, (1,)),
        RequestChunks(D2, (0, 1)),
        Wait(NOW + 4, f"chunks of {D1[:12]}"),
    )
    # An artifact with every missing chunk already asked for holds its slots but takes no share.
    transfers[D1] = transfer(D1, have=set(range(9)), outstanding={9: NOW - 1})
    expect_steps(
        desired(1, a, b),
        Current(device(), transfers=transfers, window=3),
        RequestChunks(D2, (0, 1)),
        Wait(NOW + 4, f"chunks of {D1[:12]}"),
    )


def test_a_model_whose_chunks_all_time_out_at_once_does_not_starve_its_sample() -> None:
    """Without a share each, a stalled model's timed-out chunks would take the whole window at
    every retry, and a sample the controller no longer serves would never be asked for again, so
    it would never fail the assignment."""
    a = replace(assignment(), sample_digest=D2)
    model = transfer(D1, have={0, 1, 2}, chunks=10, outstanding={i: NOW - 6 for i in range(3, 10)})
    sample = transfer(D2, chunks=1, outstanding={0: NOW - 6})
    steps = plan(desired(1, a), Current(device(), transfers={D1: model, D2: sample}, window=8), NOW)
    requests = [s for s in steps if isinstance(s, RequestChunks)]
    assert requests == [RequestChunks(D1, (3, 4, 5, 6)), RequestChunks(D2, (0,))], steps
    # A lone artifact still has the whole window.
    alone = plan(desired(1, assignment()), Current(device(), transfers={D1: model}, window=8), NOW)
    assert [s for s in alone if isinstance(s, RequestChunks)] == [RequestChunks(D1, (3, 4, 5, 6, 7, 8, 9))]
