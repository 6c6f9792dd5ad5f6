"""Registry, profiles and per-device signed variants through the REST API and MQTT."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import decode_as
from edgefleet_proto.signing import manifest_bytes
from edgefleet_proto.topics import Kind, Topic

from controller.onnx_compat import ir_version_of, lowest_ir_version
from controller.signing import verify
from tests.support.controller_process import Ctl, messages_on
from tests.support.models import digits_mlp, sklearn_mlp
from tests.support.waiting import wait_until

PROFILES = Path(__file__).resolve().parents[3] / "firmware_profiles"


def upload(ctl: Ctl, path: Path, version: str, calibration: np.ndarray | None = None, **form: str) -> Any:
    files: dict[str, Any] = {"file": (path.name, path.read_bytes(), "application/octet-stream")}
    if calibration is not None:
        buf = io.BytesIO()
        np.savez(buf, X=calibration)
        files["calibration"] = ("cal.npz", buf.getvalue(), "application/octet-stream")
    return ctl.api("POST", "/v1/models/digits/versions", data={"version": version, **form}, files=files)


def ready(ctl: Ctl, version: str) -> dict[str, Any] | None:
    body: dict[str, Any] = ctl.api("GET", f"/v1/models/digits/versions/{version}").json()
    return body if all(v["status"] in ("ready", "rejected", "failed") for v in body["variants"]) else None


def test_upload_returns_before_quantization_and_the_report_follows(ctl: Ctl, tmp_path: Path) -> None:
    digits = sklearn_mlp(tmp_path / "mlp.onnx")
    response = upload(
        ctl,
        digits.path,
        "1",
        digits.samples[:100],
        metrics='{"accuracy": 0.9}',
        dynamic="true",
        task="classifier",
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["lineage"] == {
        "parent_version": "",
        "dataset_digest": "",
        "code_version": "",
        "metrics": {"accuracy": 0.9},
    }
    assert {v["variant"] for v in body["variants"] if v["status"] in ("pending", "running")} == {
        "onnx-int8-static",
        "onnx-int8-dynamic",
    }
    done = wait_until(lambda: ready(ctl, "1"), 120, "variants")
    for v in done["variants"]:
        assert v["status"] == "ready" and v["latency_ms"] > 0, v
        if v["source"] == "quantized":
            assert v["report"]["top1_agreement"] >= 0.99 and v["progress"] == 1.0
    second = upload(ctl, digits.path, "2", parent_version="1", metrics='{"accuracy": 0.93}')
    assert second.status_code == 201, second.text
    diff = ctl.api("GET", "/v1/models/digits/compare", params={"a": "1", "b": "2"}).json()
    assert diff["metrics"]["accuracy"]["delta"] > 0 and diff["b_descends_from_a"] and diff["same_artifact"]
    bad = upload(ctl, digits.path, "3", parent_version="7")
    assert bad.status_code == 422 and "parent version 7" in bad.json()["detail"]
    promoted = ctl.api("POST", "/v1/models/digits/versions/2/stage", json={"stage": "production"})
    assert promoted.status_code == 200 and promoted.json()["stage"] == "production"
    assert ctl.api("POST", "/v1/models/digits/versions/2/stage", json={"stage": "gone"}).status_code == 422
    ctl.api("POST", "/v1/models/digits/versions/1/stage", json={"stage": "archived"})
    ctl.register("cam-1")
    refused = ctl.api("POST", "/v1/rollouts", json={"model": "digits", "version": "1", "devices": ["cam-1"]})
    assert refused.status_code == 422 and "cam-1: version 1 is archived" in refused.json()["detail"]


def test_profiles_are_validated_registered_and_assigned(ctl: Ctl) -> None:
    text = (PROFILES / "raspberry-pi-zero-2-w.toml").read_text()
    broken = ctl.api(
        "POST", "/v1/profiles", json={"source": text.replace("cores = 4", "cores = 0"), "filename": "x.toml"}
    )
    assert broken.status_code == 422
    line = text.splitlines().index("cores = 4") + 1
    assert f"x.toml:{line}: cpu.cores: must be positive, got 0" in broken.json()["detail"]
    assert "x.toml:4: id: 'raspberry-pi-zero-2-w' differs from the file name 'x'" in broken.json()["detail"]
    created = ctl.api("POST", "/v1/profiles", json={"source": text, "filename": "raspberry-pi-zero-2-w.toml"})
    assert created.status_code == 201 and created.json()["doc"]["memory"]["model_budget_mb"] == 96
    assert ctl.api("POST", "/v1/profiles", json={"source": text}).status_code == 200
    assert [p["id"] for p in ctl.api("GET", "/v1/profiles").json()] == ["raspberry-pi-zero-2-w"]
    creds = ctl.api(
        "POST", "/v1/devices", json={"device_id": "cam-1", "profile": "raspberry-pi-zero-2-w"}
    ).json()
    assert creds["profile"] == "raspberry-pi-zero-2-w"
    assert ctl.api("POST", "/v1/devices", json={"device_id": "cam-2", "profile": "nope"}).status_code == 422
    ctl.register("cam-2")
    moved = ctl.api("PUT", "/v1/devices/cam-2/profile", json={"profile": "raspberry-pi-zero-2-w"})
    assert moved.status_code == 200 and moved.json()["profile"] == "raspberry-pi-zero-2-w"
    assert ctl.api("PUT", "/v1/devices/cam-2/profile", json={"profile": "nope"}).status_code == 404
    assert ctl.api("GET", "/v1/profiles/nope").status_code == 404


def test_each_device_is_sent_its_own_signed_variant(ctl: Ctl, tmp_path: Path) -> None:
    for name in ("raspberry-pi-zero-2-w", "jetson-orin-nano-8gb", "coral-dev-board"):
        ctl.api("POST", "/v1/profiles", json={"source": (PROFILES / f"{name}.toml").read_text()})
    digits = sklearn_mlp(tmp_path / "mlp.onnx")
    assert upload(ctl, digits.path, "1", digits.samples[:100]).status_code == 201
    variants = {v["variant"]: v for v in wait_until(lambda: ready(ctl, "1"), 120, "variants")["variants"]}
    key = bytes.fromhex(ctl.api("GET", "/v1/signing-key").json()["public_key"])
    peers = {}
    for device_id, profile in (
        ("zero", "raspberry-pi-zero-2-w"),
        ("orin", "jetson-orin-nano-8gb"),
        ("coral", "coral-dev-board"),
    ):
        creds = ctl.api("POST", "/v1/devices", json={"device_id": device_id, "profile": profile}).json()
        assert creds["controller_public_key"] == key.hex()
        peers[device_id] = ctl.device_peer(creds)
        peers[device_id].subscribe(str(Topic(device_id, Kind.DESIRED)))
    try:
        rollout = ctl.api(
            "POST",
            "/v1/rollouts",
            json={"model": "digits", "version": "1", "devices": ["zero", "orin", "coral"]},
        ).json()
        skipped = {d["device_id"]: d for d in rollout["devices"] if d["status"] == "skipped"}
        assert list(skipped) == ["coral"] and "needs onnxruntime" in skipped["coral"]["detail"]
        targets = ctl.api("GET", f"/v1/rollouts/{rollout['id']}/variants").json()
        assert [(t["device_id"], t["profile"], t["variant"], t["digest"]) for t in targets] == [
            ("coral", "coral-dev-board", "", ""),
            ("orin", "jetson-orin-nano-8gb", "onnx-fp32", variants["onnx-fp32"]["digest"]),
            ("zero", "raspberry-pi-zero-2-w", "onnx-int8-static", variants["onnx-int8-static"]["digest"]),
        ]
        assert targets[0]["skipped"] == skipped["coral"]["detail"]
        assert ctl.api("GET", "/v1/rollouts/nope/variants").status_code == 404
        for device_id, variant in (("zero", "onnx-int8-static"), ("orin", "onnx-fp32")):

            def desired(device_id: str = device_id) -> fleet_pb2.DesiredState | None:
                msgs = [
                    m for m in messages_on(peers[device_id], str(Topic(device_id, Kind.DESIRED))) if m.payload
                ]
                return decode_as(fleet_pb2.DesiredState, msgs[-1].payload) if msgs else None

            [m] = wait_until(desired, 15, f"desired state of {device_id}").models
            v = variants[variant]
            assert (m.variant, m.precision, m.artifact_digest, m.artifact_size) == (
                variant,
                v["precision"],
                v["digest"],
                v["size"],
            )
            assert m.key_id == v["key_id"] and not m.HasField("key_rotation")
            assert verify(
                key, m.signature, manifest_bytes("digits", "1", variant, m.artifact_digest, m.artifact_size)
            )
        assert not messages_on(peers["coral"], str(Topic("coral", Kind.DESIRED)))
    finally:
        for peer in peers.values():
            peer.close()


def test_variant_uploads_are_guarded_like_version_uploads(ctl: Ctl, tmp_path: Path) -> None:
    digits = sklearn_mlp(tmp_path / "mlp.onnx")
    assert upload(ctl, digits.path, "1").status_code == 201
    url = "/v1/models/digits/versions/1/variants"
    refused = ctl.client.post(url, files={"file": ("x.tflite", b"x")})
    assert refused.status_code == 401
    limit = ctl.settings.max_upload_bytes
    declared = ctl.api(
        "POST",
        url,
        content=b"x",
        headers={
            "content-length": str(limit + 2 * 1024 * 1024),
            "content-type": "multipart/form-data; boundary=b",
        },
    )
    assert declared.status_code == 413 and f"limit of {limit} bytes" in declared.json()["detail"]
    empty = ctl.api("POST", url, files={"file": ("x.tflite", b"")})
    assert empty.status_code == 422 and "empty" in empty.json()["detail"]


def test_a_model_written_at_an_ir_version_older_runtimes_cannot_read_reaches_them_lowered(
    ctl: Ctl, tmp_path: Path
) -> None:
    # The installed onnx writes IR 14; onnxruntime 1.20.1 (the Raspberry Pi profile) reads 10.
    mlp = digits_mlp(tmp_path / "mlp.onnx")
    assert ir_version_of(mlp.path) == 14
    newer = (PROFILES / "raspberry-pi-4-4gb.toml").read_text()
    newer = newer.replace('id = "raspberry-pi-4-4gb"', 'id = "pi-new-runtime"').replace(
        'onnxruntime = "1.20.1"', 'onnxruntime = "1.32.0"'
    )
    for source in ((PROFILES / "raspberry-pi-4-4gb.toml").read_text(), newer):
        assert ctl.api("POST", "/v1/profiles", json={"source": source}).status_code in (200, 201)
    assert upload(ctl, mlp.path, "1").status_code == 201  # no calibration: fp32 only
    variants = {v["variant"]: v for v in wait_until(lambda: ready(ctl, "1"), 60, "variants")["variants"]}
    assert set(variants) == {"onnx-fp32", "onnx-fp32-ir8"}
    original, lowered = variants["onnx-fp32"], variants["onnx-fp32-ir8"]
    assert (original["runtime_version"], lowered["runtime_version"]) == ("1.32", "1.12")
    assert lowered["status"] == "ready" and lowered["report"]["lowered_from"] == "onnx-fp32"
    artifacts = ctl.controller.registry.artifacts
    assert ir_version_of(artifacts.path(lowered["digest"])) == 8
    for device_id, profile in (("pi-old", "raspberry-pi-4-4gb"), ("pi-new", "pi-new-runtime")):
        assert (
            ctl.api("POST", "/v1/devices", json={"device_id": device_id, "profile": profile}).status_code
            == 201
        )
    rollout = ctl.api(
        "POST", "/v1/rollouts", json={"model": "digits", "version": "1", "devices": ["pi-old", "pi-new"]}
    )
    assert rollout.status_code == 201, rollout.text
    targets = ctl.api("GET", f"/v1/rollouts/{rollout.json()['id']}/variants").json()
    assert [(t["device_id"], t["variant"], t["digest"]) for t in targets] == [
        ("pi-new", "onnx-fp32", original["digest"]),
        ("pi-old", "onnx-fp32-ir8", lowered["digest"]),
    ]
    # The variant a produced one is made from keeps the lowest IR its content needs too.
    assert upload(ctl, mlp.path, "2", mlp.samples[:50]).status_code == 201
    done = {v["variant"]: v for v in wait_until(lambda: ready(ctl, "2"), 120, "variants")["variants"]}
    assert done["onnx-int8-static"]["status"] == "ready", done["onnx-int8-static"]
    produced = artifacts.path(done["onnx-int8-static"]["digest"])
    assert ir_version_of(produced) == lowest_ir_version(onnx.load(str(produced))) <= 10
