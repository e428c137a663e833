"""The two transports: HL7 v2 over MLLP (one message in flight, an ACK per message) and an HTTP
POST of a FHIR Bundle. They only move bytes and say what the answer means."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import urllib.error
import urllib.request
from types import TracebackType

from triage.core.errors import TriageError
from triage.messages.facts import DELIVERED, REFUSED, RETRY, Outcome

START, END = b"\x0b", b"\x1c\x0d"  # MLLP block: <VT> message <FS><CR>
MAX_ANSWER = 1 << 20


class TransportError(TriageError):
    """The peer could not be reached, or the connection broke before an answer came."""


def client_context(ca_file: str = "", cert_file: str = "", key_file: str = "",
                   check_hostname: bool = True) -> ssl.SSLContext:
    """Return a TLS client context (CAs from ``ca_file``, else the system's). Raises
    TransportError when a file cannot be loaded."""
    try:
        ctx = ssl.create_default_context(cafile=ca_file or None)
        ctx.check_hostname = check_hostname
        if cert_file:
            ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise TransportError(f"TLS files cannot be loaded: {e}") from e
    return ctx


class MllpConnection:
    """One MLLP connection; :meth:`exchange` sends a message and waits for its answer."""

    def __init__(self, host: str, port: int, timeout_s: float,
                 tls: ssl.SSLContext | None = None) -> None:
        self.host, self.port, self.timeout_s, self.tls = host, port, timeout_s, tls
        self._sock: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> MllpConnection:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
            self._sock = (self.tls.wrap_socket(sock, server_hostname=self.host)
                          if self.tls else sock)
        except (OSError, ssl.SSLError) as e:
            raise TransportError(f"cannot connect to {self.host}:{self.port} ({e})") from e
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def exchange(self, message: str) -> str:
        """Send one framed message and return the answer's text (the ACK). Raises
        TransportError on a timeout, a closed connection or a malformed frame."""
        assert self._sock is not None, "use the connection as a context manager"
        try:
            self._sock.sendall(START + message.encode("utf-8") + END)
            return self._read_block().decode("utf-8", errors="replace")
        except (OSError, ssl.SSLError) as e:
            raise TransportError(f"no answer from {self.host}:{self.port} ({e})") from e

    def _read_block(self) -> bytes:
        assert self._sock is not None
        while END not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise TransportError("the peer closed the connection before answering")
            self._buf += chunk
            if len(self._buf) > MAX_ANSWER:
                raise TransportError("the answer is larger than 1 MiB")
        block, _, self._buf = self._buf.partition(END)
        if not block.startswith(START):
            raise TransportError("the answer is not an MLLP block")
        return block[1:]


def _auth_header(bearer_token: str, user: str, password: str) -> dict[str, str]:
    if bearer_token:
        return {"Authorization": f"Bearer {bearer_token}"}
    if user:
        raw = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {raw}"}
    return {}


def outcome_text(body: bytes) -> str:
    """Return the diagnostics of an OperationOutcome in ``body`` (else its first 200 bytes)."""
    try:
        doc = json.loads(body)
        issues = doc.get("issue", []) if isinstance(doc, dict) else []
        text = "; ".join(str(i.get("diagnostics") or i.get("details", {}).get("text") or
                             i.get("code", "")) for i in issues)
        if text:
            return text[:300]
    except (ValueError, AttributeError):
        pass
    return body[:200].decode("utf-8", errors="replace")


def post_bundle(base_url: str, bundle: str, timeout_s: float, tls: ssl.SSLContext | None = None,
                bearer_token: str = "", user: str = "", password: str = "") -> Outcome:
    """POST a transaction Bundle to the server's base URL: 2xx delivered, 4xx refused (with the
    OperationOutcome's text), 5xx, 429 or no answer a retry."""
    headers = {"Content-Type": "application/fhir+json; charset=utf-8",
               "Accept": "application/fhir+json", **_auth_header(bearer_token, user, password)}
    req = urllib.request.Request(base_url.rstrip("/"), data=bundle.encode("utf-8"),
                                 headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=tls) as rsp:
            return Outcome(DELIVERED, f"HTTP {rsp.status}", f"HTTP {rsp.status}", rsp.status)
    except urllib.error.HTTPError as e:
        text = f"HTTP {e.code}: {outcome_text(e.read())}"
        state = REFUSED if 400 <= e.code < 500 and e.code not in (408, 429) else RETRY
        return Outcome(state, f"HTTP {e.code}", text, e.code)
    except (urllib.error.URLError, OSError) as e:
        return Outcome(RETRY, "no answer", f"no answer from the FHIR server ({e})")
