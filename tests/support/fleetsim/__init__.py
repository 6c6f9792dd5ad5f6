"""A simulated fleet of thousands of devices on this machine, speaking the agent's own protocol code.

Each simulated device (:mod:`tests.support.fleetsim.device`) is an
:class:`agent.session.Session` with its own broker login and connection: the
agent's link, outbox and sender, updater and planner, key ring, what it does
with each inbound message. Many devices share a simulator process
(:mod:`tests.support.fleetsim.worker`) and its single network loop
(:mod:`tests.support.fleetsim.driver`), and the artifact bytes and loaded models of that
process (:mod:`tests.support.fleetsim.storage`). :class:`SimFleet` runs the processes;
:class:`BareSubscribers` runs bare paho subscribers, the same-run baseline of
the benchmarks. Used by bench/fleet_scale.py and tests/e2e/test_fleet_sim.py.
"""

from tests.support.fleetsim.bare import BareStats
from tests.support.fleetsim.device import DeviceLogin, SimSettings
from tests.support.fleetsim.fleet import BareSubscribers, SimFleet
from tests.support.fleetsim.worker import WorkerStats

__all__ = ["BareStats", "BareSubscribers", "DeviceLogin", "SimFleet", "SimSettings", "WorkerStats"]
