"""Builders shared by the controller's unit tests."""

from __future__ import annotations

from pathlib import Path

from controller.artifacts import ArtifactStore
from controller.fleet import Fleet, ModelState, Reported
from controller.mosquitto_auth import BrokerAuth, hash_password
from controller.registry import Registry
from controller.rollouts import Rollouts
from controller.settings import Settings
from controller.store import Store
from controller.telemetry import TelemetryStore


class Parts:
    """A controller's modules over real files in ``root``, without the transport."""

    def __init__(self, root: Path, reload_command: str = "true", database_url: str = "") -> None:
        self.settings = Settings(
            data_dir=root,
            mqtt_password="pw",
            mqtt_password_hash=hash_password("pw"),
            admin_token_sha256="0" * 64,
            mosquitto_passwd_file=root / "passwd",
            broker_reload_command=reload_command,
            chunk_size=1024,
            database_url=database_url,
        )
        self.store = Store(self.settings.database)
        self.artifacts = ArtifactStore(self.settings.artifacts_dir, 1024)
        self.registry = Registry(self.store, self.artifacts, 1_000_000)
        self.fleet = Fleet(self.store, self.settings, BrokerAuth(self.settings.passwd_file, reload_command))
        self.rollouts = Rollouts(self.store, self.registry, self.fleet)
        self.telemetry = TelemetryStore(self.store)


def reported(*models: ModelState, at_ms: int = 1) -> Reported:
    return Reported(desired_generation=1, applied_generation=0, models=list(models), reported_at_ms=at_ms)


def state(
    digest: str, phase: str, tenant: str = "default", error: str = "", have: int = 0, total: int = 0
) -> ModelState:
    return ModelState(
        tenant=tenant,
        model_name="m",
        model_version="1",
        artifact_digest=digest,
        phase=phase,
        bytes_have=have,
        bytes_total=total,
        error=error,
    )
