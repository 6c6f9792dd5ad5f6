"""/docs works on a controller host with no internet access: every asset it names is served locally."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urlsplit

from tests.support.controller_process import Ctl


class Links(HTMLParser):
    """Every URL a page makes the browser load: src and href attributes, and url: strings in scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in_script = tag == "script"
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.urls += re.findall(
                r"""(?:url|oauth2RedirectUrl)['"]?\s*:\s*(?:[^'"]*\+\s*)?['"]([^'"]+)['"]""", data
            )


def test_docs_page_loads_only_local_assets(ctl: Ctl) -> None:
    page = ctl.client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    links = Links()
    links.feed(page.text)
    assert any(u.endswith(".js") for u in links.urls) and any(u.endswith(".css") for u in links.urls)
    assert "/openapi.json" in links.urls
    for url in links.urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc, f"/docs loads {url} from another host"
        assert url.startswith("/"), url
        loaded = ctl.client.get(url)
        assert loaded.status_code == 200, f"{url}: {loaded.status_code}"
        assert loaded.content, url
    script = next(u for u in links.urls if u.endswith("swagger-ui-bundle.js"))
    assert "SwaggerUIBundle" in ctl.client.get(script).text
    # The CDN page FastAPI would serve otherwise, and ReDoc (CDN only), are gone.
    assert ctl.client.get("/redoc").status_code == 404
