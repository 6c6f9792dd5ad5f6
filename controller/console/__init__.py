"""The web console under /ui: server-rendered pages (Jinja2) with a little vanilla JS.

It is served by the controller's own application, so it needs no build step and no
internet access: its one third-party asset (Chart.js) is vendored under
``static/vendor`` by ``scripts/vendor_console.sh``. Pages read through the same
service modules as the REST API; every action the browser takes is a call to the
REST API itself with the session cookie and the session's CSRF token, so roles,
errors and the audit log are exactly the API's.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from controller.console.routes import router

STATIC_DIR = Path(__file__).parent / "static"
STATIC_PATH = "/ui/static"


def mount(app: FastAPI) -> None:
    app.include_router(router)
    # Scripts, styles and the charting library: public, like the login page that uses them.
    app.mount(STATIC_PATH, StaticFiles(directory=STATIC_DIR), name="console-static")
