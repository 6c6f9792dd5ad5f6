"""Sample inputs and model signatures on the device: what the planner fetches, what staging runs,
what the state file keeps, and how a tenant's audio is framed from a signature."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from edgefleet_proto import fleet_pb2

from agent.errors import ModelError
from agent.reconciler import (
    Activate,
    CollectGarbage,
    Current,
    Phase,
    RequestManifest,
    TransferView,
    Verify,
    build_report,
    plan,
)
from agent.runtime import TensorSpec
from agent.samples import staging_inputs, synthesize
from agent.signature import InputRole, ModelSignature, OutputMeaning, framed, framing_problem
from agent.state import Assignment, Desired, DeviceState, Installed, TenantState
from agent.tenants import PreprocessSpec

MODEL, SAMPLE, OLD_SAMPLE = "1" * 64, "a" * 64, "b" * 64
NOW = 1000.0

# silero-vad's inputs as onnxruntime reports them.
SILERO_INPUTS = [
    TensorSpec("input", "float32", (-1, -1)),
    TensorSpec("state", "float32", (2, -1, 128)),
    TensorSpec("sr", "int64", ()),
]
SILERO = ModelSignature(
    inputs=(
        InputRole("input", "source", "NT", 0, "float32", (1, 576)),
        InputRole("state", "state", "", 1, "float32", (2, -1, 128), (0.0,), "stateN"),
        InputRole("sr", "constant", "", -1, "int64", (), (16000.0,)),
    ),
    outputs=(OutputMeaning("output", "scores", "float32", (-1, 1)), OutputMeaning("stateN", "state")),
)


def sampled(sample: str = SAMPLE) -> Assignment:
    return Assignment(
        "vad", "silero", "1", MODEL, 1000, sample_digest=sample, sample_size=300, signature=SILERO
    )


def steps(want: Assignment, current: Current) -> list[object]:
    """The plan, as if its report was already published."""
    d = Desired(1, (want,))
    current = replace(current, reported=build_report(d, current), reported_at=NOW)
    return list(plan(d, current, NOW))


def test_a_version_with_sample_inputs_stages_only_once_model_and_sample_are_on_disk() -> None:
    a = sampled()
    assert steps(a, Current(DeviceState())) == [RequestManifest(a), RequestManifest(a, sample=True)]
    # The model is on disk, the sample not yet: it is fetched, nothing stages.
    assert steps(a, Current(DeviceState(), installed=frozenset({MODEL}))) == [RequestManifest(a, sample=True)]
    done = TransferView(SAMPLE, has_manifest=True, chunks=1, have=frozenset({0}), bytes_total=300)
    assert steps(a, Current(DeviceState(), installed=frozenset({MODEL}), transfers={SAMPLE: done})) == [
        Verify(SAMPLE)
    ]
    assert steps(a, Current(DeviceState(), installed=frozenset({MODEL, SAMPLE}))) == [Activate(a)]


def test_the_report_counts_the_sample_in_the_download() -> None:
    a = sampled()
    half = TransferView(
        SAMPLE, has_manifest=True, chunks=2, have=frozenset({0}), bytes_have=150, bytes_total=300
    )
    current = Current(DeviceState(), installed=frozenset({MODEL}), transfers={SAMPLE: half})
    (entry,) = build_report(Desired(1, (a,)), current).models
    assert (entry.phase, entry.bytes_have, entry.bytes_total) == (Phase.DOWNLOADING, 1150, 1300)


def test_a_malformed_sample_digest_fails_before_any_download() -> None:
    a = sampled("not-a-digest")
    (fail,) = steps(a, Current(DeviceState()))
    assert "sample digest 'not-a-digest' is not a lowercase hex sha256" in fail.reason  # type: ignore[attr-defined]


def test_the_serving_versions_sample_is_kept_and_a_replaced_one_collected() -> None:
    a = sampled()
    state = DeviceState(Desired(1, (a,)), 1, {"vad": TenantState(Installed(a, "/m"))})
    installed = frozenset({MODEL, SAMPLE, OLD_SAMPLE})
    assert steps(a, Current(state, installed=installed)) == [CollectGarbage((OLD_SAMPLE,))]


def test_the_assignment_keeps_sample_and_signature_through_the_state_file() -> None:
    msg = fleet_pb2.ModelAssignment(
        tenant="vad",
        model_name="silero",
        model_version="1",
        artifact_digest=MODEL,
        artifact_size=1000,
        runtime="onnxruntime",
    )
    msg.sample_digest, msg.sample_size = SAMPLE, 300
    for role in SILERO.inputs:
        msg.model_signature.inputs.add(
            name=role.name,
            role=role.role,
            layout=role.layout,
            batch_axis=role.batch_axis,
            dtype=role.dtype,
            shape=role.shape,
            value=role.value,
            from_output=role.from_output,
        )
    for out in SILERO.outputs:
        msg.model_signature.outputs.add(name=out.name, meaning=out.meaning, dtype=out.dtype, shape=out.shape)
    a = Assignment.from_proto(msg)
    assert a == replace(sampled(), size=1000)
    state = DeviceState(Desired(3, (a,)), 2, {"vad": TenantState(Installed(a, "/m"))})
    back = DeviceState.from_json(json.loads(json.dumps(state.to_json())))
    assert back == state
    assert back.desired is not None and back.desired.assignments[0].signature == SILERO


def test_a_state_file_written_before_samples_and_signatures_loads_with_defaults() -> None:
    old = {
        "version": 1,
        "desired": {
            "generation": 1,
            "assignments": [{"tenant": "t", "model_name": "m", "model_version": "1", "digest": MODEL}],
        },
        "applied_generation": 1,
    }
    a = DeviceState.from_json(old).desired.assignments[0]  # type: ignore[union-attr]
    assert (a.sample_digest, a.sample_size, a.signature) == ("", 0, None)


def test_without_a_sample_staging_inputs_come_from_the_signature() -> None:
    made = synthesize(SILERO_INPUTS, SILERO)
    assert made["sr"].dtype == np.int64 and made["sr"].shape == () and int(made["sr"]) == 16000
    assert made["state"].shape == (2, 1, 128) and made["state"].dtype == np.float32
    assert made["input"].shape == (1, 1)
    # Without a signature: today's zeros, free dimensions 1 (silero-vad refuses them).
    plain = synthesize(SILERO_INPUTS, None)
    assert int(plain["sr"]) == 0 and plain["state"].shape == (2, 1, 128)


def test_staging_runs_the_first_item_along_each_inputs_batch_axis(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(3, 576)).astype(np.float32)
    state = rng.normal(size=(2, 3, 128)).astype(np.float32)
    np.savez(tmp_path / "s.npz", input=batch, state=state, sr=np.int64(16000))
    got = staging_inputs(SILERO_INPUTS, SILERO, tmp_path / "s.npz")
    np.testing.assert_array_equal(got["input"], batch[:1])
    np.testing.assert_array_equal(got["state"], state[:, :1])
    assert int(got["sr"]) == 16000
    # Without a signature no batch axis is known: the sample runs whole.
    whole = staging_inputs(SILERO_INPUTS, None, tmp_path / "s.npz")
    assert whole["input"].shape == (3, 576)


def test_a_sample_without_its_constants_takes_them_from_the_signature(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", input=np.zeros((1, 576), np.float32))
    got = staging_inputs(SILERO_INPUTS, SILERO, tmp_path / "s.npz")
    assert int(got["sr"]) == 16000 and got["state"].shape == (2, 1, 128)


@pytest.mark.parametrize(
    ("arrays", "problem"),
    [
        ({"state": np.zeros((2, 1, 128), np.float32)}, "the sample has no input 'input'"),
        (
            {"input": np.zeros(576, np.float32)},
            "sample input 'input' has shape [576], the model wants 2 dimensions",
        ),
        (
            {"input": np.zeros((1, 576), np.float32), "state": np.zeros((3, 1, 128), np.float32)},
            "sample input 'state' has shape [3, 1, 128], the model wants [2, -1, 128] (axis 0 differs)",
        ),
        (
            {"input": np.zeros((1, 576), np.float32), "sr": np.float64(16000)},
            "sample input 'sr' is float64, the model wants int64",
        ),
    ],
)
def test_a_sample_that_does_not_fit_names_the_input(
    tmp_path: Path, arrays: dict[str, np.ndarray], problem: str
) -> None:
    np.savez(tmp_path / "s.npz", **arrays)  # type: ignore[arg-type]
    with pytest.raises(ModelError) as caught:
        staging_inputs(SILERO_INPUTS, SILERO, tmp_path / "s.npz")
    assert problem in str(caught.value)


def test_a_sample_that_is_not_an_npz_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ModelError, match=r"is not a readable \.npz of arrays"):
        staging_inputs(SILERO_INPUTS, SILERO, tmp_path / "s.npz")
    np.save(tmp_path / "o.npy", np.array([object()], dtype=object), allow_pickle=True)
    (tmp_path / "o.npz").write_bytes((tmp_path / "o.npy").read_bytes())
    with pytest.raises(ModelError, match=r"is not a readable \.npz"):
        staging_inputs(SILERO_INPUTS, SILERO, tmp_path / "o.npz")
    np.save(tmp_path / "plain.npy", np.zeros((1, 576), np.float32))
    (tmp_path / "plain.npz").write_bytes((tmp_path / "plain.npy").read_bytes())
    with pytest.raises(ModelError, match="not named arrays"):
        staging_inputs(SILERO_INPUTS, SILERO, tmp_path / "plain.npz")


def test_an_audio_input_of_fixed_length_frames_the_tenants_audio() -> None:
    pre = PreprocessSpec(hop=512)
    assert (framed(pre, SILERO).window, framed(pre, SILERO).hop) == (576, 512)
    assert framed(PreprocessSpec(), SILERO).hop == 576
    # The tenant's own window wins; a free length or another layout frames nothing.
    assert framed(PreprocessSpec(window=1024), SILERO).window == 1024
    free = replace(SILERO, inputs=(replace(SILERO.inputs[0], shape=(-1, -1)), *SILERO.inputs[1:]))
    assert framed(pre, free) == pre
    rows = replace(SILERO, inputs=(replace(SILERO.inputs[0], layout="NC"), *SILERO.inputs[1:]))
    assert framed(pre, rows) == pre
    assert framed(pre, None) == pre


def test_a_call_that_sends_only_the_source_gets_constants_and_initial_state_from_the_signature() -> None:
    frames = np.ones((3, 576), np.float32)
    full = SILERO.completed({"input": frames}, SILERO_INPUTS)
    assert set(full) == {"input", "state", "sr"}
    assert full["input"] is frames
    # The state's batch axis (1) is as long as the source's batch (axis 0): one stream per row.
    assert full["state"].shape == (2, 3, 128) and full["state"].dtype == np.float32
    assert not full["state"].any()
    assert full["sr"].shape == () and full["sr"].dtype == np.int64 and int(full["sr"]) == 16000


def test_what_a_call_sends_is_kept_and_a_source_it_lacks_is_not_made_up() -> None:
    state = np.full((2, 1, 128), 0.5, np.float32)
    sent = {"input": np.ones((1, 576), np.float32), "state": state, "sr": np.array(8000, np.int64)}
    full = SILERO.completed(sent, SILERO_INPUTS)
    assert set(full) == set(sent) and all(full[name] is array for name, array in sent.items())
    # Without its source a call is the caller's mistake: the runtime names the missing input.
    assert set(SILERO.completed({"sr": np.array(8000, np.int64)}, SILERO_INPUTS)) == {"sr", "state"}


def test_a_hop_with_no_window_to_move_is_a_misfit_naming_why() -> None:
    hop = PreprocessSpec(hop=512)
    free = replace(SILERO, inputs=(replace(SILERO.inputs[0], shape=(-1, -1)), *SILERO.inputs[1:]))
    assert framing_problem(hop, SILERO) is None
    assert framing_problem(PreprocessSpec(hop=256, window=1024), free) is None
    assert framing_problem(PreprocessSpec(), free) is None
    problem = framing_problem(hop, free)
    assert problem == (
        "preprocess.hop: needs a window: the source input 'input' has no fixed length (shape [-1, -1]); "
        "declare a window or give the input its length in the signature"
    )
    rows = replace(SILERO, inputs=(replace(SILERO.inputs[0], layout="NC"), *SILERO.inputs[1:]))
    assert "is not audio (layout NC" in str(framing_problem(hop, rows))
    assert "the version has no signature" in str(framing_problem(hop, None))
