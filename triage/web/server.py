"""Uvicorn serving the web app in a thread of the daemon, on a socket bound at start."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from starlette.applications import Starlette

from triage.config import WebConfig
from triage.core.errors import TriageError

log = logging.getLogger(__name__)


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
                                timeout_graceful_shutdown=5, server_header=False,
                                ssl_certfile=self.web.tls_cert or None,
                                ssl_keyfile=self.web.tls_key or None)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._server.started:
            raise TriageError(f"the web server on {self.web.host}:{self.port} did not start")
        log.info("worklist at %s://%s:%d/", "https" if self.web.tls_cert else "http",
                 self.web.host, self.port)

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
