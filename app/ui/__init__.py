"""`/ui`: a page where a person watches a team's jobs: the list, one job's progress and ETA, its
loss and learning-rate curves, the reward of each sampling batch, the evaluation's adherence
table and attention plot, and browsers for its samples and its training set.

The page is static files shipped in this package (no CDN, no build step): plain JavaScript that
asks for an API key, keeps it in the tab's sessionStorage and calls the same REST API as any
client with it, so the page sees exactly what the key may see and holds no server-side session.
The HTML is served with a Content-Security-Policy that allows only this origin's scripts, styles
and images (blob: for the attention plot, fetched with the key): tenants' text (samples,
instructions) is written into the page as text nodes, and even a slip there could run no script.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.responses import FileResponse, RedirectResponse

STATIC = Path(__file__).parent / "static"
ASSETS = "/ui/assets"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def install_ui(app: FastAPI) -> None:
    app.mount(ASSETS, StaticFiles(directory=STATIC), name="ui-assets")

    @app.get("/ui", include_in_schema=False)
    def ui_page() -> FileResponse:
        return FileResponse(
            STATIC / "index.html",
            headers={
                "Content-Security-Policy": CSP,
                "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-store",
            },
        )

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui")
