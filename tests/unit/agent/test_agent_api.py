"""Tenant tokens: which tenant a call may act for (the rules; real gRPC in the integration tests)."""

from __future__ import annotations

import contextlib

import grpc
import pytest

from agent.api import TOKEN_METADATA, TenantAuth
from agent.tenants import TenantSpec, hash_token

SPECS = {
    "cam": TenantSpec("cam", token_sha256=hash_token("cam-token-0123456789")),
    "mic": TenantSpec("mic", token_sha256=hash_token("mic-token-0123456789")),
    "open": TenantSpec("open"),
}


class Aborted(Exception):
    pass


class Context:
    """What TenantAuth reads from a grpc.ServicerContext: the metadata, and abort()."""

    def __init__(self, token: str | None) -> None:
        self.metadata = [(TOKEN_METADATA, token)] if token else []
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.metadata

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Aborted(details)


def refused(auth: TenantAuth, token: str | None, tenant: str) -> tuple[grpc.StatusCode | None, str]:
    context = Context(token)
    with contextlib.suppress(Aborted):
        auth.check(context, tenant)
    return context.code, context.details


@pytest.mark.parametrize(
    ("token", "tenant", "code", "details"),
    [
        ("cam-token-0123456789", "cam", None, ""),
        (
            "cam-token-0123456789",
            "mic",
            grpc.StatusCode.PERMISSION_DENIED,
            "tenant 'cam' cannot use tenant 'mic'",
        ),
        ("cam-token-0123456789", "open", grpc.StatusCode.PERMISSION_DENIED, "cannot use tenant 'open'"),
        (None, "cam", grpc.StatusCode.UNAUTHENTICATED, "needs its token"),
        ("guess-0123456789", "cam", grpc.StatusCode.UNAUTHENTICATED, "matches no tenant"),
        (None, "open", None, ""),
        (None, "default", None, ""),
        ("cam-token-0123456789", "cam.shadow", grpc.StatusCode.PERMISSION_DENIED, "shadow candidate"),
    ],
)
def test_tokens_name_their_tenant(
    token: str | None, tenant: str, code: grpc.StatusCode | None, details: str
) -> None:
    got_code, got_details = refused(TenantAuth(lambda: SPECS), token, tenant)
    assert got_code == code and details in got_details


def test_require_token_closes_the_open_tenants_and_listing_follows_the_rules() -> None:
    strict = TenantAuth(lambda: SPECS, require_token=True)
    assert refused(strict, None, "default")[0] == grpc.StatusCode.UNAUTHENTICATED
    assert [
        t for t in ("cam", "mic", "open", "cam.shadow") if strict.visible(Context("mic-token-0123456789"), t)
    ] == ["mic"]
    lenient = TenantAuth(lambda: SPECS)
    assert [t for t in ("cam", "mic", "open", "default") if lenient.visible(Context(None), t)] == [
        "open",
        "default",
    ]
