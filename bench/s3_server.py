"""A moto S3 server in a process of its own on loopback, for the benchmarks (object storage is
another machine's work in a real run, so its CPU is kept apart from the benchmarked process's).
Imported by the bench scripts beside it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(timeout: float = 30.0) -> Iterator[tuple[subprocess.Popen, str]]:
    """Yields (the server's process, its endpoint URL) once it accepts connections."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"the moto S3 server did not start on port {port}") from None
                time.sleep(0.1)
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)
