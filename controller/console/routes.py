"""The console's pages. Thin: each reads through the service modules and renders a template."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Form, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from controller.api.deps import PUBLIC, SESSION_COOKIE, ControllerDep, PrincipalDep, minimum_role
from controller.audit import PRINCIPAL_KEY
from controller.auth import Principal, Role
from controller.console import views
from controller.errors import NotFoundError

router = APIRouter(prefix="/ui", include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
templates.env.filters["when"] = views.when
templates.env.filters["size"] = views.size
templates.env.filters["validation"] = views.validation_summary


def _page(request: Request, name: str, principal: Principal | None, **context: Any) -> HTMLResponse:
    context |= {"principal": principal, "csrf": getattr(request.state, "csrf", ""), "Role": Role}
    return templates.TemplateResponse(request, name, context)


def _missing(request: Request, principal: Principal | None, exc: NotFoundError) -> HTMLResponse:
    """A page for something that does not exist: the API's words, inside the console."""
    page = _page(request, "missing.html", principal, message=str(exc))
    page.status_code = status.HTTP_404_NOT_FOUND
    return page


def _same_site(request: Request) -> bool:
    """Whether a form was posted by a page of this controller: browsers name the page's origin,
    and a login posted from elsewhere would log the browser into someone else's account.
    Host only, not scheme: a TLS-terminating proxy in front changes the scheme."""
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host", "")


def _safe_next(target: str) -> str:
    # Only pages of the console: never an absolute URL an attacker chose.
    return target if target.startswith("/ui") and not target.startswith("//") else "/ui"


@router.get("/login", openapi_extra=minimum_role(PUBLIC))
def login_page(request: Request, next: str = "/ui") -> HTMLResponse:
    return _page(request, "login.html", None, next=_safe_next(next), error="")


@router.post("/login", openapi_extra=minimum_role(PUBLIC))
def login(
    request: Request,
    controller: ControllerDep,
    token: Annotated[str, Form()],
    next: Annotated[str, Form()] = "/ui",
) -> Response:
    if not _same_site(request):
        refused = _page(
            request, "login.html", None, next=_safe_next(next), error="a login from another site is refused"
        )
        refused.status_code = status.HTTP_403_FORBIDDEN
        return refused
    principal = controller.accounts.resolve(token.strip())
    if principal is None:
        refused = _page(
            request, "login.html", None, next=_safe_next(next), error="unknown, expired or revoked token"
        )
        refused.status_code = status.HTTP_401_UNAUTHORIZED
        return refused
    cookie, session = controller.accounts.open_session(principal)
    setattr(request.state, PRINCIPAL_KEY, session.principal)
    response = RedirectResponse(_safe_next(next), status_code=status.HTTP_303_SEE_OTHER)
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=int(session.expires_at - controller.accounts.clock()),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout", openapi_extra=minimum_role(Role.VIEWER))
def logout(request: Request, controller: ControllerDep) -> Response:
    controller.accounts.close_session(request.cookies.get(SESSION_COOKIE, ""))
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("")
def overview(request: Request, controller: ControllerDep, principal: PrincipalDep) -> HTMLResponse:
    devices = controller.fleet.all()
    rollouts = controller.rollouts.all()
    return _page(
        request,
        "overview.html",
        principal,
        counts=views.status_counts(devices),
        total=len(devices),
        active=[views.rollout_view(r) for r in views.active_rollouts(rollouts)],
        alerts=views.alerts(devices, rollouts),
    )


@router.get("/devices")
def devices_page(
    request: Request,
    controller: ControllerDep,
    principal: PrincipalDep,
    q: str = "",
    tag: str = "",
    profile: str = "",
    status_filter: Annotated[str, Query(alias="status")] = "",
    group: str = "",
) -> HTMLResponse:
    everything = controller.fleet.all()
    groups = controller.rollouts.groups.all()
    chosen = next((g for g in groups if g.name == group), None)
    members = set(chosen.devices) if chosen is not None else (set() if group else None)
    shown = views.filter_devices(everything, q, tag, profile, status_filter, members)
    return _page(
        request,
        "devices.html",
        principal,
        devices=[(d, views.device_status(d)) for d in shown],
        total=len(everything),
        q=q,
        tag=tag,
        profile=profile,
        status=status_filter,
        group=group,
        groups=[g.name for g in groups],
        tags=sorted({t for d in everything for t in d.tags}),
        profiles=sorted({d.profile for d in everything if d.profile}),
        statuses=views.DEVICE_STATUSES,
    )


@router.get("/devices/{device_id}")
def device_page(
    request: Request, device_id: str, controller: ControllerDep, principal: PrincipalDep
) -> HTMLResponse:
    try:
        device = controller.fleet.get(device_id)
    except NotFoundError as exc:
        return _missing(request, principal, exc)
    return _page(
        request,
        "device.html",
        principal,
        device=device,
        status=views.device_status(device),
        tenants=controller.tenants.get(device_id),
        groups=[g.name for g in controller.rollouts.groups.all() if device_id in g.devices],
        windows=_windows(controller, device_id),
        rollouts=views.device_rollouts(device_id, controller.rollouts.all()),
        history=controller.telemetry.events(device_id, 100),
    )


def _windows(controller: ControllerDep, device_id: str) -> dict[str, Any]:
    """The maintenance windows that apply to a device and whether one is open now."""
    windows = controller.rollouts.windows
    now = windows.clock()
    applying = windows.applying([device_id]).get(device_id, [])
    return {
        "list": applying,
        "openings": windows.openings(applying, now) if applying else {},
        "status": windows.statuses([device_id], now)[device_id],
    }


@router.get("/models")
def models_page(request: Request, controller: ControllerDep, principal: PrincipalDep) -> HTMLResponse:
    registry = controller.registry
    models = [
        (m.name, [registry.get(m.name, v.version) for v in reversed(m.versions)]) for m in registry.all()
    ]
    return _page(request, "models.html", principal, models=models)


@router.get("/rollouts")
def rollouts_page(request: Request, controller: ControllerDep, principal: PrincipalDep) -> HTMLResponse:
    rollouts = sorted(controller.rollouts.all(), key=lambda r: r.created_at, reverse=True)
    models = [(m.name, [v.version for v in m.versions]) for m in controller.registry.all()]
    return _page(
        request,
        "rollouts.html",
        principal,
        rollouts=[views.rollout_view(r) for r in rollouts],
        models=models,
        groups=[g.name for g in controller.rollouts.groups.all()],
    )


@router.get("/rollouts/{rollout_id}")
def rollout_page(
    request: Request, rollout_id: str, controller: ControllerDep, principal: PrincipalDep
) -> HTMLResponse:
    try:
        rollout = controller.rollouts.get(rollout_id)
    except NotFoundError as exc:
        return _missing(request, principal, exc)
    return _page(
        request,
        "rollout.html",
        principal,
        view=views.rollout_view(rollout),
        events=views.event_log(controller.rollouts.events(rollout_id)),
        gates=views.gate_texts(rollout.plan),
        actions=views.actions(),
    )


@router.get("/drift")
def drift_page(
    request: Request, controller: ControllerDep, principal: PrincipalDep, model: str = "", version: str = ""
) -> HTMLResponse:
    loop = controller.closed_loop
    choices = [(m.name, v.version) for m in controller.registry.all() for v in m.versions]
    if not model and choices:
        with_baseline = [c for c in choices if _has_baseline(controller, *c)]
        model, version = (with_baseline or choices)[-1]
    thresholds = [
        {"policy": p.name, "threshold": p.drift.threshold, "metric": p.drift.metric}
        for p in loop.retraining.policies()
        if p.model_name == model and p.drift is not None
    ]
    return _page(
        request, "drift.html", principal, model=model, version=version, choices=choices, thresholds=thresholds
    )


def _has_baseline(controller: ControllerDep, name: str, version: str) -> bool:
    try:
        controller.closed_loop.baselines.get(name, version)
    except NotFoundError:
        return False
    return True


@router.get("/datasets")
def datasets_page(request: Request, controller: ControllerDep, principal: PrincipalDep) -> HTMLResponse:
    loop = controller.closed_loop
    return _page(
        request,
        "datasets.html",
        principal,
        datasets=loop.datasets.find(None, None),
        runs=loop.retraining.runs(None, 100),
        policies=loop.retraining.policies(),
    )


@router.get("/audit", openapi_extra=minimum_role(Role.OPERATOR))
def audit_page(request: Request, controller: ControllerDep, principal: PrincipalDep) -> HTMLResponse:
    return _page(request, "audit.html", principal, entries=controller.audit.entries(300))
