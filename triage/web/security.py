"""Who may open the worklist, and the headers every response carries.

Access needs the configured token (bearer header, or a session cookie handed
out once for ``?token=``) or the basic-auth user; with neither configured the
server must bind a loopback address (:func:`check_exposure`). Responses carry
a strict Content-Security-Policy, and cross-site POSTs are refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
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
