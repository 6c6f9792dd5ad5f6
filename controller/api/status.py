"""/v1/status: whether the controller reaches its broker, for `edgefleet status` and the console.

A controller answers HTTP as soon as it starts, broker or not (it keeps trying to
connect); an operator whose devices stay offline first needs to know which of the two
it is.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from controller.api.deps import ControllerDep

router = APIRouter(tags=["status"])


class BrokerStatusPublic(BaseModel):
    address: str = Field(description="host:port of the broker the controller is set to use")
    connected: bool = Field(description="whether its MQTT session is up now")


class StatusPublic(BaseModel):
    broker: BrokerStatusPublic


@router.get("/status", response_model=StatusPublic)
def controller_status(controller: ControllerDep) -> StatusPublic:
    """The controller's own state: its broker connection."""
    settings = controller.settings
    transport = controller.transport
    return StatusPublic(
        broker=BrokerStatusPublic(
            address=f"{settings.broker_host}:{settings.broker_port}",
            connected=transport is not None and transport.connected.is_set(),
        )
    )
