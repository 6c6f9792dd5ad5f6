"""Tables for the operator commands people read most: models, devices, rollouts,
telemetry and drift (the rest use :func:`controller.cli_output.generic`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from rich.console import RenderableType
from rich.text import Text

from controller.cli_output import cell, local_time, record, table

# The order a device goes through a rollout, for the per-wave counts.
DEVICE_STATES = (
    "waiting",
    "shadow",
    "pending",
    "downloading",
    "verifying",
    "loading",
    "probation",
    "active",
    "failed",
    "rolled_back",
    "skipped",
)


def models_list(models: list[dict[str, Any]]) -> RenderableType:
    rows = [{"name": m["name"], **v} for m in models for v in m["versions"]]
    return table(rows, ["name", "version", "stage", "size", "created_at", "digest"])


def model_version(version: dict[str, Any]) -> Iterable[RenderableType]:
    yield record(
        version,
        title=f"{version['name']} {version['version']}",
        skip=("variants", "inputs", "outputs", "signature", "name", "version"),
    )
    yield table(version.get("inputs", []), title="inputs")
    yield table(version.get("outputs", []), title="outputs")
    yield table(
        version.get("variants", []),
        ["variant", "precision", "runtime", "status", "progress", "size", "latency_ms", "reason"],
        title="variants",
    )


def profile(data: dict[str, Any]) -> Iterable[RenderableType]:
    """A device class in brief (its TOML source is in `profiles show --json`)."""
    doc = data.get("doc", {})
    summary = {
        "id": data["id"],
        "name": doc.get("name"),
        "vendor": doc.get("vendor"),
        **{part: doc[part] for part in ("cpu", "memory", "runtimes", "inference") if part in doc},
        "updated_at": data.get("updated_at"),
    }
    yield record(summary, title=f"profile {data['id']}")
    if doc.get("sensors"):
        yield table(doc["sensors"], title="sensors")


def devices_list(devices: list[dict[str, Any]]) -> RenderableType:
    rows = []
    for d in devices:
        models = (d.get("reported") or {}).get("models", [])
        running = ", ".join(f"{m['tenant']}:{m['model_name']} {m['model_version']}" for m in models)
        rows.append({**d, "online": d["online"], "models": running})
    return table(rows, ["device_id", "online", "profile", "tags", "agent_version", "last_seen", "models"])


def rollouts_list(rollouts: list[dict[str, Any]]) -> RenderableType:
    rows = [
        {**r, "wave": f"{r['wave']}/{r['waves']}", "devices": len(r.get("devices", []))} for r in rollouts
    ]
    return table(
        rows, ["id", "model", "version", "tenant", "status", "state", "wave", "devices", "created_at"]
    )


def wave_counts(rollout: dict[str, Any]) -> list[dict[str, Any]]:
    """Devices by state, one row per wave."""
    by_wave: dict[int, Counter[str]] = {}
    for device in rollout.get("devices", []):
        by_wave.setdefault(device["wave"], Counter())[device["status"]] += 1
    rows = []
    for wave in sorted(by_wave):
        counts = by_wave[wave]
        rows.append({"wave": wave, "devices": sum(counts.values()), **{s: counts[s] for s in DEVICE_STATES}})
    return rows


def rollout(data: dict[str, Any], events: list[dict[str, Any]] | None = None) -> Iterable[RenderableType]:
    header = Text.assemble(
        (f"rollout {data['id']}", "bold"),
        f"  {data['model']} {data['version']} → tenant {data['tenant']}  ",
        (data["status"], _status_style(data["status"])),
        f" ({data['state']}), wave {data['wave']}/{data['waves']}, created {local_time(data['created_at'])}",
    )
    yield header
    if data.get("reason"):
        yield Text(f"reason: {data['reason']}")
    rows = wave_counts(data)
    shown = [s for s in DEVICE_STATES if any(r[s] for r in rows)]
    yield table(rows, ["wave", "devices", *shown], title="waves")
    yield table(
        data.get("devices", []), ["device_id", "wave", "status", "detail", "updated_at"], title="devices"
    )
    if events is not None:
        yield table(
            events[-12:],
            ["at", "kind", "wave", "device_id", "state", "reason"],
            title="events and gate verdicts",
        )


def _status_style(status: str) -> str:
    return {"succeeded": "green", "failed": "red"}.get(status, "yellow")


def rollout_events(events: list[dict[str, Any]]) -> RenderableType:
    return table(events, ["at", "kind", "wave", "device_id", "state", "reason"])


def telemetry(rows: list[dict[str, Any]]) -> RenderableType:
    flat = []
    for r in rows:
        system = r.get("system", {})
        models = "; ".join(
            f"{m['tenant']}:{m['model_name']} {m['model_version']} n={m['inference_count']} "
            f"err={m['error_count']} p95={cell('p95', m['latency_p95_ms'])}ms"
            for m in r.get("models", [])
        )
        flat.append(
            {
                "window_end_ms": r["window_end_ms"],
                "cpu_%": system.get("cpu_percent"),
                "mem_%": system.get("mem_percent"),
                "disk_%": system.get("disk_percent"),
                "temp_c": system.get("temperature_c"),
                "models": models,
            }
        )
    return table(
        flat,
        ["window_end_ms", "cpu_%", "mem_%", "disk_%", "temp_c", "models"],
        headers={"window_end_ms": "window end"},
    )


def device_events(events: list[dict[str, Any]]) -> RenderableType:
    return table(events, ["at_ms", "kind", "severity", "message", "attributes"], headers={"at_ms": "at"})


def drift_baseline(data: dict[str, Any]) -> RenderableType:
    """A baseline without its bin edges (one line per feature; `--json` has them)."""
    spec = data.get("spec", {})
    summary = {k: v for k, v in data.items() if k != "spec"}
    summary["features"] = len(spec.get("features", {}))
    summary["classes"] = spec.get("num_classes") or "-"
    return record(summary)


def drift(data: dict[str, Any]) -> Iterable[RenderableType]:
    """Drift windows: one row per window with its worst features, not every bin."""
    scalars = {k: v for k, v in data.items() if not isinstance(v, list | dict)}
    if scalars:
        yield record(scalars)
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            yield table([_drift_row(w) for w in value], title=key)
        elif isinstance(value, list):
            yield table([], ["window"], title=key)


def _drift_row(window: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in window.items() if not isinstance(v, list | dict)}
    for key, value in window.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            scored = [v for v in value if isinstance(v.get("psi"), int | float)]
            worst = sorted(scored, key=lambda v: -float(v["psi"]))[:3]
            row[f"worst {key}"] = ", ".join(
                f"{v.get('name', v.get('feature', '?'))}={v['psi']:.3g}" for v in worst
            )
    return row
