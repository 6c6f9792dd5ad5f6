"""The interactive API description at ``/docs``, served with no internet access.

FastAPI's default page loads Swagger UI's script, stylesheet and icon from public
hosts, so it is blank on a controller that cannot reach them. The same files come
here from a Python package (swagger-ui-bundle-v2, Swagger UI 5, which renders the
OpenAPI 3.1 document FastAPI writes) and are served by the controller itself.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from controller.api.deps import PUBLIC, minimum_role

DOCS_URL = "/docs"
ASSETS_URL = "/docs/assets"


def install_docs(app: FastAPI) -> None:
    """Serve ``/docs`` from packaged assets; the app must be made with ``docs_url=None``."""
    app.mount(ASSETS_URL, StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui-assets")
    redirect_url = f"{DOCS_URL}/oauth2-redirect"

    # Public like /openapi.json: the page holds no data; its requests carry the reader's token.
    @app.get(DOCS_URL, include_in_schema=False, openapi_extra=minimum_role(PUBLIC))
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon-32x32.png",
            oauth2_redirect_url=redirect_url,
        )

    @app.get(redirect_url, include_in_schema=False, openapi_extra=minimum_role(PUBLIC))
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
