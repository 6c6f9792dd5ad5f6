"""EdgeFleet controller: model registry, fleet, rollouts and telemetry behind a REST API."""

import sys

# The package installs on Python 3.10 for the device agent; the controller itself uses
# 3.11 (tomllib, StrEnum, ...), so a 3.10 interpreter is told so instead of a NameError.
if sys.version_info < (3, 11):  # noqa: UP036
    raise ImportError(
        f"the EdgeFleet controller needs Python 3.11 or newer, this is {sys.version.split()[0]} "
        "(the device agent, edgefleet-agent, runs on 3.10)"
    )
