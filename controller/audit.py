"""The audit log: every state-changing request, whoever sent it (API, CLI, console).

One ASGI middleware sees every request the application answers, so nothing that
changes state is left out, including the ones refused (401, 403, 422, 409): the log
says who tried what, when, and how it ended. The role dependency
(:mod:`controller.api.deps`) leaves the principal and the route's template in the
request state; the router leaves the path parameters in the scope.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.auth import Principal
from controller.errors import StoreError
from controller.store import Store

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# A broker asks /broker/authenticate and /broker/authorize (POST) at every login and publish:
# questions that change nothing, at a rate that would bury the operators' actions.
UNAUDITED_PREFIX = "/broker/"
PRINCIPAL_KEY = "principal"
ROUTE_KEY = "route_template"
DEFAULT_LIMIT = 200
MAX_LIMIT = 5000


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    actor_id: str
    actor: str
    role: str
    via: str
    method: str
    route: str
    target: dict[str, str]
    status: int


class AuditLog:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def record(
        self, principal: Principal | None, method: str, route: str, target: dict[str, str], status: int
    ) -> None:
        self.store.execute(
            "INSERT INTO audit_log (at, actor_id, actor, role, via, method, route, target, status)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                self.clock(),
                principal.id if principal else "",
                principal.name if principal else "anonymous",
                principal.role.value if principal else "",
                principal.via if principal else "",
                method,
                route,
                json.dumps(target, sort_keys=True),
                status,
            ),
        )

    def entries(
        self, limit: int = DEFAULT_LIMIT, actor: str | None = None, before_id: int | None = None
    ) -> list[AuditEntry]:
        """Newest first; ``before_id`` pages further back."""
        sql, params = "SELECT * FROM audit_log WHERE 1=1", []
        if actor:
            sql += " AND actor = ?"
            params.append(actor)
        if before_id is not None:
            sql += " AND id < ?"
            params.append(str(before_id))
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(str(max(1, min(limit, MAX_LIMIT))))
        return [_entry(r) for r in self.store.query(sql, params)]


def _entry(r: dict[str, Any]) -> AuditEntry:
    return AuditEntry(
        id=r["id"],
        at=r["at"],
        actor_id=r["actor_id"],
        actor=r["actor"],
        role=r["role"],
        via=r["via"],
        method=r["method"],
        route=r["route"],
        target=json.loads(r["target"]),
        status=r["status"],
    )


class AuditMiddleware:
    """Records each state-changing HTTP request once its response status is known."""

    def __init__(self, app: ASGIApp, audit: AuditLog) -> None:
        self.app = app
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] in SAFE_METHODS
            or str(scope["path"]).startswith(UNAUDITED_PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            template = state.get(ROUTE_KEY, scope["path"]) if isinstance(state, dict) else scope["path"]
            target = {k: str(v) for k, v in (scope.get("path_params") or {}).items()}
            principal = state.get(PRINCIPAL_KEY) if isinstance(state, dict) else None
            try:
                self.audit.record(principal, scope["method"], str(template), target, status)
            except StoreError as exc:
                # The request has been answered; losing its audit line must not turn it into a 500.
                log.error(
                    "audit record failed method=%s path=%s error=%s", scope["method"], scope["path"], exc
                )
