"""Independent peers for the HL7 and FHIR destinations.

:class:`MllpRis` is a RIS stand-in built on the ``hl7`` package's asyncio MLLP
server (triage builds and parses with ``hl7apy``, so the two sides share no
code). :class:`FhirServer` is an HTTP endpoint that validates every Bundle and
every resource in it with ``fhir.resources`` and answers 201, 400 or 503.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import hl7
import hl7.mllp
from fhir.resources.R4B.bundle import Bundle

from tests.conftest import free_port, wait_for


def ack(message: hl7.Message, code: str, text: str = "") -> str:
    """Return the ER7 text of an ACK of ``message`` with MSA-1 ``code`` and MSA-3 ``text``."""
    control = str(message.segment("MSH")[10])
    return (f"MSH|^~\\&|RIS|HOSP|TRIAGE||20260101000000||ACK^R01^ACK|A{control[:19]}|P|2.5.1\r"
            f"MSA|{code}|{control}|{text}")


class MllpRis:
    """An MLLP listener on 127.0.0.1 that records every message and answers with ``answer``.

    ``answer(message)`` returns an ACK code ("AA", "AE", "AR") or "hold": read the message
    and never answer (as a RIS that hangs). It can be swapped while the peer runs.
    """

    def __init__(self, port: int | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.port = port or free_port()
        self.tls = tls
        self.answer: Callable[[hl7.Message], str] = lambda m: "AA"
        self.received: list[hl7.Message] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MllpRis:
        """Start listening (in a thread with its own event loop) and return self."""
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(
                hl7.mllp.start_hl7_server(self._client, "127.0.0.1", self.port, ssl=self.tls))
            ready.set()
            loop.run_forever()
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10), "the MLLP listener did not start"
        return self

    async def _client(self, reader: Any, writer: Any) -> None:
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                with self._lock:
                    self.received.append(message)
                code = self.answer(message)
                if code == "hold":
                    await asyncio.sleep(3600)
                    continue
                writer.writemessage(hl7.parse(ack(message, code, f"test says {code}")))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._loop is not None:
            for task in asyncio.all_tasks(self._loop):
                self._loop.call_soon_threadsafe(task.cancel)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def messages(self, event: str = "ORU^R01") -> list[hl7.Message]:
        """Return the messages received so far of one type (MSH-9 ``event``, e.g. ORU^R01)."""
        with self._lock:
            return [m for m in self.received if str(m.segment("MSH")[9]).startswith(event)]

    def wait_for_count(self, n: int, timeout: float = 120, event: str = "ORU^R01") -> None:
        """Wait until at least ``n`` messages of ``event`` have arrived."""
        wait_for(lambda: len(self.messages(event)) >= n, timeout=timeout)


class FhirServer:
    """An HTTP FHIR endpoint that validates with fhir.resources and answers 201, 400 or 503.

    Set ``unavailable`` to answer 503 to everything. Bundles that validate are kept in
    ``bundles``; one that does not is answered 400 with an OperationOutcome.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.unavailable = False
        self.refuse = False  # answer 400 even to a valid Bundle (a business-rule refusal)
        self.bundles: list[Bundle] = []
        self.posts = 0
        self.auth: set[str] = set()  # the Authorization headers seen
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}/fhir"

    def start(self) -> FhirServer:
        """Start serving in a thread and return self."""
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 - the stdlib's spelling
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                peer.auth.add(self.headers.get("Authorization", ""))
                code, doc = peer.answer(self.path, self.headers.get("Content-Type", ""), body)
                raw = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def answer(self, path: str, ctype: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """Return (HTTP status, JSON answer) for one POST."""
        with self._lock:
            self.posts += 1
        if self.unavailable:
            return 503, _outcome("transient", "server busy")
        if path.rstrip("/") != "/fhir" or not ctype.startswith("application/fhir+json"):
            return 400, _outcome("invalid", f"POST the Bundle to the base URL, not {path}")
        try:
            bundle = Bundle.model_validate_json(body)
            assert bundle.type == "transaction", "not a transaction"
            for entry in bundle.entry or []:
                type(entry.resource).model_validate(entry.resource.model_dump())
        except Exception as e:
            return 400, _outcome("invalid", f"invalid Bundle: {str(e)[:200]}")
        if self.refuse:
            return 400, _outcome("business-rule", "refused by the test")
        with self._lock:
            self.bundles.append(bundle)
        return 201, {"resourceType": "Bundle", "type": "transaction-response",
                     "entry": [{"response": {"status": "201 Created"}}
                               for _ in bundle.entry or []]}

    def reports(self) -> list[Any]:
        """Return every DiagnosticReport received so far."""
        with self._lock:
            return [e.resource for b in self.bundles for e in b.entry or []
                    if e.resource.get_resource_type() == "DiagnosticReport"]

    def stop(self) -> None:
        """Stop serving."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


def _outcome(code: str, text: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": text}]}
