"""Operator accounts: bearer tokens with a role, and the console's sessions.

A token is random, shown once and stored as a sha256 hash. It carries 256 bits of
entropy, so a plain sha256 is as good as a slow password hash here and keeps every
request cheap. Roles are ordered: ``metrics`` (the Prometheus scrape token, /metrics
only) < ``viewer`` (reads) < ``operator`` (changes the fleet) < ``admin`` (tokens,
signing keys, device registration). The admin token written by ``controller init``
stays the built-in admin; tokens made by ``edgefleet tokens create`` live in the
store, may expire, and may be revoked.

A console session is a second random secret in an HttpOnly cookie that points at the
token it was opened with; every request re-checks that token, so revoking it (or
rotating the admin token, or its expiry) ends the session at once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from controller.errors import InvalidTokenRequest, TokenNotFound
from controller.store import Store

SESSION_LIFETIME_S = 12 * 3600.0
TOKEN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
ADMIN_ID = "admin"
METRICS_ID = "metrics"


class Role(StrEnum):
    METRICS = "metrics"
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(Role).index(self)

    def allows(self, required: Role) -> bool:
        return self.rank >= required.rank


def generate_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_token(token), stored_hash)


def parse_bearer(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header value, or None."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


@dataclass(frozen=True)
class Principal:
    """Who is asking: the token's id and name, its role, and how it came (bearer or console)."""

    id: str
    name: str
    role: Role
    token_hash: str
    via: str = "bearer"


@dataclass(frozen=True)
class TokenInfo:
    id: str
    name: str
    role: Role
    created_at: float
    expires_at: float | None
    revoked_at: float | None


@dataclass(frozen=True)
class Session:
    principal: Principal
    csrf: str
    expires_at: float


class Accounts:
    """Tokens and console sessions in the store; the admin and scrape tokens come from controller.toml."""

    def __init__(
        self,
        store: Store,
        admin_hash: Callable[[], str],
        metrics_hash: Callable[[], str | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._admin_hash = admin_hash
        self._metrics_hash = metrics_hash
        self.clock = clock

    # -- tokens -----------------------------------------------------------------

    def create(self, name: str, role: str, expires_in_s: float | None = None) -> tuple[TokenInfo, str]:
        """A new token; the secret is returned once and only its hash is kept."""
        if not re.fullmatch(TOKEN_NAME_PATTERN, name):
            raise InvalidTokenRequest(f"token name {name!r} must match {TOKEN_NAME_PATTERN}")
        try:
            role_ = Role(role)
        except ValueError:
            raise InvalidTokenRequest(
                f"unknown role {role!r}; choose one of {', '.join(r.value for r in Role)}"
            ) from None
        if expires_in_s is not None and expires_in_s <= 0:
            raise InvalidTokenRequest("a token's lifetime must be positive")
        now = self.clock()
        info = TokenInfo(
            id=uuid.uuid4().hex[:12],
            name=name,
            role=role_,
            created_at=now,
            expires_at=now + expires_in_s if expires_in_s is not None else None,
            revoked_at=None,
        )
        secret = generate_token()
        self.store.execute(
            "INSERT INTO operator_tokens (id, name, role, token_hash, created_at, expires_at, revoked_at)"
            " VALUES (?, ?, ?, ?, ?, ?, NULL)",
            (info.id, name, role_.value, hash_token(secret), now, info.expires_at),
        )
        return info, secret

    def tokens(self) -> list[TokenInfo]:
        rows = self.store.query("SELECT * FROM operator_tokens ORDER BY created_at, id")
        return [_token_info(r) for r in rows]

    def revoke(self, token_id: str) -> TokenInfo:
        with self.store.transaction() as tx:
            row = tx.query_one("SELECT * FROM operator_tokens WHERE id = ?", (token_id,))
            if row is None:
                raise TokenNotFound(f"no operator token {token_id!r}")
            if row["revoked_at"] is None:
                row["revoked_at"] = self.clock()
                tx.execute(
                    "UPDATE operator_tokens SET revoked_at = ? WHERE id = ?", (row["revoked_at"], token_id)
                )
                tx.execute("DELETE FROM console_sessions WHERE token_hash = ?", (row["token_hash"],))
        return _token_info(row)

    def resolve(self, token: str) -> Principal | None:
        return self.resolve_hash(hash_token(token))

    def resolve_hash(self, token_hash: str, via: str = "bearer") -> Principal | None:
        """The principal a (hashed) token stands for now, or None if unknown, expired or revoked."""
        if hmac.compare_digest(token_hash, self._admin_hash()):
            return Principal(ADMIN_ID, "admin", Role.ADMIN, token_hash, via)
        scrape = self._metrics_hash()
        if scrape and hmac.compare_digest(token_hash, scrape):
            return Principal(METRICS_ID, "metrics-scrape", Role.METRICS, token_hash, via)
        row = self.store.query_one(
            "SELECT id, name, role, expires_at FROM operator_tokens"
            " WHERE token_hash = ? AND revoked_at IS NULL",
            (token_hash,),
        )
        if row is None or (row["expires_at"] is not None and row["expires_at"] <= self.clock()):
            return None
        return Principal(row["id"], row["name"], Role(row["role"]), token_hash, via)

    # -- console sessions ---------------------------------------------------------

    def open_session(self, principal: Principal) -> tuple[str, Session]:
        """A session for a token just checked; returns the cookie value and the session."""
        cookie = generate_token()
        now = self.clock()
        expires = now + SESSION_LIFETIME_S
        row = self.store.query_one("SELECT expires_at FROM operator_tokens WHERE id = ?", (principal.id,))
        if row is not None and row["expires_at"] is not None:
            expires = min(expires, float(row["expires_at"]))
        csrf = secrets.token_urlsafe(24)
        with self.store.transaction() as tx:
            tx.execute("DELETE FROM console_sessions WHERE expires_at <= ?", (now,))
            tx.execute(
                "INSERT INTO console_sessions (session_hash, token_hash, csrf, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (hash_token(cookie), principal.token_hash, csrf, now, expires),
            )
        return cookie, Session(_with_via(principal, "console"), csrf, expires)

    def session(self, cookie: str) -> Session | None:
        """The live session behind a cookie; None (and the row gone) once it or its token ended."""
        key = hash_token(cookie)
        row = self.store.query_one("SELECT * FROM console_sessions WHERE session_hash = ?", (key,))
        if row is None:
            return None
        principal = self.resolve_hash(row["token_hash"], via="console")
        if principal is None or row["expires_at"] <= self.clock():
            self.store.execute("DELETE FROM console_sessions WHERE session_hash = ?", (key,))
            return None
        return Session(principal, row["csrf"], row["expires_at"])

    def close_session(self, cookie: str) -> None:
        self.store.execute("DELETE FROM console_sessions WHERE session_hash = ?", (hash_token(cookie),))


def _with_via(p: Principal, via: str) -> Principal:
    return Principal(p.id, p.name, p.role, p.token_hash, via)


def _token_info(r: dict[str, object]) -> TokenInfo:
    expires, revoked = r["expires_at"], r["revoked_at"]
    return TokenInfo(
        id=str(r["id"]),
        name=str(r["name"]),
        role=Role(str(r["role"])),
        created_at=float(str(r["created_at"])),
        expires_at=float(str(expires)) if expires is not None else None,
        revoked_at=float(str(revoked)) if revoked is not None else None,
    )
