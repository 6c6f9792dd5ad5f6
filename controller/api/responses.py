"""Error responses: one body schema for every error, and which codes each route declares.

Every error (401, 404, 409, 413, 422, 503) has the body :class:`ErrorPublic`:
``detail`` says what went wrong in words an operator can act on; a request that
does not match its schema (422) also lists each field's problem in ``errors``.
:func:`install_openapi` declares on each operation the codes it can return, so
the served OpenAPI document says what the API does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

_REF = "#/components/schemas/"

DESCRIPTIONS = {
    400: "The body cannot be read (not UTF-8, or broken multipart)",
    401: "Missing or invalid bearer token",
    404: "A model, version, device, rollout or other named item does not exist",
    409: "It already exists, or its current state does not allow this",
    413: "The request body or one of its parts is over its size limit",
    422: "The request is invalid; nothing was changed",
    503: "The broker's password file or its reload command failed",
}


class FieldErrorPublic(BaseModel):
    loc: list[str | int] = Field(
        description="where the problem is: body, query, path or header, then the field"
    )
    msg: str
    type: str


class ErrorPublic(BaseModel):
    detail: str = Field(description="what went wrong, naming the field or item")
    errors: list[FieldErrorPublic] = Field(
        default_factory=list, description="for a request that does not match its schema: each field's problem"
    )


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route decorator: these error codes, with the error body."""
    return {code: {"model": ErrorPublic, "description": DESCRIPTIONS[code]} for code in codes}


def validation_error_body(exc: RequestValidationError) -> dict[str, Any]:
    problems = [
        FieldErrorPublic(
            loc=[p if isinstance(p, int) else str(p) for p in e["loc"]], msg=e["msg"], type=e["type"]
        )
        for e in exc.errors()
    ]
    detail = "; ".join(f"{'.'.join(str(p) for p in e.loc)}: {e.msg}" for e in problems) or "invalid request"
    return ErrorPublic(detail=detail, errors=problems).model_dump()


def _codes(path: str, operation: dict[str, Any]) -> Iterable[int]:
    """What any operation of this kind can return, read from the operation itself."""
    if operation.get("security"):
        yield 401
    if "{" in path:
        yield 404
    if "requestBody" in operation:
        yield 400
        yield 413
    if "requestBody" in operation or operation.get("parameters"):
        yield 422


def install_openapi(app: FastAPI) -> None:
    """Serve an OpenAPI document that declares on every operation what any operation of
    its kind can return: 401 behind the token, 404 when the path names an item, 413 with
    a body, 422 with any input (with :class:`ErrorPublic`, which replaces FastAPI's own 422
    schema). Codes particular to a route (409, 503) are declared in its decorator."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            _declare_errors(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _declare_errors(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error_schema = ErrorPublic.model_json_schema(ref_template=f"{_REF}{{model}}")
    components.update(error_schema.pop("$defs", {}))
    components["ErrorPublic"] = error_schema
    content = {"application/json": {"schema": {"$ref": f"{_REF}ErrorPublic"}}}
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for code in _codes(path, operation):
                responses.setdefault(str(code), {"description": DESCRIPTIONS[code]})
            for code, response in responses.items():
                if code.isdigit() and int(code) in DESCRIPTIONS:
                    response["content"] = content
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)


def allowed_methods(schema: dict[str, Any], path: str) -> list[str]:
    """The methods the API document declares for a concrete path (for a 405's Allow header)."""
    found: set[str] = set()
    for template, operations in schema.get("paths", {}).items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            found |= {method.upper() for method in operations}
    return sorted(found)
