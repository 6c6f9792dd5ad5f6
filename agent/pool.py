"""The models each tenant is serving right now, swapped atomically."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from agent.runtime import LoadedModel


@dataclass(frozen=True)
class ServingModel:
    tenant: str
    model_name: str
    model_version: str
    digest: str
    runtime: str
    path: Path
    model: LoadedModel


class ModelPool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, ServingModel] = {}
        self._expected: frozenset[str] = frozenset()

    def get(self, tenant: str) -> ServingModel | None:
        with self._lock:
            return self._models.get(tenant)

    def put(self, serving: ServingModel) -> ServingModel | None:
        with self._lock:
            old = self._models.get(serving.tenant)
            self._models[serving.tenant] = serving
            return old

    def remove(self, tenant: str) -> ServingModel | None:
        with self._lock:
            return self._models.pop(tenant, None)

    def all(self) -> list[ServingModel]:
        with self._lock:
            return [self._models[t] for t in sorted(self._models)]

    def expect(self, tenants: frozenset[str]) -> None:
        """Tenants the controller assigned: a request for one not yet loaded is 'not ready', not 'unknown'."""
        with self._lock:
            self._expected = tenants

    def is_expected(self, tenant: str) -> bool:
        with self._lock:
            return tenant in self._expected
