"""``edgefleet-agent``: the device daemon's command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.errors import AgentError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefleet-agent", description="EdgeFleet device agent")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the agent until SIGTERM")
    run.add_argument("--config", required=True, type=Path, help="path to agent.toml")
    install = commands.add_parser(
        "install",
        help="install this device from its provisioning bundle: service user, /etc/edgefleet, "
        "the systemd unit, started (run as root)",
        description="Install the agent as a systemd service from the bundle that "
        "`edgefleet devices register ID --bundle FILE` wrote. Checks the bundle before changing "
        "anything; running it again with the same bundle changes nothing.",
    )
    install.add_argument("--bundle", required=True, type=Path, help="the device's provisioning bundle")
    install.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        help="install into this folder instead of / (an image being prepared); nothing is started",
    )
    install.add_argument("--device-id", default=None, help="refuse a bundle for any other device")
    install.add_argument(
        "--replace",
        action="store_true",
        help="install a bundle for another device id than the one this device has",
    )
    install.add_argument("--no-start", action="store_true", help="lay everything out, do not start it")
    return parser


def _install(args: argparse.Namespace) -> int:
    from agent.errors import BundleRefused
    from agent.install import install

    try:
        result = install(
            args.bundle,
            args.root,
            expect_device=args.device_id,
            replace=args.replace,
            start=not args.no_start,
        )
    except BundleRefused as exc:
        print(
            f"edgefleet-agent install: bundle {args.bundle} refused: {exc}; nothing was changed",
            file=sys.stderr,
        )
        return 2
    except AgentError as exc:
        print(f"edgefleet-agent install: {exc}", file=sys.stderr)
        return 1
    for line in result.lines:
        print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "install":
        return _install(args)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    from agent.config import load_config
    from agent.service import Service

    try:
        config = load_config(args.config)
        Service(config).run()
    except AgentError as exc:
        logging.getLogger("agent").error("agent failed: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
