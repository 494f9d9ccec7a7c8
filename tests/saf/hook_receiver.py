"""A real HTTP endpoint for FHIR Subscription rest-hooks (http.server on a thread), for the
subscription tests: it records every POST and answers a chosen status; it can go down
(the port refuses connections) and come back up on the same port."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    """One POST the receiver got."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        """The SubscriptionStatus type (handshake, event-notification, ...)."""
        params = self.body["entry"][0]["resource"]["parameter"]
        return str(next(p["valueCode"] for p in params if p["name"] == "type"))


@dataclass
class Receiver:
    """Start with `start()`, stop with `stop()`; `url` stays the same across restarts."""

    status: int = 200
    received: list[Received] = field(default_factory=list)
    port: int = 0
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                owner.received.append(Received(self.path, dict(self.headers.items()), body))
                self.send_response(owner.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def of_kind(self, kind: str) -> list[Received]:
        return [r for r in self.received if r.kind == kind]
