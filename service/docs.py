"""The API documentation pages, served with their scripts and styles from this process.

FastAPI's own /docs and /redoc load Swagger UI and ReDoc from a CDN, so on a machine without internet
access they stay blank. The same pages here take those files from the `fastapi-offline` package, at
`/docs/assets/{name}` (one route template, so the request metrics keep one label for them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from service.lane import ApiError

ASSETS = Path(fastapi_offline.__file__).parent / "static"
_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
log = logging.getLogger("lcs.service")


def add(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve Swagger UI at `docs_url` (and `/` redirected there) and ReDoc at `redoc_url` for `app` (created
    with both set to None).
    Should the package's files be missing (a version that moved them), the pages load FastAPI's CDN copies,
    with a warning, rather than answer 500 for each file."""
    assets = f"{docs_url}/assets"
    missing = [name for name in _FILES if not (ASSETS / name).is_file()]
    if missing:
        log.warning("%s lacks %s: the API pages load their scripts from a CDN instead", ASSETS, missing)

    def url(request: Request, path: str) -> str:
        return f"{request.scope.get('root_path', '')}{path}"  # behind a proxy that strips a prefix

    def local(request: Request, **files: str) -> dict[str, Any]:
        """The page's file arguments, pointing here; none (FastAPI's CDN defaults) if any file is missing."""
        return {} if missing else {arg: url(request, f"{assets}/{name}") for arg, name in files.items()}

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def root(request: Request) -> RedirectResponse:
        """The address a browser opens first: the API page, not a 404."""
        return RedirectResponse(url(request, docs_url))

    @app.api_route(docs_url, methods=["GET", "HEAD"], include_in_schema=False)  # HEAD: what uptime checks send
    async def swagger(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=url(request, app.openapi_url or "/openapi.json"),
            title=f"{app.title} - Swagger UI",
            **local(
                request,
                swagger_js_url="swagger-ui-bundle.js",
                swagger_css_url="swagger-ui.css",
                swagger_favicon_url="favicon.png",
            ),
        )

    @app.api_route(redoc_url, methods=["GET", "HEAD"], include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=url(request, app.openapi_url or "/openapi.json"),
            title=f"{app.title} - ReDoc",
            with_google_fonts=False,  # another remote fetch; the system's fonts serve
            **local(request, redoc_js_url="redoc.standalone.js", redoc_favicon_url="favicon.png"),
        )

    @app.api_route(f"{assets}/{{name}}", methods=["GET", "HEAD"], include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in _FILES or name in missing:
            raise ApiError(
                404, f"no documentation asset {name[:40]!r}; the pages at {docs_url} and {redoc_url} load theirs"
            )
        return FileResponse(ASSETS / name, headers={"Cache-Control": "public, max-age=86400"})
