"""Who may open the worklist, and the headers every response carries.

Access needs the configured token (bearer header, or a session cookie handed
out once for ``?token=``) or the basic-auth user; with neither configured the
server must bind a loopback address (:func:`check_exposure`). Responses carry
a strict Content-Security-Policy, and cross-site POSTs are refused.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from triage.config import WebConfig, is_loopback
from triage.core.errors import TriageError

log = logging.getLogger(__name__)

COOKIE = "triage_session"
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]"]


def check_exposure(web: WebConfig) -> None:
    """Raise TriageError when the web server would listen beyond loopback without auth."""
    if not is_loopback(web.host) and not web.auth_required:
        raise TriageError(f"web.host {web.host} is not a loopback address: set web.token or "
                          "web.basic_user and web.basic_password before exposing the worklist")


# Who did it, when the request names nobody: the token's holder, or the local user
# of an unauthenticated loopback worklist.
TOKEN_USER, LOCAL_USER = "token", "local"


class Sessions:
    """Login sessions: a random id per login, with an expiry, forgotten at logout.

    Kept in memory: a restart logs everybody out, which is the safe side.
    """

    def __init__(self, lifetime_s: float, clock: Callable[[], float] = time.time) -> None:
        self.lifetime_s, self.clock = lifetime_s, clock
        self._lock = threading.Lock()
        self._by_id: dict[str, tuple[str, float]] = {}

    def new(self, user: str) -> str:
        """Open a session for ``user``; return its id (the cookie's value)."""
        sid = secrets.token_urlsafe(32)
        now = self.clock()
        with self._lock:
            # Forget expired sessions as new ones open, so the table stays small.
            self._by_id = {k: v for k, v in self._by_id.items() if v[1] > now}
            self._by_id[sid] = (user, now + self.lifetime_s)
        return sid

    def user(self, sid: str) -> str | None:
        """Return the user of a live session, or None (unknown or expired)."""
        with self._lock:
            entry = self._by_id.get(sid)
            if entry is None:
                return None
            if entry[1] <= self.clock():
                del self._by_id[sid]
                return None
            return entry[0]

    def end(self, sid: str) -> bool:
        """Forget a session (logout); return whether it was live."""
        with self._lock:
            return self._by_id.pop(sid, None) is not None


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def authorized_user(web: WebConfig, headers: Any, cookies: dict[str, str],
                    sessions: Sessions | None = None) -> str | None:
    """Return who is asking when the request carries the token (bearer or a live session
    cookie) or basic auth; None when it is not authorized.

    With no auth configured every request is authorized (loopback only, see check_exposure).
    """
    if not web.auth_required:
        return LOCAL_USER
    scheme, _, value = (headers.get("authorization") or "").partition(" ")
    if web.token and scheme.lower() == "bearer" and _same(value.strip(), web.token):
        return TOKEN_USER
    sid = cookies.get(COOKIE)
    if sid and sessions is not None:
        user = sessions.user(sid)
        if user is not None:
            return user
    if web.basic_user and scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        # Evaluate both comparisons, so timing does not tell which one failed.
        if _same(user, web.basic_user) & _same(password, web.basic_password):
            return user
    return None


def authorized(web: WebConfig, headers: Any, cookies: dict[str, str],
               sessions: Sessions | None = None) -> bool:
    """Return True when the request is authorized (see :func:`authorized_user`)."""
    return authorized_user(web, headers, cookies, sessions) is not None


class AuthMiddleware:
    """Let authorized requests through (who asks goes to ``scope["state"]["user"]``); trade a
    valid ``?token=`` for a session cookie of its own, with an expiry; ``POST /logout`` ends it."""

    def __init__(self, app: ASGIApp, web: WebConfig, sessions: Sessions) -> None:
        self.app, self.web, self.sessions = app, web, sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if scope["path"] == "/logout" and scope["method"] == "POST":
            await self._logout(request)(scope, receive, send)
            return
        token = request.query_params.get("token")
        if self.web.token and token is not None and _same(token, self.web.token):
            await self._login(request)(scope, receive, send)
            return
        user = authorized_user(self.web, request.headers, request.cookies, self.sessions)
        if user is None:
            await self._refuse()(scope, receive, send)
            return
        scope.setdefault("state", {})["user"] = user
        await self.app(scope, receive, send)

    def _login(self, request: Request) -> Response:
        # Redirect to the same URL without the token, so it does not stay in the address bar.
        rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
        target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
        resp = RedirectResponse(target, status_code=303)
        resp.set_cookie(COOKIE, self.sessions.new(TOKEN_USER), httponly=True, samesite="strict",
                        path="/", max_age=int(self.sessions.lifetime_s),
                        secure=request.url.scheme == "https")
        return resp

    def _logout(self, request: Request) -> Response:
        sid = request.cookies.get(COOKIE)
        if sid:
            self.sessions.end(sid)
        resp = PlainTextResponse("Logged out.\n")
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")
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
