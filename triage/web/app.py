"""The web app: the worklist, study and history pages, overlays and a small JSON API.

The worklist page and its JSON are the files the scheduler renders; study and
history pages are rendered per request. Files are served only from the data
directory's ``heatmaps/`` folder, after resolving the path. Who may ask is
:mod:`triage.web.security`'s business.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Route

from triage.config import WebConfig
from triage.store.database import unavailable, why_unavailable
from triage.web.security import LOOPBACK_HOSTS, AuthMiddleware, SecurityHeaders, Sessions

log = logging.getLogger(__name__)


def safe_file(root: Path, relpath: str) -> Path | None:
    """Return the PNG ``relpath`` under ``root`` if it exists and stays inside it, else None."""
    base = root.resolve()
    try:
        target = (base / relpath).resolve()
    except (OSError, ValueError):
        return None
    if not target.is_relative_to(base) or target.suffix != ".png" or not target.is_file():
        return None
    return target


@dataclass(frozen=True)
class Ops:
    """What the operations endpoints ask the daemon: liveness (ok, detail) and metrics text."""

    health: Callable[[], tuple[bool, dict[str, Any]]]
    metrics: Callable[[], bytes]
    metrics_content_type: str = "text/plain; version=0.0.4; charset=utf-8"


def build_app(pages: Any, data_root: Path, web: WebConfig, ops: Ops | None = None,
              stow: Callable[[Request], Any] | None = None) -> Starlette:
    """Return the Starlette app serving ``pages`` and the overlays under ``data_root``, and,
    with ``ops``, ``/healthz`` (200 or 503, JSON) and ``/metrics`` (Prometheus text); with
    ``stow`` (a :class:`~triage.web.stow.StowReceiver`), DICOMweb STOW-RS at
    ``/dicomweb/studies``."""
    heatmaps = data_root / "heatmaps"
    no_store = {"Cache-Control": "no-store"}

    # The rendered files are read whole: one open() sees one version even while a
    # render renames the next one into place (FileResponse would stat, then reopen).
    def worklist(request: Request) -> Response:
        return Response(pages.worklist_html.read_bytes(), media_type="text/html; charset=utf-8",
                        headers=no_store)

    def api_worklist(request: Request) -> Response:
        return Response(pages.worklist_json.read_bytes(), media_type="application/json",
                        headers=no_store)

    def study(request: Request) -> Response:
        html = pages.study_page(request.path_params["study_id"])
        if html is None:
            return PlainTextResponse("404 Not Found: no such study\n", status_code=404)
        return HTMLResponse(html, headers=no_store)

    def api_study(request: Request) -> Response:
        doc = pages.study_json(request.path_params["study_id"])
        if doc is None:
            return JSONResponse({"error": "no such study"}, status_code=404, headers=no_store)
        return JSONResponse(doc, headers=no_store)

    def history(request: Request) -> Response:
        return HTMLResponse(pages.history_page(request.query_params.get("q", "")), headers=no_store)

    def files(request: Request) -> Response:
        rel = request.path_params["path"]
        path = safe_file(heatmaps, rel.removeprefix("heatmaps/")) if rel.startswith("heatmaps/") else None
        if path is None:
            return PlainTextResponse("404 Not Found\n", status_code=404)
        return FileResponse(path, media_type="image/png")

    def report(request: Request) -> Response:
        return _mark(request, True)

    def unreport(request: Request) -> Response:
        return _mark(request, False)

    def _mark(request: Request, reported: bool) -> Response:
        sid = request.path_params["study_id"]
        user = request.scope.get("state", {}).get("user")
        if not pages.mark_reported(sid, reported, by=user):
            return PlainTextResponse("404 Not Found: no such study\n", status_code=404)
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"study_id": sid, "reported": reported})
        return RedirectResponse("/" if reported else f"/study/{sid}", status_code=303)

    def lime(request: Request) -> Response:
        sid, iid = request.path_params["study_id"], request.path_params["instance_id"]
        state = pages.request_lime(sid, iid)
        if state is None:
            return PlainTextResponse("404 Not Found: no such scored image\n", status_code=404)
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"study_id": sid, "instance_id": iid, "lime": state})
        return RedirectResponse(f"/study/{sid}#image-{iid}", status_code=303)

    def healthz(request: Request) -> Response:
        assert ops is not None
        ok, detail = ops.health()
        return JSONResponse(detail, status_code=200 if ok else 503, headers=no_store)

    def metrics(request: Request) -> Response:
        assert ops is not None
        return Response(ops.metrics(), media_type=ops.metrics_content_type, headers=no_store)

    def favicon(request: Request) -> Response:
        return Response(status_code=204)  # none, and no 404 in the browser's console

    routes = [
        Route("/", worklist), Route("/favicon.ico", favicon), Route("/api/worklist", api_worklist),
        Route("/study/{study_id:int}", study), Route("/history", history),
        Route("/api/study/{study_id:int}", api_study),
        Route("/files/{path:path}", files),
        Route("/study/{study_id:int}/report", report, methods=["POST"]),
        Route("/study/{study_id:int}/unreport", unreport, methods=["POST"]),
        Route("/study/{study_id:int}/image/{instance_id:int}/lime", lime, methods=["POST"]),
    ]
    if ops is not None:
        routes += [Route("/healthz", healthz), Route("/metrics", metrics)]
    if stow is not None:
        async def store(request: Request) -> Response:
            assert stow is not None
            return await stow(request)  # type: ignore[no-any-return]

        routes += [Route("/dicomweb/studies", store, methods=["POST"]),
                   Route("/dicomweb/studies/{study_uid}", store, methods=["POST"])]
    middleware = [Middleware(SecurityHeaders, csp_hashes=pages.csp_hashes),
                  Middleware(AuthMiddleware, web=web,
                             sessions=Sessions(web.session_minutes * 60.0))]
    if not web.auth_required:
        # Unauthenticated is loopback only; refusing foreign Host headers also stops
        # DNS rebinding from turning a web page into a client of this server.
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_HOSTS))
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={DBAPIError: database_unavailable})


def database_unavailable(request: Request, exc: Exception) -> Response:
    """A page that needs the database while it is away: 503 with a Retry-After, not a 500 (the
    rendered worklist still serves from its file). Any other database error is re-raised."""
    if not unavailable(exc):
        raise exc
    log.warning("%s %s answered 503: the database is unavailable (%s)", request.method,
                request.url.path, why_unavailable(exc))
    return PlainTextResponse("The database is unavailable; try again in a moment.\n",
                             status_code=503, headers={"Retry-After": "5",
                                                       "Cache-Control": "no-store"})
