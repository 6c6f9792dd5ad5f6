"""``edgefleet``: the controller server and the operator's commands over REST.

Operator commands print tables on stdout, or with --json the API's JSON (for scripts);
a refused request prints the API's message on stderr and exits 1. The controller is
found through EDGEFLEET_URL and EDGEFLEET_TOKEN (or --url and --token).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import httpx
import tomli_w

from controller import bundles, cli_output, cli_progress, cli_views
from controller.cli_output import View
from controller.errors import ControllerError
from controller.files import atomic_write
from controller.log_bounds import LineBound
from controller.settings import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_UPLOAD_BYTES, PROTOCOLS, Settings

if TYPE_CHECKING:
    from controller.roles import Role

log = logging.getLogger("controller.cli")

DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT_S = 60.0
UPLOAD_TIMEOUT_S = 600.0


class CommandError(Exception):
    """An operator command failed; the message goes to stderr."""


class Unreachable(CommandError):
    """No answer from the controller at all (not running, wrong address)."""


def _setup_logging(default_level: str) -> None:
    logging.basicConfig(
        level=os.environ.get("EDGEFLEET_LOG_LEVEL", default_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request at INFO: noise on an operator's terminal.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # A device chooses what it sends; no line it shapes may grow without bound.
    for handler in logging.getLogger().handlers:
        handler.addFilter(LineBound())


# -- controller init / serve --------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from controller import service

    data_dir = Path(args.data_dir).resolve()
    if args.rotate_token:
        token = service.rotate_token(data_dir)
        print("new admin token (a running server switches to it at once):", file=sys.stderr)
    else:
        options = service.InitOptions(
            broker_host=args.broker_host,
            broker_port=args.broker_port,
            mosquitto_passwd_file=Path(args.mosquitto_passwd_file).resolve()
            if args.mosquitto_passwd_file
            else None,
            broker_reload_command=args.broker_reload_command,
            mqtt_protocol=args.mqtt_protocol,
            chunk_size=args.chunk_size,
            max_upload_bytes=args.max_upload_bytes,
            mqtt_tls_ca_file=Path(args.mqtt_tls_ca_file).resolve() if args.mqtt_tls_ca_file else None,
            mqtt_client_certificate=args.mqtt_client_certificate,
            rollup_window_s=args.rollup_window_s,
            database_url=_database_url(args.database),
        )
        token = service.initialise(data_dir, options)
        broker = service.broker_files(data_dir)
        if args.json:
            print(json.dumps({"data_dir": str(data_dir), "token": token, **_broker_doc(broker)}, indent=2))
            return 0
        print(_next_steps(data_dir, broker, args.mosquitto_passwd_file is None), file=sys.stderr)
    if args.json:
        print(json.dumps({"data_dir": str(data_dir), "token": token}, indent=2))
        return 0
    print(token)
    return 0


def _database_url(url: str) -> str:
    """``--database`` as controller.toml keeps it: a SQLite path made absolute (``serve`` may
    run from another folder), anything else checked and kept as given."""
    from controller.store import check_url

    if not url:
        return ""
    check_url(url)
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url[len(prefix) :].startswith("/"):
        return prefix + str(Path(url[len(prefix) :]).resolve())
    return url


def _next_steps(data_dir: Path, broker: Any, own_broker: bool) -> str:
    """What to run after init, printed on stderr above the token (stdout)."""
    from controller.mosquitto_config import mosquitto_binary

    folder = shlex.quote(str(data_dir))
    lines = [f"initialised {data_dir}"]
    if own_broker:
        lines += [
            f"its broker (Mosquitto) is configured in {broker.conf}; start it with:",
            "",
            f"    {broker.start_command()}",
            "",
        ]
        if mosquitto_binary() is None:
            lines += ["(Mosquitto is not installed: sudo apt-get install -y mosquitto)", ""]
    lines += [
        "then start the controller and point the CLI at it with the token below:",
        "",
        f"    edgefleet controller serve --data-dir {folder} --port 8080",
        f"    export EDGEFLEET_URL={DEFAULT_URL} EDGEFLEET_TOKEN=<the token below>",
        "",
        f"admin token (shown once; `edgefleet controller init --data-dir {folder} --rotate-token` prints a new one):",
    ]
    return "\n".join(lines)


def _broker_doc(broker: Any) -> dict[str, str]:
    return {
        "broker_config": str(broker.conf),
        "broker_start_command": broker.start_command(),
        "broker_reload_command": broker.reload_command(),
    }


def cmd_tls(args: argparse.Namespace) -> int:
    from controller import service

    settings = service.configure_tls(
        Path(args.data_dir).resolve(),
        Path(args.mqtt_tls_ca_file).resolve(),
        args.broker_port,
        args.mqtt_client_certificate,
    )
    print(
        f"broker TLS set in {settings.settings_path} (port {settings.broker_port}); "
        "restart `controller serve` to use it",
        file=sys.stderr,
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from controller import roles as roles_mod
    from controller import settings as settings_mod
    from controller.api import create_app
    from controller.transport import broker_tls_context

    roles = roles_mod.parse_roles(args.roles)
    if args.instance is not None:
        roles_mod.account(args.instance)  # out of range: refused before anything opens
    settings = settings_mod.load(Path(args.data_dir).resolve())
    broker_tls_context(settings)  # unusable TLS files: a clear error now, not a failed startup
    if roles_mod.Role.API not in roles:
        return _serve_without_api(settings, roles, args.instance)
    app = create_app(settings, roles=roles, instance=args.instance)
    url = f"http://{args.host}:{args.port}"
    described = roles_mod.describe(roles)

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                log.info("controller ready url=%s data_dir=%s roles=%s", url, settings.data_dir, described)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False)
    Server(config).run()
    return 0


def _serve_without_api(settings: Settings, roles: frozenset[Role], instance: int | None) -> int:
    """A controller process without the REST API (ingest, chunks or engine workers): its MQTT
    session and background work until SIGTERM or SIGINT."""
    import signal
    import threading

    from controller import roles as roles_mod
    from controller.service import Controller

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    controller = Controller(settings, roles, instance)
    try:
        controller.start_transport()
        log.info(
            "controller ready roles=%s account=%s data_dir=%s",
            roles_mod.describe(roles),
            controller.account,
            settings.data_dir,
        )
        stop.wait()
    finally:
        controller.close()
    return 0


# -- operator commands over REST ----------------------------------------------


HOW_TO_CONNECT = (
    "set EDGEFLEET_URL to the controller's address (e.g. export EDGEFLEET_URL=http://127.0.0.1:8080) "
    "and EDGEFLEET_TOKEN to the admin token `edgefleet controller init` printed "
    "(`edgefleet controller init --data-dir DIR --rotate-token` prints a new one), or pass --url and --token"
)


def _client(args: argparse.Namespace, timeout: float = TIMEOUT_S) -> httpx.Client:
    if not args.token:
        raise CommandError(f"no API token: {HOW_TO_CONNECT}")
    headers = {"Authorization": f"Bearer {args.token}"}
    return httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=timeout)


def _call(args: argparse.Namespace, method: str, path: str, timeout: float = TIMEOUT_S, **kwargs: Any) -> Any:
    try:
        with _client(args, timeout) as client:
            response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise Unreachable(
            f"cannot reach the controller at {args.url}: {exc}; is `edgefleet controller serve` running "
            "there? Otherwise set EDGEFLEET_URL (or --url) to its address"
        ) from None
    if response.status_code == 401:
        raise CommandError(f"401: {_api_message(response)}; {HOW_TO_CONNECT}")
    if response.status_code == 403:
        raise CommandError(
            f"403: {_api_message(response)}; an admin makes tokens with the role a task needs "
            "(`edgefleet tokens create --name NAME --role operator`)"
        )
    if not response.is_success:
        raise CommandError(f"{response.status_code}: {_api_message(response)}")
    return response.json()


def _api_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # FastAPI's validation errors
        return "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', []))}: {item.get('msg', item)}"
            if isinstance(item, dict)
            else str(item)
            for item in detail
        )
    return detail if isinstance(detail, str) else json.dumps(detail)


def _print(data: Any, view: View | None = None) -> None:
    """The API's answer: a table (``view``, or the generic one), or its JSON with --json."""
    cli_output.emit(data, view)


def _json_object(option: str, raw: str | None) -> str:
    if raw is None:
        return "{}"
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{option} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CommandError(f"{option} must be a JSON object")
    return raw


def _open(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc}") from None


def cmd_status(args: argparse.Namespace) -> int:
    """Whether the controller answers, takes the token and reaches its broker: its address,
    the token's name and role, the broker, and the fleet in brief. With --wait, a controller
    still starting (or still connecting to its broker) is waited for. Exit 1 without a broker."""
    deadline = time.monotonic() + args.wait
    while True:
        try:
            me = _call(args, "GET", "/v1/whoami")
            broker = _call(args, "GET", "/v1/status")["broker"]
        except Unreachable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)
            continue
        if broker["connected"] or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    devices = _call(args, "GET", "/v1/devices")
    rollouts = _call(args, "GET", "/v1/rollouts")
    _print(
        {
            "controller": args.url,
            "token": me["name"],
            "role": me["role"],
            "broker": broker["address"],
            "broker_connected": broker["connected"],
            "devices": len(devices),
            "online": sum(1 for d in devices if d["online"]),
            "rollouts_in_progress": sum(1 for r in rollouts if r["status"] == "in_progress"),
        }
    )
    if not broker["connected"]:
        print(
            f"error: the controller cannot reach its broker at {broker['address']}: is it running? "
            "(`edgefleet controller init` printed the command that starts it; the controller's log says why)",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_models_upload(args: argparse.Namespace) -> int:
    path = Path(args.file)
    data = {
        "version": args.version,
        "metadata": _json_object("--metadata", args.metadata),
        "metrics": _json_object("--metrics", args.metrics),
        "parent_version": args.parent or "",
        "dataset_digest": args.dataset_digest or "",
        "code_version": args.code_version or "",
        "task": args.task or "",
        "sensor": args.sensor or "",
        "gate": str(args.gate),
        "dynamic": "true" if args.dynamic else "false",
        "fp16": "true" if args.fp16 else "false",
    }
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(cli_progress.transfer())
        model = stack.enter_context(_open(path))
        size = os.fstat(model.fileno()).st_size
        sent = stack.enter_context(bar.wrap_file(model, total=size, description=f"uploading {path.name}"))
        files = {"file": (path.name, sent, "application/octet-stream")}
        if args.calibration:
            cal = Path(args.calibration)
            files["calibration"] = (cal.name, stack.enter_context(_open(cal)), "application/octet-stream")
        if args.samples:
            own = Path(args.samples)
            files["samples"] = (own.name, stack.enter_context(_open(own)), "application/octet-stream")
        if args.signature:
            data["signature"] = _read_text(Path(args.signature))
        version = _call(
            args, "POST", f"/v1/models/{args.name}/versions", UPLOAD_TIMEOUT_S, data=data, files=files
        )
    if not args.no_wait and cli_progress.variants_pending(version):
        url = f"/v1/models/{args.name}/versions/{args.version}"
        version = cli_progress.wait_for_variants(lambda: _call(args, "GET", url), version, args.wait_timeout)
    _print(version, _version_view)
    return 0


def _version_view(version: dict[str, Any]) -> Any:
    """A version's table; its signature one line per input and output (`models signature` prints it whole)."""
    # Imported here: it brings numpy, which no other command needs at start.
    from controller.signature import ModelSignature

    described = ModelSignature.from_json(version["signature"]).describe().splitlines()
    return [*cli_views.model_version(version), cli_output.table([{"signature": line} for line in described])]


def cmd_models_add_variant(args: argparse.Namespace) -> int:
    path = Path(args.file)
    with _open(path) as handle:
        files = {"file": (path.name, handle, "application/octet-stream")}
        url = f"/v1/models/{args.name}/versions/{args.version}/variants"
        _print(_call(args, "POST", url, UPLOAD_TIMEOUT_S, files=files))
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    _print(_call(args, "GET", f"/v1/models/{args.name}/versions/{args.version}"), _version_view)
    return 0


def cmd_models_signature(args: argparse.Namespace) -> int:
    url = f"/v1/models/{args.name}/versions/{args.version}/signature"
    if args.set:
        try:
            body = json.loads(_read_text(Path(args.set)))
        except json.JSONDecodeError as exc:
            raise CommandError(f"{args.set} is not valid JSON: {exc}") from None
        _print(_call(args, "PUT", url, json=body))
    else:
        _print(_call(args, "GET", url))
    return 0


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read {path}: {exc}") from None


def cmd_models_stage(args: argparse.Namespace) -> int:
    stage = "archived" if args.action == "archive" else args.to
    url = f"/v1/models/{args.name}/versions/{args.version}/stage"
    _print(_call(args, "POST", url, json={"stage": stage}), _version_view)
    return 0


def cmd_models_compare(args: argparse.Namespace) -> int:
    _print(_call(args, "GET", f"/v1/models/{args.name}/compare", params={"a": args.a, "b": args.b}))
    return 0


def cmd_profiles_register(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read {path}: {exc}") from None
    _print(
        _call(args, "POST", "/v1/profiles", json={"source": text, "filename": path.name}), cli_views.profile
    )
    return 0


def cmd_profiles_list(args: argparse.Namespace) -> int:
    _print([{"id": p["id"], "name": p["doc"].get("name", "")} for p in _call(args, "GET", "/v1/profiles")])
    return 0


def cmd_profiles_show(args: argparse.Namespace) -> int:
    _print(_call(args, "GET", f"/v1/profiles/{args.id}"), cli_views.profile)
    return 0


def cmd_signing_key(args: argparse.Namespace) -> int:
    if args.action == "rotate":
        _print(_call(args, "POST", "/v1/signing-key/rotate"))
    else:
        _print(_call(args, "GET", "/v1/signing-key"))
    return 0


def cmd_devices_set_profile(args: argparse.Namespace) -> int:
    _print(_call(args, "PUT", f"/v1/devices/{args.device_id}/profile", json={"profile": args.profile}))
    return 0


def tenants_from_toml(text: str, where: str) -> list[dict[str, Any]]:
    """agent.toml's ``[[tenants]]`` tables as the API's tenant specs (source options moved under ``options``)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CommandError(f"{where}: invalid TOML: {exc}") from None
    tables = doc.get("tenants", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise CommandError(f"{where}: expected [[tenants]] tables")
    specs = []
    for table in tables:
        spec = dict(table)
        source = spec.get("source")
        if isinstance(source, dict):
            options = {k: v for k, v in source.items() if k not in ("kind", "uri", "options")}
            # Options in a [tenants.source.options] table of their own, as the API nests them.
            if isinstance(source.get("options"), dict):
                options = source["options"] | options
            spec["source"] = {k: source[k] for k in ("kind", "uri") if k in source} | {"options": options}
        specs.append(spec)
    return specs


def cmd_devices_set_tenants(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror or exc}") from None
    body = tenants_from_toml(text, str(path))
    _print(_call(args, "PUT", f"/v1/devices/{args.device_id}/tenants", json=body))
    return 0


def cmd_devices_tenants(args: argparse.Namespace) -> int:
    _print(_call(args, "GET", f"/v1/devices/{args.device_id}/tenants"))
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    _print(_call(args, "GET", "/v1/models"), cli_views.models_list)
    return 0


def agent_config(
    credentials: dict[str, Any],
    data_dir: str,
    socket: str | None,
    model_budget_mb: float = 0.0,
    tls: dict[str, str] | None = None,
    telemetry_interval_s: float | None = None,
    accelerator: str = "",
    socket_group: str = "",
) -> str:
    doc: dict[str, Any] = {"device_id": credentials["device_id"], "data_dir": data_dir}
    if socket:
        doc["socket"] = socket
    if telemetry_interval_s is not None:
        doc["telemetry_interval_s"] = telemetry_interval_s
    doc["mqtt"] = {
        "host": credentials["broker_host"],
        "port": credentials["broker_port"],
        "username": credentials["mqtt_username"],
        "password": credentials["mqtt_password"],
        "protocol": credentials["mqtt_protocol"],
        # TLS files (tls_ca_file, tls_cert_file, tls_key_file), relative to the config's folder.
        **(tls or {}),
    }
    if credentials.get("controller_public_key"):
        # Pinned at provisioning: the agent refuses models this key did not sign.
        doc["security"] = {"controller_public_key": credentials["controller_public_key"]}
    if model_budget_mb:
        # The device class's budget for loaded models (firmware_profiles/), enforced by the agent's pool.
        doc["pool"] = {"memory_budget_mb": float(model_budget_mb)}
    if socket_group:
        doc["api"] = {"socket_group": socket_group}
    if accelerator:
        # The profile's accelerator, used when the device's runtime offers it (agent/accelerators.py).
        doc["accelerator"] = {"runtime": accelerator}
    return tomli_w.dumps(doc)


def cmd_devices_register(args: argparse.Namespace) -> int:
    if args.issue_cert and not (args.agent_config or args.bundle):
        raise CommandError(
            "--issue-cert writes the certificate beside the agent config or into the bundle: "
            "give --agent-config or --bundle"
        )
    credentials = _call(
        args,
        "POST",
        "/v1/devices",
        json={"device_id": args.device_id, "tags": args.tag or [], "profile": args.profile or ""},
    )
    writes = args.agent_config or args.bundle
    profile = _call(args, "GET", f"/v1/profiles/{args.profile}")["doc"] if args.profile and writes else {}
    budget, accelerator = bundles.profile_settings(profile)
    if args.bundle:
        _write_bundle(args, credentials, budget, accelerator)
    if args.agent_config:
        out = Path(args.agent_config)
        tls = _device_certificate(args, out.parent) if args.issue_cert else None
        text = agent_config(
            credentials,
            args.agent_data_dir,
            args.agent_socket,
            budget,
            tls,
            args.telemetry_interval,
            accelerator=accelerator,
        )
        try:
            atomic_write(out, text.encode(), mode=0o600)
        except OSError as exc:
            _print(credentials)
            raise CommandError(f"device registered but cannot write {out}: {exc}") from None
        print(f"agent config written to {out}", file=sys.stderr)
    _print(credentials)
    return 0


def _write_bundle(
    args: argparse.Namespace, credentials: dict[str, Any], budget: float, accelerator: str
) -> None:
    out = Path(args.bundle)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tls: dict[str, str] = {}
        if args.issue_cert:
            tls = _device_certificate(args, folder, into=f"the bundle {out}")
        elif args.broker_ca or credentials.get("broker_ca_pem"):
            # A TLS broker: the device verifies it with this CA (--broker-ca, else the controller's own).
            try:
                ca = (
                    Path(args.broker_ca).read_bytes()
                    if args.broker_ca
                    else credentials["broker_ca_pem"].encode()
                )
            except OSError as exc:
                raise CommandError(f"--broker-ca {args.broker_ca}: cannot read: {exc}") from None
            (folder / bundles.BROKER_CA_FILE).write_bytes(ca)
            tls = {"tls_ca_file": bundles.BROKER_CA_FILE}
        text = agent_config(
            credentials,
            args.agent_data_dir,
            args.agent_socket or bundles.SERVICE_SOCKET,
            budget,
            tls,
            args.telemetry_interval,
            accelerator=accelerator,
            socket_group=bundles.APPS_GROUP,
        )
        data = bundles.bundle_bytes(credentials["device_id"], text, folder, tls)
    try:
        bundles.write_bundle(out, data)
    except OSError as exc:
        raise CommandError(f"device registered but cannot write {out}: {exc}") from None
    print(
        f"provisioning bundle written to {out}: copy it to the device and run "
        f"`sudo edgefleet-agent install --bundle {out.name}`",
        file=sys.stderr,
    )


def _device_certificate(args: argparse.Namespace, folder: Path, into: str = "") -> dict[str, str]:
    """Make the device's key pair here, have the controller's CA certify the public key, and
    write key, certificate and the broker's CA into ``folder``; returns the [mqtt] TLS keys."""
    from controller.certificates import new_client_key, private_key_pem, public_key_pem

    broker_ca = ""
    if args.broker_ca:
        try:
            broker_ca = Path(args.broker_ca).read_text()
        except (OSError, UnicodeError) as exc:
            raise CommandError(f"--broker-ca {args.broker_ca}: cannot read: {exc}") from None
    key = new_client_key()
    issued = _call(
        args,
        "POST",
        f"/v1/devices/{args.device_id}/certificate",
        json={"public_key_pem": public_key_pem(key), "valid_days": args.valid_days},
    )
    broker_ca = broker_ca or issued["broker_ca_pem"]
    if not broker_ca:
        raise CommandError(
            "certificate issued, but the controller talks to its broker in plain TCP, so it cannot say "
            "which CA the broker's certificate comes from: pass --broker-ca FILE"
        )
    files = {
        "tls_key_file": (f"{args.device_id}.key", private_key_pem(key), 0o600),
        "tls_cert_file": (f"{args.device_id}.crt", issued["certificate_pem"].encode(), 0o644),
        "tls_ca_file": ("broker-ca.crt", broker_ca.encode(), 0o644),
    }
    try:
        for name, data, mode in files.values():
            atomic_write(folder / name, data, mode=mode)
    except OSError as exc:
        raise CommandError(f"certificate issued but cannot write it into {folder}: {exc}") from None
    # ``into``: where the files end up when ``folder`` is only on their way (a bundle).
    print(
        f"device certificate written to {into or folder / files['tls_cert_file'][0]} "
        f"(serial {issued['serial']}, valid until {cli_output.local_time(issued['not_after'])})",
        file=sys.stderr,
    )
    return {key: name for key, (name, _, _) in files.items()}


def cmd_devices_issue_cert(args: argparse.Namespace) -> int:
    folder = Path(args.out_dir)
    _print(_device_certificate(args, folder))
    return 0


def cmd_devices_revoke(args: argparse.Namespace) -> int:
    body = {"reason": args.reason}
    _print(_call(args, "POST", f"/v1/devices/{args.device_id}/revoke", json=body))
    return 0


def cmd_devices_list(args: argparse.Namespace) -> int:
    _print(_call(args, "GET", "/v1/devices"), cli_views.devices_list)
    return 0


def parse_wave(spec: str) -> dict[str, Any]:
    """``10%`` or ``10%:30`` (percent, soak seconds) or ``5`` / ``5:30`` (device count, soak seconds)."""
    size, _, soak = spec.partition(":")
    try:
        wave: dict[str, Any] = {"soak_s": float(soak) if soak else 0.0}
        if size.endswith("%"):
            wave["percent"] = float(size[:-1])
        else:
            wave["count"] = int(size)
    except ValueError:
        raise CommandError(
            f"--wave {spec!r}: use COUNT[:SOAK_S] or PERCENT%[:SOAK_S], e.g. 10%:300"
        ) from None
    return wave


def parse_start(text: str) -> str:
    """An ISO 8601 time; without a UTC offset it is the operator's local time."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise CommandError(
            f"--start-at {text!r}: use an ISO 8601 time, e.g. 2026-12-08T02:00+01:00"
        ) from None
    return (at if at.tzinfo is not None else at.astimezone()).isoformat()


def rollout_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": args.model,
        "version": args.version,
        "tenant": args.tenant,
        "target": {
            "devices": args.device or [],
            "tags": args.tag or [],
            "profile": args.profile,
            "all": args.all,
            "group": args.group,
        },
        "failure_action": args.on_failure,
        "manual_approval": args.manual_approval,
        "device_timeout_s": args.device_timeout,
        "max_concurrent": args.max_concurrent,
        "probation_s": args.probation,
        "probation_max_error_rate": args.probation_max_error_rate,
    }
    if args.wave:
        body["waves"] = [parse_wave(w) for w in args.wave]
    if args.start_at:
        body["start_at"] = parse_start(args.start_at)
    gates = {
        key: value
        for key, value in (
            ("max_failure_fraction", args.max_failure_fraction),
            ("max_error_rate", args.max_error_rate),
            ("max_latency_ratio", args.max_latency_ratio),
            ("min_reporting_fraction", args.min_reporting),
            ("min_inferences", args.min_inferences),
            ("min_confidence_ratio", args.min_confidence_ratio),
            ("max_prediction_psi", args.max_prediction_psi),
        )
        if value is not None
    }
    if gates:
        body["gates"] = gates
    if args.shadow_soak is not None:
        body["shadow"] = {
            key: value
            for key, value in (
                ("soak_s", args.shadow_soak),
                ("min_agreement", args.min_shadow_agreement),
                ("max_deviation", args.max_shadow_deviation),
                ("min_compared", args.min_shadow_compared),
            )
            if value is not None
        }
    elif any(
        v is not None
        for v in (args.min_shadow_agreement, args.max_shadow_deviation, args.min_shadow_compared)
    ):
        raise CommandError(
            "--min-shadow-agreement, --max-shadow-deviation and --min-shadow-compared need --shadow-soak"
        )
    return body


def cmd_rollouts_create(args: argparse.Namespace) -> int:
    created = _call(args, "POST", "/v1/rollouts", json=rollout_body(args))
    warn_skipped(created)
    if not args.watch:
        _print(created, cli_views.rollout)
        return 0
    return _watch(args, created["id"])


def warn_skipped(rollout: dict[str, Any]) -> None:
    """Targeted devices the rollout leaves out (no variant they can run, no live model to
    shadow), on stderr: the rollout goes on without them."""
    skipped = [d for d in rollout.get("devices", []) if d["status"] == "skipped"]
    if skipped:
        lines = "".join(f"\n  {d['device_id']}: {d['detail']}" for d in skipped)
        total = len(rollout["devices"])
        print(f"warning: {len(skipped)} of {total} targeted devices skipped:{lines}", file=sys.stderr)


def cmd_rollouts_show(args: argparse.Namespace) -> int:
    _print(_call(args, "GET", f"/v1/rollouts/{args.id}"), cli_views.rollout)
    return 0


def cmd_rollouts_watch(args: argparse.Namespace) -> int:
    return _watch(args, args.id)


def _watch(args: argparse.Namespace, rollout_id: str) -> int:
    """Follow the rollout until it ends, print it, exit 0 if it succeeded (else 1)."""
    final = cli_progress.watch_rollout(
        lambda: _call(args, "GET", f"/v1/rollouts/{rollout_id}"),
        lambda: _call(args, "GET", f"/v1/rollouts/{rollout_id}/events"),
        args.interval,
    )
    events = [] if cli_output.json_mode() else _call(args, "GET", f"/v1/rollouts/{rollout_id}/events")
    _print(final, lambda r: cli_views.rollout(r, events))
    return cli_progress.rollout_exit_code(final)


def cmd_rollouts_list(args: argparse.Namespace) -> int:
    _print(_call(args, "GET", "/v1/rollouts"), cli_views.rollouts_list)
    return 0


def cmd_rollouts_events(args: argparse.Namespace) -> int:
    _print(_call(args, "GET", f"/v1/rollouts/{args.id}/events"), cli_views.rollout_events)
    return 0


def cmd_rollouts_command(args: argparse.Namespace) -> int:
    _print(
        _call(args, "POST", f"/v1/rollouts/{args.id}/{args.action}", json={"reason": args.reason or ""}),
        cli_views.rollout,
    )
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    _print(
        _call(args, "GET", f"/v1/devices/{args.device}/events", params={"limit": args.limit}),
        cli_views.device_events,
    )
    return 0


# -- argument parsing -----------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # --url/--token are accepted before or after the command; the later one wins.
    # --json, --url and --token are accepted before or after the command.
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON (for scripts)"
    )
    remote = argparse.ArgumentParser(add_help=False, parents=[output])
    remote.add_argument("--url", default=argparse.SUPPRESS, help="controller URL (default $EDGEFLEET_URL)")
    remote.add_argument("--token", default=argparse.SUPPRESS, help="API token (default $EDGEFLEET_TOKEN)")

    parser = argparse.ArgumentParser(
        prog="edgefleet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("EDGEFLEET_URL", DEFAULT_URL),
        help=f"controller URL (default $EDGEFLEET_URL, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("EDGEFLEET_TOKEN", ""),
        help="API token: the admin token init printed, or one from `edgefleet tokens create` (default $EDGEFLEET_TOKEN)",
    )
    parser.add_argument("--json", action="store_true", help="print the API's JSON (for scripts)")
    commands = parser.add_subparsers(dest="command", required=True)

    controller = commands.add_parser("controller", help="run or set up the controller")
    ctl = controller.add_subparsers(dest="action", required=True)
    init = ctl.add_parser(
        "init",
        parents=[output],
        help="create a data folder and a ready-to-run Mosquitto for it; print the admin token",
    )
    init.add_argument("--data-dir", required=True, help="the controller's folder (database, artifacts, keys)")
    init.add_argument(
        "--broker-host", default="127.0.0.1", help="the broker the controller and devices connect to"
    )
    init.add_argument("--broker-port", type=int, default=1883, help="the broker's MQTT port (default 1883)")
    init.add_argument(
        "--mosquitto-passwd-file",
        default=None,
        metavar="FILE",
        help="the password file of a broker you run yourself (default DATA/mosquitto/passwd, "
        "the one init's Mosquitto configuration reads)",
    )
    init.add_argument(
        "--broker-reload-command",
        default="",
        metavar="SHELL",
        help="run through /bin/sh after each password change, e.g. 'systemctl reload mosquitto' "
        "(default for init's own broker: kill -HUP $(cat DATA/mosquitto/mosquitto.pid) when it runs)",
    )
    init.add_argument(
        "--mqtt-protocol", choices=PROTOCOLS, default="v5", help="MQTT version spoken to the broker"
    )
    init.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        metavar="BYTES",
        help="artifact transfer chunk size",
    )
    init.add_argument(
        "--max-upload-bytes",
        type=int,
        default=DEFAULT_MAX_UPLOAD_BYTES,
        metavar="BYTES",
        help="the largest model file accepted",
    )
    init.add_argument(
        "--rollup-window-s",
        type=int,
        default=Settings.rollup_window_s,
        metavar="S",
        help="window of the telemetry roll-ups and fleet-wide drift scores (default %(default)s)",
    )
    init.add_argument(
        "--database",
        default="",
        metavar="URL",
        help="where the controller keeps its state: sqlite:///PATH, or postgresql://USER:PASSWORD@HOST:PORT/NAME "
        "for several controller processes (default: the SQLite file DATA/controller.db)",
    )
    init.add_argument("--rotate-token", action="store_true", help="keep the data, print a new token")
    init.add_argument(
        "--mqtt-tls-ca-file", default=None, help="connect to the broker over TLS, verifying it with this CA"
    )
    init.add_argument(
        "--mqtt-client-certificate",
        action="store_true",
        help="log in to the broker with a client certificate from the controller's CA",
    )
    init.set_defaults(func=cmd_init)
    tls = ctl.add_parser(
        "tls", parents=[output], help="connect an initialised controller to its broker over TLS"
    )
    tls.add_argument("--data-dir", required=True, help="the initialised controller's folder")
    tls.add_argument(
        "--mqtt-tls-ca-file", required=True, help="the CA the broker's certificate is verified with"
    )
    tls.add_argument("--broker-port", type=int, default=None, help="the broker's TLS listener (e.g. 8883)")
    tls.add_argument(
        "--mqtt-client-certificate",
        action="store_true",
        help="log in with a client certificate from the controller's CA",
    )
    tls.set_defaults(func=cmd_tls)
    serve = ctl.add_parser("serve", help="serve the REST API and the MQTT transport")
    serve.add_argument("--data-dir", required=True, help="the folder `controller init` made")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    serve.add_argument(
        "--roles",
        default="all",
        help="what this process does: all (the default: one controller) or some of api, ingest, chunks, "
        "engine, comma-separated, for one of several processes sharing a PostgreSQL database "
        "(docs/scaling.md); without api it serves no HTTP",
    )
    serve.add_argument(
        "--instance",
        type=int,
        default=None,
        help="which broker account this process uses, 1-16: edgefleet-controller-N (default "
        "edgefleet-controller); every process connected at once needs its own",
    )
    serve.set_defaults(func=cmd_serve)

    status = commands.add_parser(
        "status",
        parents=[remote],
        help="check that the controller answers and takes the token; the fleet in brief",
    )
    status.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="S",
        help="wait up to this long for a controller that is still starting or connecting (default 0)",
    )
    status.set_defaults(func=cmd_status)

    models = commands.add_parser("models", help="model registry").add_subparsers(dest="action", required=True)
    upload = models.add_parser("upload", parents=[remote], help="upload a model version (.onnx or .tflite)")
    upload.add_argument("file", help="the model file")
    upload.add_argument("--name", required=True, help="the model's name")
    upload.add_argument("--version", required=True, help="this version's name, e.g. 1.0.0")
    upload.add_argument(
        "--no-wait", action="store_true", help="return once uploaded, without waiting for the variants"
    )
    upload.add_argument(
        "--wait-timeout",
        type=float,
        default=1800.0,
        metavar="S",
        help="stop waiting for the variants after this long (default 1800)",
    )
    upload.add_argument("--metadata", default=None, help="a JSON object")
    upload.add_argument("--parent", default=None, help="the version this one was trained from")
    upload.add_argument("--dataset-digest", default=None, help="sha256 of the training data set")
    upload.add_argument("--code-version", default=None, help="training code or pipeline version")
    upload.add_argument("--metrics", default=None, help="a JSON object, e.g. '{\"accuracy\": 0.97}'")
    upload.add_argument(
        "--calibration", default=None, metavar="NPZ", help="named inputs; enables int8 variants"
    )
    upload.add_argument("--dynamic", action="store_true", help="also produce a dynamic int8 variant")
    upload.add_argument("--fp16", action="store_true", help="also produce an fp16 variant (GPUs, NPUs)")
    upload.add_argument(
        "--gate", type=float, default=0.99, help="minimum agreement of a variant (default 0.99)"
    )
    upload.add_argument(
        "--task", choices=("classifier", "regression"), default=None, help="what the outputs mean"
    )
    upload.add_argument(
        "--sensor", choices=("camera", "microphone", "sensor"), default=None, help="what feeds the model"
    )
    upload.add_argument(
        "--samples",
        default=None,
        metavar="NPZ",
        help="named inputs in the model's own shapes: the staging smoke test, validation and calibration set",
    )
    upload.add_argument(
        "--signature", default=None, metavar="JSON", help="the model's signature, instead of the inferred one"
    )
    upload.set_defaults(func=cmd_models_upload)
    signature = models.add_parser(
        "signature", parents=[remote], help="a version's signature (input roles, output meanings)"
    )
    signature.add_argument("name", help="model name")
    signature.add_argument("version", help="version")
    signature.add_argument("--set", default=None, metavar="JSON", help="replace it with this file's")
    signature.set_defaults(func=cmd_models_signature)
    models.add_parser("list", parents=[remote], help="models and their versions").set_defaults(
        func=cmd_models_list
    )
    for action, func, help_ in (
        ("show", cmd_models_show, "a version with its lineage, stage and variants"),
        ("archive", cmd_models_stage, "archive a version (kept out of rollouts)"),
        ("promote", cmd_models_stage, "move a version to another stage"),
        ("add-variant", cmd_models_add_variant, "add an artifact (e.g. .tflite) to a version"),
    ):
        sub = models.add_parser(action, parents=[remote], help=help_)
        sub.add_argument("name", help="model name")
        sub.add_argument("version", help="version")
        if action == "promote":
            sub.add_argument(
                "--to",
                required=True,
                choices=("development", "staging", "production", "archived"),
                help="the stage to move it to",
            )
        if action == "add-variant":
            sub.add_argument("file", help="the artifact (.onnx or .tflite)")
        sub.set_defaults(func=func)
    compare = models.add_parser("compare", parents=[remote], help="what differs between two versions")
    compare.add_argument("name", help="model name")
    compare.add_argument("a", help="one version")
    compare.add_argument("b", help="the other version")
    compare.set_defaults(func=cmd_models_compare)

    profiles = commands.add_parser("profiles", help="device classes").add_subparsers(
        dest="action", required=True
    )
    preg = profiles.add_parser(
        "register", parents=[remote], help="register or update a profile from its TOML file"
    )
    preg.add_argument("file", help="a profile's TOML (firmware_profiles/*.toml)")
    preg.set_defaults(func=cmd_profiles_register)
    profiles.add_parser("list", parents=[remote], help="registered device classes").set_defaults(
        func=cmd_profiles_list
    )
    pshow = profiles.add_parser("show", parents=[remote], help="one profile, whole")
    pshow.add_argument("id", help="profile id")
    pshow.set_defaults(func=cmd_profiles_show)

    keys = commands.add_parser("signing-key", help="the key artifacts are signed with").add_subparsers(
        dest="action", required=True
    )
    keys.add_parser("show", parents=[remote], help="the public key agents pin").set_defaults(
        func=cmd_signing_key
    )
    keys.add_parser(
        "rotate", parents=[remote], help="new key, announced to agents signed by the old one"
    ).set_defaults(func=cmd_signing_key)

    devices = commands.add_parser("devices", help="fleet").add_subparsers(dest="action", required=True)
    register = devices.add_parser(
        "register", parents=[remote], help="register a device, print its credentials"
    )
    register.add_argument("device_id", help="the device's id (its MQTT username)")
    register.add_argument("--tag", action="extend", nargs="+", metavar="T", help="tags to target it by")
    register.add_argument(
        "--agent-config", default=None, metavar="OUT.toml", help="write the device's agent.toml here"
    )
    register.add_argument(
        "--bundle",
        default=None,
        metavar="OUT.tar.gz",
        help="write a provisioning bundle here (agent.toml for the systemd service, broker CA, "
        "certificate with --issue-cert), for `edgefleet-agent install --bundle` on the device",
    )
    register.add_argument(
        "--agent-data-dir",
        default="/var/lib/edgefleet-agent",
        help="the agent's data folder on the device (written into --agent-config)",
    )
    register.add_argument(
        "--agent-socket", default=None, help="the agent's gRPC socket path (written into --agent-config)"
    )
    register.add_argument(
        "--telemetry-interval",
        type=float,
        default=None,
        metavar="S",
        help="seconds between the agent's telemetry windows (written into --agent-config; agent default 10)",
    )
    register.add_argument("--profile", default=None, help="the device's class (edgefleet profiles list)")
    register.add_argument(
        "--issue-cert",
        action="store_true",
        help="also issue a client certificate from the controller's CA; key, certificate and the "
        "broker's CA are written next to --agent-config or into --bundle",
    )
    register.set_defaults(func=cmd_devices_register)
    issue_cert = devices.add_parser(
        "issue-cert", parents=[remote], help="issue a new client certificate for a registered device"
    )
    issue_cert.add_argument("device_id", help="a registered device")
    issue_cert.add_argument("--out-dir", required=True, help="where ID.key, ID.crt and broker-ca.crt go")
    for sub in (register, issue_cert):
        sub.add_argument("--valid-days", type=int, default=730, help="certificate validity (default 730)")
        sub.add_argument("--broker-ca", default=None, help="CA of the broker's certificate, for the device")
    issue_cert.set_defaults(func=cmd_devices_issue_cert)
    revoke = devices.add_parser(
        "revoke",
        parents=[remote],
        help="revoke a device for good: its certificates on the CA's revocation list, its broker password "
        "removed, its session on the broker ended",
    )
    revoke.add_argument("device_id", help="a registered device")
    revoke.add_argument("--reason", default="", help="why, kept with the revocation")
    revoke.set_defaults(func=cmd_devices_revoke)
    devices.add_parser(
        "list", parents=[remote], help="devices, online or not, and what they run"
    ).set_defaults(func=cmd_devices_list)
    set_profile = devices.add_parser("set-profile", parents=[remote], help="put a device in a profile")
    set_profile.add_argument("device_id", help="a registered device")
    set_profile.add_argument("profile", help="a profile id (edgefleet profiles list)")
    set_profile.set_defaults(func=cmd_devices_set_profile)
    set_tenants = devices.add_parser(
        "set-tenants", parents=[remote], help="declare a device's tenant apps ([[tenants]] as in agent.toml)"
    )
    set_tenants.add_argument("device_id", help="a registered device")
    set_tenants.add_argument(
        "--file", required=True, help="TOML file with [[tenants]] tables; none clears them"
    )
    set_tenants.set_defaults(func=cmd_devices_set_tenants)
    show_tenants = devices.add_parser("tenants", parents=[remote], help="the tenants declared on a device")
    show_tenants.add_argument("device_id", help="a registered device")
    show_tenants.set_defaults(func=cmd_devices_tenants)

    rollouts = commands.add_parser("rollouts", help="rollouts").add_subparsers(dest="action", required=True)
    create = rollouts.add_parser("create", parents=[remote], help="send a model version to a target in waves")
    create.add_argument("--model", required=True, help="model name")
    create.add_argument("--version", required=True, help="the version to send")
    create.add_argument("--tenant", default="default", help="the tenant app it serves (default 'default')")
    target = create.add_argument_group("target (devices matching every criterion given)")
    target.add_argument("--device", action="append", metavar="ID", help="a device; repeat for more")
    target.add_argument("--tag", action="extend", nargs="+", metavar="T", help="devices with these tags")
    target.add_argument("--profile", default=None, help="devices of this profile")
    target.add_argument("--all", action="store_true", help="every registered device")
    target.add_argument(
        "--group", default=None, metavar="NAME", help="the devices of this group (groups list)"
    )
    create.add_argument(
        "--start-at",
        default=None,
        metavar="TIME",
        help="do not start before this ISO 8601 time, e.g. 2026-12-08T02:00+01:00 (no offset: local time)",
    )
    staged = create.add_argument_group("waves and gates")
    staged.add_argument(
        "--wave", action="append", metavar="SIZE[:SOAK_S]", help="e.g. 10%%:300 or 5:60; repeat per wave"
    )
    staged.add_argument(
        "--max-failure-fraction",
        type=float,
        default=None,
        metavar="F",
        help="of a wave's devices failing to update",
    )
    staged.add_argument(
        "--max-error-rate", type=float, default=None, metavar="RATE", help="inference errors per inference"
    )
    staged.add_argument(
        "--max-latency-ratio",
        type=float,
        default=None,
        metavar="RATIO",
        help="p95 latency against the same devices on the previous version",
    )
    staged.add_argument(
        "--min-reporting",
        type=float,
        default=None,
        metavar="FRACTION",
        help="of a wave's devices that must send telemetry with inferences",
    )
    staged.add_argument(
        "--min-inferences",
        type=int,
        default=None,
        metavar="N",
        help="inferences a device needs to count as reporting",
    )
    staged.add_argument(
        "--min-confidence-ratio",
        type=float,
        default=None,
        metavar="RATIO",
        help="mean top-1 confidence against the previous version",
    )
    staged.add_argument(
        "--max-prediction-psi",
        type=float,
        default=None,
        metavar="PSI",
        help="shift of the predicted classes against the previous version",
    )
    staged.add_argument(
        "--on-failure",
        choices=("pause", "rollback"),
        default="pause",
        help="what a failed gate does (default pause)",
    )
    staged.add_argument("--manual-approval", action="store_true", help="wait for `approve` between waves")
    staged.add_argument(
        "--device-timeout", type=float, default=None, metavar="S", help="a device not updated by then fails"
    )
    staged.add_argument(
        "--max-concurrent", type=int, default=0, metavar="N", help="devices updating at once (0: no limit)"
    )
    staged.add_argument("--probation", type=float, default=0.0, metavar="S", help="agent probation seconds")
    staged.add_argument(
        "--probation-max-error-rate",
        type=float,
        default=0.0,
        metavar="RATE",
        help="error rate past which the agent rolls back during probation",
    )
    shadow = create.add_argument_group(
        "shadow phase (each wave runs the candidate beside the live model first)"
    )
    shadow.add_argument(
        "--shadow-soak", type=float, default=None, metavar="S", help="seconds in shadow per wave"
    )
    shadow.add_argument(
        "--min-shadow-agreement", type=float, default=None, metavar="F", help="top-1 agreement"
    )
    shadow.add_argument(
        "--max-shadow-deviation", type=float, default=None, metavar="D", help="mean |deviation|"
    )
    shadow.add_argument(
        "--min-shadow-compared", type=int, default=None, metavar="N", help="samples per device"
    )
    create.add_argument(
        "--watch",
        action="store_true",
        help="follow it until it ends, as `rollouts watch` does (exit 0 if it succeeded, else 1)",
    )
    create.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="with --watch: seconds between refreshes"
    )
    create.set_defaults(func=cmd_rollouts_create)
    rollouts.add_parser("list", parents=[remote], help="rollouts, newest first").set_defaults(
        func=cmd_rollouts_list
    )
    show = rollouts.add_parser("show", parents=[remote], help="a rollout's waves and devices")
    show.add_argument("id", help="rollout id")
    watch = rollouts.add_parser(
        "watch",
        parents=[remote],
        help="follow a rollout live until it ends; exit 0 if it succeeded, 1 if it failed, "
        "was rolled back or aborted",
    )
    watch.add_argument("id", help="rollout id")
    watch.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes (default 1)"
    )
    watch.set_defaults(func=cmd_rollouts_watch)
    show.set_defaults(func=cmd_rollouts_show)
    events = rollouts.add_parser("events", parents=[remote], help="the rollout's transitions and reasons")
    events.add_argument("id", help="rollout id")
    events.set_defaults(func=cmd_rollouts_events)
    for action in ("pause", "resume", "approve", "abort", "rollback", "promote"):
        sub = rollouts.add_parser(action, parents=[remote], help=f"{action} a rollout")
        sub.add_argument("id", help="rollout id")
        sub.add_argument("--reason", default="", help="recorded in the rollout's events")
        sub.set_defaults(func=cmd_rollouts_command)
    retry = rollouts.add_parser(
        "retry-failed",
        parents=[remote],
        help="send the version again to the devices whose update failed, only to them; the rollout runs on",
    )
    retry.add_argument("id", help="rollout id")
    retry.add_argument("--reason", default="", help="recorded in the rollout's events")
    retry.set_defaults(func=cmd_rollouts_command)

    from controller import cli_telemetry  # telemetry show|export (imports this module's helpers)

    cli_telemetry.add_commands(commands, remote)
    device_events = commands.add_parser("events", parents=[remote], help="a device's events, newest first")
    device_events.add_argument("device", help="device id")
    device_events.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    device_events.set_defaults(func=cmd_events)
    from controller import cli_loop  # drift, datasets, retraining (imports this module's helpers)

    cli_loop.add_commands(commands, remote)
    from controller import cli_accounts  # tokens, audit (imports this module's helpers)

    cli_accounts.add_commands(commands, remote)
    from controller import cli_groups  # groups, windows (imports this module's helpers)

    cli_groups.add_commands(commands, remote)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_help()  # a bare `edgefleet`: what it can do, rather than a usage error
        return 2
    from controller import cli_telemetry

    args = parser.parse_args(cli_telemetry.with_default_action(sys.argv[1:] if argv is None else argv))
    # The server logs what it does; a command's result is what it prints, so only problems are logged.
    _setup_logging("INFO" if args.func is cmd_serve else "WARNING")
    cli_output.configure(args.json)
    try:
        code: int = args.func(args)
        sys.stdout.flush()
    except (CommandError, ControllerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`edgefleet --json devices list | head`): stop quietly, as rich
        # does for tables (exit 1), and keep Python's exit-time flush from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
