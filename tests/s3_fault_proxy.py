"""A fault-injecting HTTP proxy in front of an S3 server (moto), on loopback, for tests.

    proxy = FaultProxy("http://127.0.0.1:5000", seed=1, slowdown=0.05, error=0.05,
                       reset=0.03, reset_after=0.02, slow=0.05)
    proxy.start()        # proxy.url: the endpoint to give the job
    ...
    proxy.down = True    # every request now fails (503), as a store that stays down
    proxy.stop(); proxy.counts   # {"forwarded": ..., "slowdown": ..., ...}

Each request draws one fate from a seeded generator: ``slowdown`` (503 SlowDown, as S3 throttles),
``error`` (500 InternalError), ``reset`` (the connection is reset before the request reaches
the store), ``reset_after`` (the store applies the request, then the connection is reset before
the answer: the client cannot know it landed, and must retry safely), ``slow`` (the answer comes
``slow_s`` late), else forwarded untouched. Requests are forwarded byte for byte (the signature
covers the Host header, which moto does not check), bodies by Content-Length or chunked.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FATES = ("slowdown", "error", "reset", "reset_after", "slow")
_ERROR_XML = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
              "<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>")


class FaultProxy:
    def __init__(self, upstream: str, *, seed: int = 0, slow_s: float = 0.5, **rates: float):
        unknown = set(rates) - set(FATES)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FATES}")
        if sum(rates.values()) > 1:
            raise ValueError("fault rates add up to more than 1")
        up = urlsplit(upstream)
        self.upstream = (up.hostname, up.port)
        self.rates = rates
        self.slow_s = slow_s
        self.down = False
        self.counts = dict.fromkeys(("forwarded", *FATES, "down"), 0)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True,
                         name="s3-fault-proxy").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def injected(self) -> int:
        return sum(self.counts[f] for f in (*FATES, "down"))

    def _fate(self) -> str:
        with self._lock:
            if self.down:
                self.counts["down"] += 1
                return "down"
            draw = self._rng.random()
            for fate in FATES:
                draw -= self.rates.get(fate, 0.0)
                if draw < 0:
                    self.counts[fate] += 1
                    return fate
            self.counts["forwarded"] += 1
            return "forwarded"


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # a client killed mid-request (the campaign SIGKILLs drivers) is no news


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self):
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reset(self) -> None:
        # SO_LINGER 0: close() sends a TCP RST, as a dropped connection does.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _error(self, status: int, code: str, message: str) -> None:
        body = _ERROR_XML.format(code=code, message=message).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        body = self._body()
        fate = self.owner._fate()
        if fate in ("slowdown", "down"):
            return self._error(503, "SlowDown", "Please reduce your request rate.")
        if fate == "error":
            return self._error(500, "InternalError", "We encountered an internal error.")
        if fate == "reset":
            return self._reset()
        if fate == "slow":
            time.sleep(self.owner.slow_s)
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("transfer-encoding", "connection")}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
        finally:
            conn.close()
        if fate == "reset_after":
            return self._reset()
        self.send_response(answer.status, answer.reason)
        head = self.command == "HEAD"  # a HEAD answer's length is the object's, with no body
        for k, v in answer.getheaders():
            if k.lower() not in ("transfer-encoding", "connection") and (
                    head or k.lower() != "content-length"):
                self.send_header(k, v)
        if not head:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
