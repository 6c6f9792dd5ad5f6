"""The real-model corpus through the whole fleet: every third-party model of tests.support.realmodels
(MediaPipe's face detector and selfie segmentation, silero-vad, RapidOCR's text detector and
text-direction classifier), untouched, as an operator would run it.

For each model, on one shared fleet (mosquitto, the controller, three agent processes on
CPU-only device classes): upload with sample inputs, its variants with their gate figures, a
tenant declared on two devices and fed by media made here (a video written by OpenCV, a WAV
with silero-vad's state carried), a rollout in two waves, the tenant's raw outputs equal to the
file the device got run directly in LiteRT or onnxruntime on the same prepared inputs, its
post-processed results where the drawing or the speech is; then a broken copy of the model
(it loads and passes staging on its samples, and fails on the tenant's inputs) is stopped by
the error-rate gate at the first wave and rolled back.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
from edgefleet_proto import inference_pb2, inference_pb2_grpc

from agent.preprocess import letterbox
from agent.tensors import to_numpy
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.localfleet import Controller, register_agent, rollout_done, stop_all
from tests.support.media import face_frame, silence, speech_like, text_frame, write_video, write_wav
from tests.support.realmodels import fixed_shape_copy, overflowing_copy, sample_inputs
from tests.support.waiting import wait_until

# Each model's test waits with generous deadlines; a loaded machine may need them all.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROFILES = Path(__file__).resolve().parents[2] / "firmware_profiles"
DEVICES = {"pi4-a": "raspberry-pi-4-4gb", "pi4-b": "raspberry-pi-4-4gb", "zero": "raspberry-pi-zero-2-w"}
CAMERAS = ("pi4-a", "zero")
MICROPHONES = ("pi4-a", "pi4-b")  # the Zero 2 W has no microphone
TOKEN = "corpus-tenant-token-0123456789"
GATE = (
    "--max-error-rate",
    "0.02",
    "--min-inferences",
    "5",
    "--on-failure",
    "rollback",
    "--device-timeout",
    "120",
)
# Raw outputs of the agent and of the runtime run directly: the same kernels on the same input.
ATOL = 1e-4


@dataclass
class Fleet:
    controller: Controller
    agents: dict[str, AgentProcess]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One broker, controller and three agents shared by every model: starting them is most of
    what a fleet costs, and the models' tenants take turns on it."""
    root = tmp_path_factory.mktemp("corpus-fleet")
    broker = Broker(root / "mosquitto").start()
    controller = Controller(
        root / "controller", broker.port, passwd_file=broker.passwd_file, reload_command=broker.reload_command
    )
    agents: dict[str, AgentProcess] = {}
    try:
        controller.init()
        controller.start()
        for profile in set(DEVICES.values()):
            controller.cli("profiles", "register", str(PROFILES / f"{profile}.toml"))
        for device_id, profile in DEVICES.items():
            agent = register_agent(controller, root / "agents", device_id, telemetry_interval=0.5)
            controller.cli("devices", "set-profile", device_id, profile)
            agents[device_id] = agent.start()
        wait_until(
            lambda: all(controller.api("GET", f"/v1/devices/{d}").json()["online"] for d in DEVICES),
            60,
            "agents online",
        )
        yield Fleet(controller, agents)
    finally:
        stop_all(agents.values())
        controller.stop()
        broker.stop()


class Results:
    """A tenant's StreamResults on one agent, read in the background; opened again when the
    agent refuses or ends it (a tenant it does not serve yet), so nothing depends on timing."""

    def __init__(self, agent: AgentProcess, tenant: str) -> None:
        self.queue: queue.Queue[inference_pb2.Result] = queue.Queue()
        self.channel = agent.channel()
        self.tenant = tenant
        self.stop = threading.Event()
        self.call: Any = None
        self.refused = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        stub = inference_pb2_grpc.TenantResultsStub(self.channel)
        while not self.stop.is_set():
            self.call = stub.StreamResults(
                inference_pb2.StreamResultsRequest(tenant=self.tenant),
                metadata=[("x-edgefleet-token", TOKEN)],
            )
            try:
                for result in self.call:
                    self.queue.put(result)
            except grpc.RpcError as exc:
                self.refused = f"{exc.code()}: {exc.details()}"
            self.stop.wait(0.2)

    def until(
        self, enough: Callable[[list[inference_pb2.Result]], bool], timeout: float, what: str
    ) -> list[inference_pb2.Result]:
        got: list[inference_pb2.Result] = []

        def drained() -> bool:
            while not self.queue.empty():
                got.append(self.queue.get_nowait())
            return enough(got)

        try:
            wait_until(drained, timeout, what, interval=0.2)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}: {len(got)} results; the stream: {self.refused or 'open'}") from None
        finally:
            self.close()
        return got

    def close(self) -> None:
        self.stop.set()
        if self.call is not None:
            self.call.cancel()
        self.channel.close()


def outputs(result: inference_pb2.Result) -> dict[str, np.ndarray]:
    return {name: to_numpy(t) for name, t in result.outputs.items()}


def direct(path: Path) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The model file run directly: LiteRT for .tflite, onnxruntime otherwise; named outputs."""
    if path.read_bytes()[4:8] == b"TFL3":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(path))
        interpreter.allocate_tensors()

        def run_tflite(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            for d in interpreter.get_input_details():
                interpreter.set_tensor(d["index"], feed[d["name"]])
            interpreter.invoke()
            return {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}

        return run_tflite
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feed: dict(zip(names, session.run(names, feed), strict=True))


def save(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def print_variants(shown: dict[str, Any]) -> None:
    for v in shown["variants"]:
        report = {k: v.get("report", {}).get(k) for k in sorted(v.get("report") or {})}
        print(
            f"  {shown['name']} {shown['version']} {v['variant']}: {v['status']} {v['format']} {v['precision']}"
            f" {v['size']} bytes {v.get('reason') or ''} {report}"
        )


def upload(
    fleet: Fleet, name: str, version: str, model: Path, samples: Path, sensor: str, wait: bool = True
) -> dict[str, Any]:
    started = time.monotonic()
    fleet.controller.cli(
        "models", "upload", str(model), "--name", name, "--version", version,
        "--samples", str(samples), "--sensor", sensor,
        *(("--wait-timeout", "300") if wait else ("--no-wait",)),
    )  # fmt: skip
    shown: dict[str, Any] = fleet.controller.cli("models", "show", name, version)
    print(
        f"{name} {version}: uploaded{', variants done' if wait else ''} in {time.monotonic() - started:.0f} s"
    )
    print_variants(shown)
    if not wait:
        return shown
    assert all(v["status"] in ("ready", "rejected", "failed") for v in shown["variants"]), shown["variants"]
    for v in shown["variants"]:
        if v["status"] != "ready":
            assert v.get("reason"), v
    return shown


def rollout(fleet: Fleet, name: str, version: str, tenant: str, devices: Sequence[str], soak: int) -> str:
    args = ["rollouts", "create", "--model", name, "--version", version, "--tenant", tenant]
    for device_id in devices:
        args += ["--device", device_id]
    created = fleet.controller.cli(*args, "--wave", f"1:{soak}", "--wave", "100%:1", *GATE)
    return str(created["id"])


def active(fleet: Fleet, device_id: str, name: str, tenant: str) -> dict[str, Any] | None:
    reported = fleet.controller.api("GET", f"/v1/devices/{device_id}").json().get("reported") or {}
    return next(
        (
            m
            for m in reported.get("models", [])
            if (m["model_name"], m["tenant"], m["phase"]) == (name, tenant, "active")
        ),
        None,
    )


def set_tenants(fleet: Fleet, devices: Sequence[str], tenants: list[dict[str, Any]]) -> None:
    for device_id in devices:
        response = fleet.controller.api("PUT", f"/v1/devices/{device_id}/tenants", json=tenants)
        assert response.status_code == 200, response.text


def deploy(
    fleet: Fleet, name: str, model: Path, samples: dict[str, np.ndarray], tenant: dict[str, Any],
    devices: Sequence[str], sensor: str, workdir: Path,
) -> dict[str, Path]:  # fmt: skip
    """Version 1 uploaded with samples, the tenant declared, rolled out in two waves; the file
    each device runs (the variant the controller chose for its class)."""
    shown = upload(fleet, name, "1", model, save(workdir / f"{name}-1.npz", samples), sensor)
    set_tenants(fleet, devices, [tenant])
    started = time.monotonic()
    rid = rollout(fleet, name, "1", tenant["id"], devices, soak=2)
    final = wait_until(lambda: rollout_done(fleet.controller, rid), 240, f"the rollout of {name} 1")
    waves = {d["device_id"]: (d["wave"], d["status"]) for d in final["devices"]}
    print(f"{name} 1: {final['status']} in {time.monotonic() - started:.0f} s {waves}")
    assert final["status"] == "succeeded", final
    assert sorted(w for w, _ in waves.values()) == [1, 2] and {s for _, s in waves.values()} == {"active"}
    files = {}
    by_digest = {v["digest"]: v for v in shown["variants"]}
    for device_id in devices:
        entry = wait_until(
            functools.partial(active, fleet, device_id, name, tenant["id"]), 60, f"{name} on {device_id}"
        )
        variant = by_digest[entry["artifact_digest"]]
        print(f"  {device_id} ({DEVICES[device_id]}) runs {variant['variant']} ({variant['precision']})")
        files[device_id] = next(
            p for p in fleet.controller.data_dir.rglob(entry["artifact_digest"]) if p.is_file()
        )
    return files


def broken_copy_stopped_at_wave_one(
    fleet: Fleet, name: str, broken: Path, samples: dict[str, np.ndarray], tenant: str,
    devices: Sequence[str], sensor: str, workdir: Path,
) -> None:  # fmt: skip
    # Its variants are not waited for: whichever the device gets, it fails as the copy does.
    upload(fleet, name, "2", broken, save(workdir / f"{name}-2.npz", samples), sensor, wait=False)
    # The first wave soaks long enough for a busy machine's telemetry; the gate is judged
    # continuously, so the broken copy is stopped long before.
    started = time.monotonic()
    rid = rollout(fleet, name, "2", tenant, devices, soak=120)

    def finished() -> dict[str, Any] | None:
        r: dict[str, Any] = fleet.controller.api("GET", f"/v1/rollouts/{rid}").json()
        return r if r["state"] not in ("running", "rolling_back", "paused", "awaiting_approval") else None

    final = wait_until(finished, 240, f"the rollout of the broken {name} 2")
    print(f"broken {name} 2: {final['state']} in {time.monotonic() - started:.0f} s: {final['reason']}")
    assert final["state"] == "rolled_back", final
    assert final["reason"].startswith("wave 1 of 2") and "error rate" in final["reason"], final["reason"]
    [tried] = [d["device_id"] for d in final["devices"] if d["wave"] == 1]
    assert {d["status"] for d in final["devices"] if d["wave"] > 1} == {"waiting"}
    back = wait_until(
        lambda: (e := active(fleet, tried, name, tenant)) and e["model_version"] == "1" and e,
        90,
        f"{tried} back on {name} 1",
    )
    assert back["model_version"] == "1"
    for device_id in devices:
        entry = active(fleet, device_id, name, tenant)
        assert entry is not None and entry["model_version"] == "1", (device_id, entry)


def image_tenant(
    tenant_id: str,
    model: str,
    video: Path,
    preprocess: dict[str, Any],
    postprocess: dict[str, Any],
    rate_hz: float = 8,
) -> dict[str, Any]:
    return {
        "id": tenant_id,
        "model": model,
        "source": {"kind": "video", "uri": str(video), "options": {"loop": True}},
        "preprocess": preprocess,
        "postprocess": {**postprocess, "raw": True},
        "rate_hz": rate_hz,
        "queue": 16,
        "results": ["grpc"],
        "token": TOKEN,
    }


def prepared(
    frame: np.ndarray, size: tuple[int, int], scale: float, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """A BGR frame as the tenant declares it: resized with OpenCV (area), RGB, scaled, normalised."""
    rgb = cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_AREA)[:, :, ::-1]
    x: np.ndarray = (rgb.astype(np.float64) * scale - np.asarray(mean)) / np.asarray(std)
    return x.astype(np.float32)


def frames_seen(count: int, each: int) -> Callable[[list[inference_pb2.Result]], bool]:
    """At least ``each`` results of every one of ``count`` looping frames."""
    return lambda got: all(sum(1 for r in got if r.seq % count == i) >= each for i in range(count))


# -- MediaPipe face detection (TFLite, fp16-stored weights, float32 compute) ---------------------

FACES: list[tuple[int, int, int] | None] = [(200, 110, 60), (90, 140, 50), None]


def test_face_detection(fleet: Fleet, real_models: Callable[[str], Path], tmp_path: Path) -> None:
    model = real_models("face_detection_short_range")
    frames = write_video(tmp_path / "hall.avi", [face_frame(320, 240, f) for f in FACES])
    tenant = image_tenant(
        "faces", "face", tmp_path / "hall.avi",
        {"resize": [128, 128], "fit": "letterbox", "color": "rgb", "scale": 1 / 127.5, "mean": [1.0]},
        {"kind": "ssd", "output": "classificators", "boxes_output": "regressors", "strides": [8, 16, 16, 16],
         "threshold": 0.5, "labels": ["face"]},
    )  # fmt: skip
    files = deploy(
        fleet,
        "face",
        model,
        sample_inputs("face_detection_short_range", 8),
        tenant,
        CAMERAS,
        "camera",
        tmp_path,
    )
    for device_id in CAMERAS:
        run = direct(files[device_id])
        stream = Results(fleet.agents[device_id], "faces")
        got = stream.until(frames_seen(len(FACES), 2), 90, f"face results on {device_id}")
        worst = 0.0
        for r in got:
            index = r.seq % len(FACES)
            boxed, _ = letterbox(frames[index], 128, 128)
            x = (boxed[:, :, ::-1].astype(np.float64) / 127.5 - 1.0)[None].astype(np.float32)
            want, have = run({"input": x}), outputs(r)
            worst = max(worst, *(float(np.abs(have[k] - want[k]).max()) for k in want))
            face = FACES[index]
            if face is None:
                assert list(r.detections) == [], f"frame {index} has no face: {r.detections}"
                continue
            [d] = r.detections
            cx, cy, radius = face
            assert d.label == "face" and d.score > 0.5
            assert abs((d.x0 + d.x1) / 2 * 320 - cx) < radius / 3, (index, d)
            assert abs((d.y0 + d.y1) / 2 * 240 - cy) < radius / 2, (index, d)
        print(f"face on {device_id}: {len(got)} results, max |tenant - LiteRT direct| = {worst:.2e}")
        assert worst < ATOL

    # Brighter frames than its (dimmed) samples turn its outputs NaN: staging passes, the tenant fails.
    dim = {"input": sample_inputs("face_detection_short_range", 4)["input"] * 0.2}
    broken = overflowing_copy(model, tmp_path / "face-broken.tflite", 0.5)
    broken_copy_stopped_at_wave_one(fleet, "face", broken, dim, "faces", CAMERAS, "camera", tmp_path)
    set_tenants(fleet, CAMERAS, [])


# -- MediaPipe selfie segmentation (TFLite): the mask covers the drawn person -------------------


def test_selfie_segmentation(fleet: Fleet, real_models: Callable[[str], Path], tmp_path: Path) -> None:
    model = real_models("selfie_segmentation")
    frames = write_video(tmp_path / "desk.avi", [face_frame(320, 240, f) for f in FACES])
    tenant = image_tenant(
        "people", "selfie", tmp_path / "desk.avi",
        {"resize": [256, 256], "color": "rgb", "scale": 1 / 255},
        {"kind": "mask", "threshold": 0.5},
    )  # fmt: skip
    files = deploy(
        fleet, "selfie", model, sample_inputs("selfie_segmentation", 4), tenant, CAMERAS, "camera", tmp_path
    )
    rows, cols = np.mgrid[0:256, 0:256]
    for device_id in CAMERAS:
        run = direct(files[device_id])
        stream = Results(fleet.agents[device_id], "people")
        got = stream.until(frames_seen(len(FACES), 2), 90, f"selfie results on {device_id}")
        worst, covered = 0.0, []
        for r in got:
            index = r.seq % len(FACES)
            x = prepared(frames[index], (256, 256), 1 / 255, [0.0], [1.0])[None]
            want, have = run({"input_1": x}), outputs(r)
            worst = max(worst, *(float(np.abs(have[k] - want[k]).max()) for k in want))
            mask = to_numpy(r.mask).reshape(256, 256)
            face = FACES[index]
            if face is None:
                assert mask.mean() < 0.02, f"frame {index} has nobody: {mask.mean():.3f} of it masked"
                continue
            cx, cy, radius = face
            # The drawn face's ellipse, in the model's 256x256 (stretched) frame.
            inside = ((cols * 320 / 256 - cx) / (0.8 * radius)) ** 2 + (
                (rows * 240 / 256 - cy) / radius
            ) ** 2 <= 1
            covered.append((float(mask[inside].mean()), float(mask[~inside].mean())))
            assert mask[inside].mean() > 0.8 and mask[~inside].mean() < 0.1, (index, covered[-1])
        print(
            f"selfie on {device_id}: {len(got)} results, max |tenant - LiteRT direct| = {worst:.2e};"
            f" mask covers (face, background): {sorted(set((round(a, 3), round(b, 4)) for a, b in covered))}"
        )
        assert worst < ATOL

    dim = {"input_1": sample_inputs("selfie_segmentation", 2)["input_1"] * 0.2}
    broken = overflowing_copy(model, tmp_path / "selfie-broken.tflite", 0.5)
    broken_copy_stopped_at_wave_one(fleet, "selfie", broken, dim, "people", CAMERAS, "camera", tmp_path)
    set_tenants(fleet, CAMERAS, [])


# -- silero-vad (ONNX, stateful): a WAV, state carried from stateN back into state --------------

WINDOW, HOP, RATE = 576, 512, 16000


def test_silero_vad(fleet: Fleet, real_models: Callable[[str], Path], tmp_path: Path) -> None:
    model = real_models("silero_vad")
    audio = write_wav(tmp_path / "room.wav", np.concatenate([speech_like(1.5), silence(1.5)]))
    frames = np.stack([audio[i : i + WINDOW] for i in range(0, len(audio) - WINDOW + 1, HOP)])
    tenant = {
        "id": "voice",
        "model": "vad",
        "source": {"kind": "wav", "uri": str(tmp_path / "room.wav"), "options": {"chunk": HOP}},
        "preprocess": {"window": WINDOW, "hop": HOP},
        "inputs": {
            "sr": {"role": "constant", "value": RATE, "dtype": "int64"},
            "state": {"role": "state", "from": "stateN", "shape": [2, 1, 128], "value": 0.0},
        },
        "postprocess": {
            "kind": "threshold",
            "output": "output",
            "threshold": 0.1,
            "labels": ["speech"],
            "raw": True,
        },
        "queue": 256,
        "results": ["grpc"],
        "token": TOKEN,
    }
    files = deploy(
        fleet, "vad", model, sample_inputs("silero_vad", 8), tenant, MICROPHONES, "microphone", tmp_path
    )

    def whole_run(got: list[inference_pb2.Result]) -> bool:
        """A run of the WAV (a source epoch) that the model saw from its first frame to its last."""
        epochs: dict[int, set[int]] = {}
        for r in got:
            epochs.setdefault(r.source_epoch, set()).add(r.seq)
        return any(seqs >= set(range(len(frames))) for seqs in epochs.values())

    for device_id in MICROPHONES:
        run = direct(files[device_id])
        state, want = np.zeros((2, 1, 128), np.float32), []
        for frame in frames:
            out = run({"input": frame[None], "state": state, "sr": np.array(RATE, np.int64)})
            state = out["stateN"]
            want.append(float(out["output"].reshape(-1)[0]))
        stream = Results(fleet.agents[device_id], "voice")
        got = stream.until(whole_run, 120, f"a whole run of the WAV through the tenant on {device_id}")
        epoch = next(
            e for e in {r.source_epoch for r in got} if whole_run([r for r in got if r.source_epoch == e])
        )
        results = {r.seq: r for r in got if r.source_epoch == epoch}
        have = np.array([float(outputs(results[i])["output"].reshape(-1)[0]) for i in range(len(frames))])
        worst = float(np.abs(have - np.array(want)).max())
        speech, quiet = have[: len(frames) // 2 - 2], have[len(frames) // 2 + 2 :]
        voiced = [i for i in range(len(frames)) if [c.label for c in results[i].classes] == ["speech"]]
        print(
            f"vad on {device_id}: {len(frames)} frames, state carried, max |tenant - onnxruntime direct| = {worst:.2e};"
            f" speech scores mean {speech.mean():.3f} max {speech.max():.3f}, silence mean {quiet.mean():.4f}"
            f" max {quiet.max():.4f}; frames labelled speech: {voiced}"
        )
        assert worst < ATOL
        assert speech.mean() > 5 * quiet.mean() and speech.max() > 10 * quiet.max()
        assert voiced and max(voiced) < len(frames) // 2, voiced

    # Louder audio than its (quietened) samples turns its score NaN.
    samples = sample_inputs("silero_vad", 4)
    quiet_samples = {**samples, "input": samples["input"] * 0.2}
    broken = overflowing_copy(model, tmp_path / "vad-broken.onnx", 0.2)
    broken_copy_stopped_at_wave_one(
        fleet, "vad", broken, quiet_samples, "voice", MICROPHONES, "microphone", tmp_path
    )
    set_tenants(fleet, MICROPHONES, [])


# -- RapidOCR text detection (PaddleOCR v4, ONNX): the text map lights up on the printed text ----

OCR_MEAN, OCR_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TEXTS = [("EDGE FLEET", (40, 140), 1.4), ("OCR 2026", (120, 60), 1.0)]


def test_ocr_text_detection(fleet: Fleet, real_models: Callable[[str], Path], tmp_path: Path) -> None:
    model = real_models("ppocr_det")
    drawn = [text_frame(320, 240, text, at, scale) for text, at, scale in TEXTS]
    frames = write_video(tmp_path / "labels.avi", [frame for frame, _ in drawn])
    tenant = image_tenant(
        "labels", "textdet", tmp_path / "labels.avi",
        {"resize": [192, 256], "color": "rgb", "scale": 1 / 255, "mean": OCR_MEAN, "std": OCR_STD, "layout": "nchw"},
        {"kind": "mask", "threshold": 0.3}, rate_hz=4,
    )  # fmt: skip
    files = deploy(
        fleet, "textdet", model, sample_inputs("ppocr_det", 8), tenant, CAMERAS, "camera", tmp_path
    )
    rows, cols = np.mgrid[0:192, 0:256]
    for device_id in CAMERAS:
        run = direct(files[device_id])
        stream = Results(fleet.agents[device_id], "labels")
        got = stream.until(frames_seen(len(TEXTS), 2), 90, f"text maps on {device_id}")
        worst, lit = 0.0, []
        for r in got:
            index = r.seq % len(TEXTS)
            x = prepared(frames[index], (192, 256), 1 / 255, OCR_MEAN, OCR_STD).transpose(2, 0, 1)[None]
            want, have = run({"x": x}), outputs(r)
            worst = max(worst, *(float(np.abs(have[k] - want[k]).max()) for k in want))
            mask = to_numpy(r.mask).reshape(192, 256)
            x0, y0, x1, y1 = drawn[index][1]
            inside = (
                (cols * 320 / 256 >= x0)
                & (cols * 320 / 256 <= x1)
                & (rows * 240 / 192 >= y0)
                & (rows * 240 / 192 <= y1)
            )
            lit.append((float(mask[inside].mean()), float(mask[~inside].mean())))
            assert mask[inside].mean() > 0.2 and mask[~inside].mean() < 0.01, (index, lit[-1])
        print(
            f"textdet on {device_id}: {len(got)} results, max |tenant - onnxruntime direct| = {worst:.2e};"
            f" text map lit (text box, elsewhere): {sorted(set((round(a, 3), round(b, 4)) for a, b in lit))}"
        )
        assert worst < ATOL

    # A re-export traced at its 96x96 samples: it refuses the tenant's 192x256 frames.
    broken = fixed_shape_copy(model, tmp_path / "textdet-broken.onnx", [-1, 3, 96, 96])
    samples = sample_inputs("ppocr_det", 4)
    broken_copy_stopped_at_wave_one(fleet, "textdet", broken, samples, "labels", CAMERAS, "camera", tmp_path)
    set_tenants(fleet, CAMERAS, [])


# -- RapidOCR text direction (PaddleOCR mobile v2, ONNX): upright and upside-down lines --------

LINES = [False, True, False]  # upside down?


def test_ocr_text_direction(fleet: Fleet, real_models: Callable[[str], Path], tmp_path: Path) -> None:
    model = real_models("ppocr_cls")
    frames = write_video(
        tmp_path / "lines.avi",
        [text_frame(192, 48, "EDGE FLEET 42", (6, 36), 1.2, flip)[0] for flip in LINES],
    )
    tenant = image_tenant(
        "lines", "textdir", tmp_path / "lines.avi",
        {"resize": [48, 192], "color": "rgb", "scale": 1 / 255, "mean": [0.5], "std": [0.5], "layout": "nchw"},
        {"kind": "classes", "top_k": 1, "labels": ["0", "180"]},
    )  # fmt: skip
    files = deploy(
        fleet, "textdir", model, sample_inputs("ppocr_cls", 8), tenant, CAMERAS, "camera", tmp_path
    )
    for device_id in CAMERAS:
        run = direct(files[device_id])
        stream = Results(fleet.agents[device_id], "lines")
        got = stream.until(frames_seen(len(LINES), 2), 90, f"text directions on {device_id}")
        worst = 0.0
        for r in got:
            index = r.seq % len(LINES)
            x = prepared(frames[index], (48, 192), 1 / 255, [0.5], [0.5]).transpose(2, 0, 1)[None]
            want, have = run({"x": x}), outputs(r)
            worst = max(worst, *(float(np.abs(have[k] - want[k]).max()) for k in want))
            [top] = r.classes
            assert top.label == ("180" if LINES[index] else "0") and top.score > 0.9, (index, top)
        print(f"textdir on {device_id}: {len(got)} results, max |tenant - onnxruntime direct| = {worst:.2e}")
        assert worst < ATOL

    # A re-export traced at 48x160 crops: it refuses the tenant's 48x192 lines.
    broken = fixed_shape_copy(model, tmp_path / "textdir-broken.onnx", [-1, 3, 48, 160])
    samples = {"x": np.ascontiguousarray(sample_inputs("ppocr_cls", 4)["x"][..., :160])}
    broken_copy_stopped_at_wave_one(fleet, "textdir", broken, samples, "lines", CAMERAS, "camera", tmp_path)
    set_tenants(fleet, CAMERAS, [])
