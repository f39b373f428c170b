"""A webhook receiver on 127.0.0.1 for tests: records requests, answers as scripted."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    at: float  # monotonic

    @property
    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value


class Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, statuses: Sequence[int] = (204,), delay: float = 0.0):
        """``statuses`` are answered in turn (the last one repeats); ``delay`` before each."""
        super().__init__(("127.0.0.1", 0), _Handler)
        self.statuses = list(statuses)
        self.delay = delay
        self.received: list[Received] = []
        self.released = threading.Event()  # set at teardown: delays end early

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook/T000/B000/secret-token"

    def events(self) -> list[str]:
        return [request.json["event"] for request in self.received]

    def next_status(self) -> int:
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.received.append(Received(dict(self.headers), body, time.monotonic()))
        self.server.released.wait(self.server.delay)
        status = self.server.next_status()
        self.send_response(status)
        if status == 429:
            self.send_header("Retry-After", "0.2")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def receiving(statuses: Sequence[int] = (204,), delay: float = 0.0) -> Iterator[Receiver]:
    receiver = Receiver(statuses, delay)
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.released.set()
        receiver.shutdown()
        receiver.server_close()


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Poll ``condition`` until true or ``timeout``; generous bounds, short steps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()
