"""`/docs` (Swagger UI) and `/redoc` served from this server's own copies of their scripts (the
fastapi-offline package), not from a CDN. A docs page that loads scripts from a third party runs
whatever that party serves, beside the API key a user types into it, and breaks where the network
is closed; FastAPI's defaults load both from jsDelivr, with no integrity check."""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse

STATIC = "/docs-static"


def install_docs(app: FastAPI) -> None:
    """Routes for `/docs` and `/redoc` on an app created with `docs_url=None, redoc_url=None`."""
    app.mount(STATIC, StaticFiles(directory=str(resources.files("fastapi_offline") / "static")), name="docs")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{STATIC}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{STATIC}/redoc.standalone.js",
            redoc_favicon_url=f"{STATIC}/favicon.png",
            with_google_fonts=False,
        )
