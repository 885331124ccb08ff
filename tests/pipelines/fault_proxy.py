"""A real TCP proxy on 127.0.0.1 that injects network faults between a client and an S3 server.

Every client connection gets its own upstream connection; bytes are forwarded both ways by threads.
The proxy reads the HTTP request line of each request on its way up, so faults can target requests:

- `every_nth=N`: every Nth request (counted over all of them) gets its connection reset (RST) before
  any byte of the response.
- `rules`: `FaultRule(pattern, times, mode)`, checked in order: the first `times` requests whose request
  line matches `pattern` get `mode` (`times=None`: all of them, an outage): `"cut"` (the response cut
  `cut_after` bytes in, then reset), `"reset"` (reset before any response byte), `"stall"` (nothing for
  `stall_s` seconds, then reset: a client's read timeout), `"delay"` (the whole response, `stall_s`
  seconds late: a slow link) or `"pass"` (no fault: lets some through).

`counts` records how many faults of each mode were injected, so a test knows they happened.
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass


@dataclass
class FaultRule:
    pattern: str  # regex searched in the request line, e.g. r"GET /bucket/in/shard-000001\.tar"
    times: int | None = None  # faulted requests; None = every one (a persistent outage)
    mode: str = "cut"  # cut | reset | stall | delay | pass
    hits: int = 0


def _reset(sock: socket.socket) -> None:
    """Drop the connection abruptly, as a failing middlebox or server would: SO_LINGER 0 makes the
    close an RST. The shutdown first wakes the other pump thread blocked in recv() on this socket,
    which would otherwise keep it open (a close from another thread does not interrupt a recv)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], *, every_nth: int | None = None, cut_after: int = 2000,
                 rules: list[FaultRule] | None = None, stall_s: float = 5.0):
        self.upstream = upstream
        self.every_nth, self.cut_after, self.stall_s = every_nth, cut_after, stall_s
        self.rules = list(rules or [])
        self.counts: Counter = Counter()
        self.requests = 0
        self._lock = threading.Lock()
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(128)
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop.set()
        self._server.close()

    def set_rules(self, rules: list[FaultRule]) -> None:
        with self._lock:
            self.rules = list(rules)

    # internals -------------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _fault_for(self, request_line: str) -> str | None:
        with self._lock:
            self.requests += 1
            for rule in self.rules:
                if re.search(rule.pattern, request_line) and (rule.times is None or rule.hits < rule.times):
                    rule.hits += 1
                    return None if rule.mode == "pass" else rule.mode
            if self.every_nth and self.requests % self.every_nth == 0:
                return "reset"
        return None

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            _reset(client)
            return
        # One fault decision per request, read by the downstream pump when the response starts.
        pending: list[str | None] = []
        cond = threading.Condition()
        broken = threading.Event()

        def up() -> None:  # client -> server: spot request lines
            try:
                while not broken.is_set():
                    data = client.recv(65536)
                    if not data:
                        break
                    m = re.match(rb"([A-Z]+ \S+) HTTP/1\.[01]\r\n", data)
                    if m:
                        with cond:
                            pending.append(self._fault_for(m.group(1).decode("latin-1")))
                            cond.notify_all()
                    upstream.sendall(data)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    upstream.shutdown(socket.SHUT_WR)

        threading.Thread(target=up, daemon=True).start()
        fault, sent = None, 0  # the fault of the response in flight, its bytes forwarded so far
        faulted = False
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                if data.startswith(b"HTTP/1."):  # a new response
                    with cond:
                        cond.wait_for(lambda: pending, timeout=5)
                        fault, sent = (pending.pop(0) if pending else None), 0
                    if fault == "delay":
                        self.counts[fault] += 1
                        time.sleep(self.stall_s)
                        fault = None
                    if fault in ("reset", "stall"):
                        self.counts[fault] += 1
                        if fault == "stall":
                            time.sleep(self.stall_s)
                        faulted = True
                        break
                if fault == "cut" and sent + len(data) >= self.cut_after:
                    self.counts["cut"] += 1
                    client.sendall(data[: max(0, self.cut_after - sent)])
                    faulted = True
                    break
                client.sendall(data)
                sent += len(data)
            if not faulted:  # the server closed: so do we
                client.close()
                upstream.close()
                return
        except OSError:
            pass
        broken.set()
        _reset(client)
        _reset(upstream)
