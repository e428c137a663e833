"""The web edge: the worklist, study and history pages, heatmaps and a small JSON API.

A Starlette app served by uvicorn in a thread of the daemon. The worklist page
and its JSON are the files the scheduler renders; study and history pages
are rendered per request. Access needs the configured token or basic-auth
user; with neither configured the server must bind a loopback address
(:func:`check_exposure`). Files are served only from the data directory's
``heatmaps/`` folder, after resolving the path.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

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
from starlette.types import ASGIApp, Receive, Scope, Send

from triage.config import WebConfig, is_loopback
from triage.errors import TriageError

log = logging.getLogger(__name__)

COOKIE = "triage_session"
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]"]


def check_exposure(web: WebConfig) -> None:
    """Raise TriageError when the web server would listen beyond loopback without auth."""
    if not is_loopback(web.host) and not web.auth_required:
        raise TriageError(f"web.host {web.host} is not a loopback address: set web.token or "
                          "web.basic_user and web.basic_password before exposing the worklist")


def session_value(token: str) -> str:
    """Return the cookie value for ``token``: derived from it, so the cookie never holds it."""
    return hmac.new(token.encode(), b"triage worklist session", hashlib.sha256).hexdigest()


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def authorized(web: WebConfig, headers: Any, cookies: dict[str, str]) -> bool:
    """Return True when a request carries the token (bearer or session cookie) or basic auth.

    With no auth configured every request is authorized (loopback only, see check_exposure).
    """
    if not web.auth_required:
        return True
    scheme, _, value = (headers.get("authorization") or "").partition(" ")
    if web.token:
        if scheme.lower() == "bearer" and _same(value.strip(), web.token):
            return True
        if _same(cookies.get(COOKIE, ""), session_value(web.token)):
            return True
    if web.basic_user and scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        # Evaluate both comparisons, so timing does not tell which one failed.
        return _same(user, web.basic_user) & _same(password, web.basic_password)
    return False


class AuthMiddleware:
    """Let authorized requests through; trade a valid ``?token=`` for a session cookie."""

    def __init__(self, app: ASGIApp, web: WebConfig) -> None:
        self.app, self.web = app, web

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        token = request.query_params.get("token")
        if self.web.token and token is not None and _same(token, self.web.token):
            await self._login(request)(scope, receive, send)
        elif authorized(self.web, request.headers, request.cookies):
            await self.app(scope, receive, send)
        else:
            await self._refuse()(scope, receive, send)

    def _login(self, request: Request) -> Response:
        # Redirect to the same URL without the token, so it does not stay in the address bar.
        rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
        target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
        resp = RedirectResponse(target, status_code=303)
        resp.set_cookie(COOKIE, session_value(self.web.token), httponly=True, samesite="strict",
                        path="/")
        return resp

    def _refuse(self) -> Response:
        headers = {"WWW-Authenticate": 'Basic realm="triage", charset="UTF-8"'} if self.web.basic_user else {}
        hint = "open the worklist as /?token=TOKEN or send 'Authorization: Bearer TOKEN'" \
            if self.web.token else "log in with the configured user"
        return PlainTextResponse(f"401 Unauthorized: {hint}\n", status_code=401, headers=headers)


class SecurityHeaders:
    """Add a strict Content-Security-Policy and friends; refuse cross-site POSTs."""

    def __init__(self, app: ASGIApp, csp_hashes: dict[str, str]) -> None:
        self.app = app
        self.csp = ("default-src 'none'; img-src 'self'; "
                    f"style-src {csp_hashes['style']}; script-src {csp_hashes['script']}; "
                    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "POST" and not same_origin(Request(scope).headers):
            await PlainTextResponse("403 Forbidden: cross-site request\n", status_code=403)(
                scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"content-security-policy", self.csp.encode()),
                         (b"x-content-type-options", b"nosniff"),
                         (b"referrer-policy", b"same-origin"),
                         (b"x-frame-options", b"DENY")]
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await self.app(scope, receive, send_with_headers)


def same_origin(headers: Any) -> bool:
    """Return False when a browser says the request comes from another site.

    Requests without Origin (curl, scripts) carry no ambient credentials worth forging.
    """
    if (headers.get("sec-fetch-site") or "same-origin") not in ("same-origin", "none"):
        return False
    origin = headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == (headers.get("host") or "")


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


def build_app(pages: Any, data_root: Path, web: WebConfig) -> Starlette:
    """Return the Starlette app serving ``pages`` and the overlays under ``data_root``."""
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
        if not pages.mark_reported(sid, reported):
            return PlainTextResponse("404 Not Found: no such study\n", status_code=404)
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"study_id": sid, "reported": reported})
        return RedirectResponse("/" if reported else f"/study/{sid}", status_code=303)

    def favicon(request: Request) -> Response:
        return Response(status_code=204)  # none, and no 404 in the browser's console

    routes = [
        Route("/", worklist), Route("/favicon.ico", favicon), Route("/api/worklist", api_worklist),
        Route("/study/{study_id:int}", study), Route("/history", history),
        Route("/files/{path:path}", files),
        Route("/study/{study_id:int}/report", report, methods=["POST"]),
        Route("/study/{study_id:int}/unreport", unreport, methods=["POST"]),
    ]
    middleware = [Middleware(SecurityHeaders, csp_hashes=pages.csp_hashes),
                  Middleware(AuthMiddleware, web=web)]
    if not web.auth_required:
        # Unauthenticated is loopback only; refusing foreign Host headers also stops
        # DNS rebinding from turning a web page into a client of this server.
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_HOSTS))
    return Starlette(routes=routes, middleware=middleware)


class WebServer:
    """Uvicorn serving the app in a thread, on a socket bound at :meth:`start`."""

    def __init__(self, web: WebConfig, app: Starlette) -> None:
        self.web, self.app = web, app
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def port(self) -> int:
        """The bound port (meaningful after start)."""
        return int(self._sock.getsockname()[1]) if self._sock else self.web.port

    def start(self) -> None:
        """Bind and listen, then serve in a thread. Raises TriageError when the address is unusable."""
        import uvicorn

        try:
            self._sock = _listen(self.web.host, self.web.port)
        except OSError as e:
            raise TriageError(f"cannot listen on web {self.web.host}:{self.web.port}: "
                              f"{e.strerror or e}") from e
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5, server_header=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._server.started:
            raise TriageError(f"the web server on {self.web.host}:{self.port} did not start")
        log.info("worklist at http://%s:%d/", self.web.host, self.port)

    def stop(self) -> None:
        """Stop serving; requests in flight get a few seconds to finish."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock
