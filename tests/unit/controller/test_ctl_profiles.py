"""Device profiles: the schema validator (line-precise), registration, devices in profiles."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.errors import DeviceNotFound, InvalidInputError, InvalidProfile, ProfileNotFound
from controller.profiles import Profiles, parse_profile
from tests.unit.controller.helpers import Parts

pytestmark = pytest.mark.both_backends

PROFILES = Path(__file__).resolve().parents[3] / "firmware_profiles"
GOOD = (PROFILES / "raspberry-pi-4-4gb.toml").read_text()


def test_the_shipped_profiles_are_valid_and_cover_six_device_classes() -> None:
    files = sorted(PROFILES.glob("*.toml"))
    assert len(files) >= 6
    classes = {p.stem: parse_profile(p.read_text(), p.name, p.stem).device_class() for p in files}
    assert classes["raspberry-pi-zero-2-w"].model_budget_bytes == 96 * 1024 * 1024
    assert classes["coral-dev-board"].max_onnx_opset is None and classes["coral-dev-board"].accelerated
    assert {c.profile_id for c in classes.values()} == set(classes)


def problems(text: str) -> list[str]:
    with pytest.raises(InvalidProfile) as info:
        parse_profile(text, "dev.toml")
    return str(info.value).splitlines()


def test_each_problem_names_the_file_line_and_field() -> None:
    text = GOOD.replace("cores = 4", 'cores = "four"').replace(
        'architecture = "aarch64"', 'architecture = "mips"'
    )
    text = text.replace("model_budget_mb = 1024", "model_budget_mb = 8192").replace("fps = 50", "fps = -1")
    lines = text.splitlines()
    line_of = {
        key: lines.index(next(x for x in lines if x.startswith(key))) + 1
        for key in ("cores", "architecture", "model_budget_mb", "fps")
    }
    assert problems(text) == [
        f"dev.toml:{line_of['cores']}: cpu.cores: expected int, got str 'four'",
        f"dev.toml:{line_of['architecture']}: cpu.architecture: 'mips' is not one of aarch64, armv7l, x86_64",
        f"dev.toml:{line_of['model_budget_mb']}: memory.model_budget_mb: 8192 MB is more than the 4096 MB of RAM",
        f"dev.toml:{line_of['fps']}: sensors[0].fps: must be positive, got -1",
    ]


def test_missing_unknown_and_inconsistent_keys() -> None:
    text = GOOD.replace("max_onnx_opset = 21\n", "").replace('vendor = "Raspberry Pi Ltd"\n', "colour = 1\n")
    text = text.replace('preferred_precision = "int8"', 'preferred_precision = "fp16"')
    text = text.replace("sample_rate_hz = 16000\n", "")
    found = problems(text)
    assert "dev.toml: vendor: missing (required)" in found
    assert any(
        p.endswith("colour: unknown key (expected one of schema_version, id, name, vendor)") for p in found
    )
    preferred = text.splitlines().index('preferred_precision = "fp16"') + 1
    assert (
        f"dev.toml:{preferred}: inference.preferred_precision: 'fp16' is not in [inference] precisions"
        in found
    )
    assert any("inference: onnxruntime is installed but max_onnx_opset is missing" in p for p in found)
    mic = next(p for p in found if "sample_rate_hz" in p)
    assert mic.startswith("dev.toml:") and "sensors[1]: missing required key 'sample_rate_hz'" in mic
    lines = text.splitlines()
    header = lines.index("[[sensors]]", lines.index("[[sensors]]") + 1) + 1
    assert mic.startswith(f"dev.toml:{header}:")


def test_broken_toml_and_wrong_id() -> None:
    [only] = problems(GOOD.replace("cores = 4", "cores = = 4"))
    assert only.startswith("dev.toml:11: invalid TOML")
    with pytest.raises(InvalidProfile, match=r"raspberry-pi-4-4gb.*differs from the file name 'pi4'"):
        parse_profile(GOOD, "pi4.toml", expected_id="pi4")


def test_register_update_and_put_devices_in_profiles(tmp_path: Path, store_url: str) -> None:
    p = Parts(tmp_path, database_url=store_url)
    profiles = Profiles(p.store, p.registry, clock=iter([10.0, 20.0]).__next__)
    created, new = profiles.register(GOOD, "raspberry-pi-4-4gb.toml", "raspberry-pi-4-4gb")
    assert new and created.id == "raspberry-pi-4-4gb" and created.doc["memory"]["model_budget_mb"] == 1024
    updated, new = profiles.register(GOOD.replace("model_budget_mb = 1024", "model_budget_mb = 512"))
    assert not new and (updated.created_at, updated.updated_at) == (10.0, 20.0)
    assert profiles.get("raspberry-pi-4-4gb").device_class().model_budget_bytes == 512 * 1024 * 1024
    with pytest.raises(InvalidProfile):
        profiles.register("id = 1")
    assert [x.id for x in profiles.all()] == ["raspberry-pi-4-4gb"]

    p.fleet.register("cam-1", profile="raspberry-pi-4-4gb")
    assert p.fleet.get("cam-1").profile == "raspberry-pi-4-4gb"
    with pytest.raises(InvalidInputError, match="unknown profile 'nope'"):
        p.fleet.register("cam-2", profile="nope")
    assert not p.fleet.is_known("cam-2")
    p.fleet.register("cam-2")
    assert p.fleet.get("cam-2").profile == "" and profiles.of_device("cam-2") is None
    profiles.assign("cam-2", "raspberry-pi-4-4gb")
    assert profiles.of_device("cam-2") == profiles.get("raspberry-pi-4-4gb")
    with pytest.raises(ProfileNotFound):
        profiles.assign("cam-2", "nope")
    with pytest.raises(DeviceNotFound):
        profiles.assign("ghost", "raspberry-pi-4-4gb")


def test_target_signs_the_chosen_variant_and_counts_other_tenants_against_the_budget(
    tmp_path: Path, store_url: str
) -> None:
    from edgefleet_proto import fleet_pb2
    from edgefleet_proto.codec import encode
    from edgefleet_proto.signing import manifest_bytes

    from controller.signing import verify
    from tests.support.models import digits_mlp

    p = Parts(tmp_path, database_url=store_url)
    profiles = Profiles(p.store, p.registry)
    profiles.register((PROFILES / "raspberry-pi-zero-2-w.toml").read_text())
    found = p.registry.upload("mlp", "1", digits_mlp(tmp_path / "mlp.onnx").path.open("rb"), {})
    p.fleet.register("zero", profile="raspberry-pi-zero-2-w")
    p.fleet.register("bare")
    base = fleet_pb2.ModelAssignment(tenant="default", model_name="mlp", model_version="1", rollout_id="r1")

    targeted = profiles.target("zero", found, base)
    m = targeted.assignment
    assert (
        m is not None
        and targeted.choice.reason == "best available precision fp32 for profile raspberry-pi-zero-2-w"
    )
    # The upload states IR 14 (the installed onnx's), which the profile's onnxruntime 1.20.1
    # cannot read: the device gets the copy at IR 8, the same graph and weights.
    lowered = found.variant("onnx-fp32-ir8")
    assert lowered is not None and "onnx-fp32" in targeted.choice.rejected
    assert (m.variant, m.precision, m.format, m.runtime, m.artifact_digest, m.rollout_id) == (
        "onnx-fp32-ir8", "fp32", "onnx", "onnxruntime", lowered.digest, "r1",
    )  # fmt: skip
    assert verify(
        p.registry.signer.public_key,
        m.signature,
        manifest_bytes("mlp", "1", "onnx-fp32-ir8", m.artifact_digest, m.artifact_size),
    )
    assert profiles.target("bare", found, base).assignment is not None  # no profile: the uploaded variant

    # Another tenant's model already takes the whole 96 MB (twice its 48 MB file).
    big = fleet_pb2.ModelAssignment(tenant="audio", artifact_size=48 * 1024 * 1024)
    p.store.execute(
        "UPDATE devices SET desired = ? WHERE device_id = 'zero'",
        (encode(fleet_pb2.DesiredState(device_id="zero", generation=1, models=[big])),),
    )
    full = profiles.target("zero", found, base)
    assert full.assignment is None and "budgets 0 MB for models" in full.choice.reason
    p.registry.set_stage("mlp", "1", "archived")
    assert profiles.target("bare", found, base).assignment is not None  # found is the snapshot taken before
    archived = profiles.target("bare", p.registry.get("mlp", "1"), base)
    assert archived.assignment is None and archived.choice.reason == "version 1 is archived"
