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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
