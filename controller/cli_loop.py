"""``edgefleet drift|datasets|retraining``: the closed loop's operator commands over REST."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from controller import cli_output, cli_views
from controller.cli import UPLOAD_TIMEOUT_S, CommandError, _call, _print, _watch
from controller.files import atomic_write

RUN_ENDED = ("succeeded", "failed")


def _read_json(path: str, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CommandError(f"cannot read {what} from {path}: {exc}") from None


def _upload(args: argparse.Namespace, path: str, model: str, version: str, **fields: str) -> Any:
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc}") from None
    files = {"file": (Path(path).name, content, "application/octet-stream")}
    data = {"model": model, "version": version, **fields}
    return _call(args, "POST", "/v1/datasets", UPLOAD_TIMEOUT_S, data=data, files=files)


def cmd_drift_baseline(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"bins": args.bins}
    if args.reference:
        digest = _upload(args, args.reference, args.model, args.version, policy_id="reference")["digest"]
        body["dataset"] = digest
    elif args.dataset:
        body["dataset"] = args.dataset
    elif args.production_windows:
        if not args.spec:
            raise CommandError("--production-windows needs --spec FILE.json with the bin edges")
        body["production"] = {"windows": args.production_windows, "spec": _read_json(args.spec, "the spec")}
    else:
        raise CommandError(
            "give --reference FILE.npz, --dataset DIGEST or --production-windows N --spec FILE"
        )
    url = f"/v1/models/{args.model}/versions/{args.version}/drift/baseline"
    _print(_call(args, "PUT", url, json=body), cli_views.drift_baseline)
    return 0


def cmd_drift_show(args: argparse.Namespace) -> int:
    base = f"/v1/models/{args.model}/versions/{args.version}/drift"
    path = f"{base}/devices/{args.device}" if args.device else base
    since_ms = args.since_ms
    if args.since is not None:
        try:
            since_ms = int(cli_output.parse_since(args.since, time.time()) * 1000)
        except ValueError as exc:
            raise CommandError(f"--since {exc}") from None
    _print(_call(args, "GET", path, params={"since_ms": since_ms}), cli_views.drift)
    return 0


def cmd_datasets_upload(args: argparse.Namespace) -> int:
    _print(
        _upload(args, args.file, args.model, args.version, device_id=args.device_id, policy_id=args.policy_id)
    )
    return 0


def cmd_datasets_list(args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("model", args.model), ("version", args.version)) if v}
    _print(_call(args, "GET", "/v1/datasets", params=params))
    return 0


def cmd_datasets_download(args: argparse.Namespace) -> int:
    from controller.cli import _client

    with _client(args, UPLOAD_TIMEOUT_S) as client:
        response = client.get(f"/v1/datasets/{args.digest}/download")
    if not response.is_success:
        raise CommandError(f"{response.status_code}: {response.text.strip()}")
    atomic_write(Path(args.output), response.content)
    _print({"digest": args.digest, "path": args.output, "size": len(response.content)})
    return 0


def cmd_datasets_label(args: argparse.Namespace) -> int:
    labels = _read_json(args.labels, "labels")
    body = {"labels": labels.get("labels") if isinstance(labels, dict) else labels}
    _print(_call(args, "PUT", f"/v1/datasets/{args.digest}/labels", json=body))
    return 0


def cmd_capture_policy(args: argparse.Namespace) -> int:
    path = f"/v1/models/{args.model}/capture-policy"
    params = {"tenant": args.tenant}
    fields = {
        k: getattr(args, k)
        for k in (
            "random_fraction",
            "low_confidence_below",
            "drifted_feature_share",
            "max_samples_per_hour",
            "max_samples_per_upload",
            "max_bytes_per_upload",
        )
        if getattr(args, k) is not None
    }
    if fields:
        _print(_call(args, "PUT", path, params=params, json=fields))
    else:
        _print(_call(args, "GET", path, params=params))
    return 0


def cmd_policy_put(args: argparse.Namespace) -> int:
    _print(
        _call(args, "PUT", f"/v1/retraining/policies/{args.name}", json=_read_json(args.file, "the policy"))
    )
    return 0


def cmd_policies(args: argparse.Namespace) -> int:
    path = f"/v1/retraining/policies/{args.name}/versions" if args.name else "/v1/retraining/policies"
    _print(_call(args, "GET", path))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    if args.id:
        _print(_call(args, "GET", f"/v1/retraining/runs/{args.id}"))
    else:
        params = {"policy": args.policy} if args.policy else {}
        _print(_call(args, "GET", "/v1/retraining/runs", params=params))
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """Follow the policy's newest run (waiting for one to fire) until its pipeline reports a
    version, then the rollout that version started; exit 0 only if both succeeded."""
    deadline = time.monotonic() + args.timeout
    shown = ""
    while True:
        runs = _call(args, "GET", "/v1/retraining/runs", params={"policy": args.policy, "limit": 1})
        run = runs[0] if runs else None
        state = f"run {run['id']}: {run['status']} {run['detail']}".rstrip() if run else "waiting for a run"
        if state != shown:
            print(f"{args.policy}: {state}", file=sys.stderr)
            shown = state
        if run is not None and run["status"] in RUN_ENDED:
            break
        if time.monotonic() > deadline:
            raise CommandError(
                f"{args.policy}: no result after {args.timeout:g} s ({state}); the pipeline's log says why"
            )
        time.sleep(args.interval)
    started = [
        r
        for r in _call(args, "GET", "/v1/rollouts")
        if (r["model"], r["version"]) == (run["model_name"], run["result_version"])
    ]
    if run["status"] == "failed" or not started:
        _print(run)
        return 0 if run["status"] == "succeeded" else 1
    print(f"{args.policy}: {run['result_version']} registered; rollout {started[0]['id']}", file=sys.stderr)
    return _watch(args, started[0]["id"])


def cmd_evaluate(args: argparse.Namespace) -> int:
    _print(_call(args, "POST", "/v1/retraining/evaluate"))
    return 0


def cmd_result(args: argparse.Namespace) -> int:
    _print(_call(args, "POST", f"/v1/retraining/runs/{args.run_id}/result", json={"version": args.version}))
    return 0


def add_commands(commands: Any, remote: argparse.ArgumentParser) -> None:
    drift = commands.add_parser("drift", help="drift baselines and scores").add_subparsers(
        dest="action", required=True
    )
    baseline = drift.add_parser("baseline", parents=[remote], help="set a model version's drift baseline")
    baseline.add_argument("model", help="model name")
    baseline.add_argument("version", help="version")
    baseline.add_argument(
        "--reference", metavar="FILE.npz", help="reference data set (inputs[, probabilities])"
    )
    baseline.add_argument("--dataset", metavar="DIGEST", help="a stored data set as the reference")
    baseline.add_argument(
        "--production-windows", type=int, metavar="N", help="the first N production windows"
    )
    baseline.add_argument("--spec", metavar="FILE.json", help="bin edges for a production baseline")
    baseline.add_argument("--bins", type=int, default=10, help="histogram bins per feature (default 10)")
    baseline.set_defaults(func=cmd_drift_baseline)
    show = drift.add_parser("show", parents=[remote], help="PSI/KL fleet-wide and per device")
    show.add_argument("model", help="model name")
    show.add_argument("version", help="version")
    show.add_argument("--device", default=None, help="one device's windows")
    show.add_argument(
        "--since-ms", type=int, default=0, metavar="MS", help="only windows after this time (epoch ms)"
    )
    show.add_argument(
        "--since",
        default=None,
        metavar="WHEN",
        help="only windows after this time: ISO 8601 (local unless it names a zone) or how long ago (15m, 2h, 7d)",
    )
    show.set_defaults(func=cmd_drift_show)

    datasets = commands.add_parser("datasets", help="captured data sets").add_subparsers(
        dest="action", required=True
    )
    upload = datasets.add_parser("upload", parents=[remote], help="store an .npz data set")
    upload.add_argument("file", help="an .npz of named inputs")
    upload.add_argument("--model", required=True, help="the model it is for")
    upload.add_argument("--version", required=True, help="the version it is for")
    upload.add_argument("--device-id", default="operator", help="where it came from (default operator)")
    upload.add_argument("--policy-id", default="upload", help="why it was captured (default upload)")
    upload.set_defaults(func=cmd_datasets_upload)
    listing = datasets.add_parser("list", parents=[remote], help="stored data sets, newest first")
    listing.add_argument("--model", default=None, help="only this model's")
    listing.add_argument("--version", default=None, help="only this version's")
    listing.set_defaults(func=cmd_datasets_list)
    download = datasets.add_parser("download", parents=[remote], help="save a data set as .npz")
    download.add_argument("digest", help="the data set's digest (datasets list)")
    download.add_argument("-o", "--output", required=True, help="the file to write")
    download.set_defaults(func=cmd_datasets_download)
    label = datasets.add_parser("label", parents=[remote], help="attach ground-truth labels")
    label.add_argument("digest", help="the data set's digest (datasets list)")
    label.add_argument("--labels", required=True, metavar="FILE.json", help="[0, 3, ...] or {labels: [...]}")
    label.set_defaults(func=cmd_datasets_label)
    capture = datasets.add_parser(
        "capture-policy",
        parents=[remote],
        help="show, or set (with any option), what a model's devices capture",
    )
    capture.add_argument("model", help="model name")
    capture.add_argument("--tenant", default="default", help="the tenant app (default 'default')")
    for name, help_ in (
        ("random-fraction", "capture this fraction of all inputs"),
        ("low-confidence-below", "capture inputs whose top-1 confidence is below this"),
        ("drifted-feature-share", "capture while this share of features drifts"),
    ):
        capture.add_argument(f"--{name}", type=float, default=None, metavar="F", help=help_)
    for name, help_ in (
        ("max-samples-per-hour", "at most this many captured inputs an hour per device"),
        ("max-samples-per-upload", "at most this many inputs in one upload"),
        ("max-bytes-per-upload", "at most this many bytes in one upload"),
    ):
        capture.add_argument(f"--{name}", type=int, default=None, metavar="N", help=help_)
    capture.set_defaults(func=cmd_capture_policy)

    retraining = commands.add_parser("retraining", help="retraining policies and runs").add_subparsers(
        dest="action", required=True
    )
    put = retraining.add_parser("put-policy", parents=[remote], help="create a policy or add a version")
    put.add_argument("name", help="policy name")
    put.add_argument(
        "--file", required=True, metavar="POLICY.json", help="the policy (trigger, action, devices)"
    )
    put.set_defaults(func=cmd_policy_put)
    policies = retraining.add_parser("policies", parents=[remote], help="policies, or one policy's versions")
    policies.add_argument("name", nargs="?", help="one policy's versions")
    policies.set_defaults(func=cmd_policies)
    runs = retraining.add_parser("runs", parents=[remote], help="runs, newest first, or one run")
    runs.add_argument("id", nargs="?", help="one run")
    runs.add_argument("--policy", default=None, help="only this policy's runs")
    runs.set_defaults(func=cmd_runs)
    watch = retraining.add_parser(
        "watch",
        parents=[remote],
        help="follow a policy's newest run until its pipeline reports, then the rollout it started; "
        "exit 0 if both succeeded",
    )
    watch.add_argument("policy", help="policy name")
    watch.add_argument(
        "--timeout", type=float, default=1800.0, metavar="S", help="give up after this long (default 1800)"
    )
    watch.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes (default 1)"
    )
    watch.set_defaults(func=cmd_watch)
    retraining.add_parser("evaluate", parents=[remote], help="evaluate every policy now").set_defaults(
        func=cmd_evaluate
    )
    result = retraining.add_parser("result", parents=[remote], help="report the version a run registered")
    result.add_argument("run_id", help="the run (retraining runs)")
    result.add_argument("--version", required=True, help="the model version it registered")
    result.set_defaults(func=cmd_result)
