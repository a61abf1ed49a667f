"""The API documentation pages, served with their scripts and styles from this process.

FastAPI's own /docs and /redoc load Swagger UI and ReDoc from a CDN, so on a machine without internet
access they stay blank. The same pages here take those files from the `fastapi-offline` package, at
`/docs/assets/{name}` (one route template, so the request metrics keep one label for them).
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from service.lane import ApiError

ASSETS = Path(fastapi_offline.__file__).parent / "static"
_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def add(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve Swagger UI at `docs_url` and ReDoc at `redoc_url` for `app` (created with both set to None)."""
    assets = f"{docs_url}/assets"

    def url(request: Request, path: str) -> str:
        return f"{request.scope.get('root_path', '')}{path}"  # behind a proxy that strips a prefix

    @app.get(docs_url, include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=url(request, app.openapi_url or "/openapi.json"),
            title=f"{app.title} - Swagger UI",
            swagger_js_url=url(request, f"{assets}/swagger-ui-bundle.js"),
            swagger_css_url=url(request, f"{assets}/swagger-ui.css"),
            swagger_favicon_url=url(request, f"{assets}/favicon.png"),
        )

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=url(request, app.openapi_url or "/openapi.json"),
            title=f"{app.title} - ReDoc",
            redoc_js_url=url(request, f"{assets}/redoc.standalone.js"),
            redoc_favicon_url=url(request, f"{assets}/favicon.png"),
            with_google_fonts=False,  # another remote fetch; the system's fonts serve
        )

    @app.get(f"{assets}/{{name}}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in _FILES:
            raise ApiError(
                404, f"no documentation asset {name[:40]!r}; the pages at {docs_url} and {redoc_url} load theirs"
            )
        return FileResponse(ASSETS / name, headers={"Cache-Control": "public, max-age=86400"})
