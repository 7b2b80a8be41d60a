"""The job page's files as the API serves them (the page itself runs in a real browser in
tests/e2e/test_service_e2e.py): the HTML under a strict Content-Security-Policy, its assets from
this package only, nothing else of the package reachable, and no data without a key."""

from __future__ import annotations

from pathlib import Path

import pytest

STATIC = Path(__file__).resolve().parents[2] / "app" / "ui" / "static"


def test_the_page_is_served_under_a_policy_that_runs_only_its_own_scripts(client):
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["script-src"] == "'self'"
    assert policy["style-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
    assert (
        page.headers["x-content-type-options"] == "nosniff"
        and page.headers["referrer-policy"] == "no-referrer"
    )
    # Every script and stylesheet the page names is served here, as what it is.
    assert 'src="/ui/assets/app.js"' in page.text and 'href="/ui/assets/style.css"' in page.text
    script = client.get("/ui/assets/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert script.content == (STATIC / "app.js").read_bytes()
    assert client.get("/ui/assets/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/", follow_redirects=False).headers["location"] == "/ui"


@pytest.mark.parametrize(
    "path", ["/ui/assets/../__init__.py", "/ui/assets/%2e%2e/__init__.py", "/ui/assets/nope.js"]
)
def test_nothing_but_the_assets_is_served(client, path):
    assert client.get(path).status_code == 404


def test_the_page_holds_no_data_the_api_would_refuse(client):
    # The page is public; what it shows comes from the API, which still wants a key.
    assert client.get("/v1/jobs").status_code == 401
    assert "innerHTML" not in (STATIC / "app.js").read_text()  # tenants' text goes in as text nodes
