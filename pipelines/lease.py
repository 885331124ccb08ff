"""One writer per token dataset: a lease object `DST/_state/lease.json` that works on local disks
and object stores.

Owns: taking the lease (an atomic create, `OutputStore.create`: a hard link locally, a conditional
PUT `If-None-Match: *` on S3 and Azure, `ifGenerationMatch=0` on GCS; other fsspec stores such as
HTTP or FTP offer no conditional write, so there it is check-then-write and two writers starting in
the same instant could both take it), keeping it fresh from a heartbeat thread, taking over a lease whose holder is gone (a process of
this host that no longer exists, or a heartbeat older than `ttl_s` from anywhere), and giving it back.
A second `flextok tokenize` on the same output is refused with one line naming the holder. Does not
own: what the holder writes (`pipelines.writer`).

Limit: taking over an expired lease is a remove then an atomic create; two processes taking over the
same expired lease at the same instant can both remove, but only one create succeeds.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

log = logging.getLogger(__name__)

LEASE_FILE = "_state/lease.json"
DEFAULT_TTL_S = 90.0


class LeaseHeldError(RuntimeError):
    """Another live run holds the output's lease."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class Lease:
    """`with Lease(store): ...` holds DST's lease for the block (see the module docstring)."""

    def __init__(self, store: Any, *, ttl_s: float = DEFAULT_TTL_S, now=time.time):
        self.store, self.ttl_s, self.now = store, ttl_s, now
        self.token = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _record(self) -> bytes:
        return json.dumps({"token": self.token, "host": self.host, "pid": self.pid,
                           "heartbeat": self.now(), "ttl_s": self.ttl_s}).encode()

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.read_bytes(LEASE_FILE))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign file: treat as expired
            return {"heartbeat": 0.0, "ttl_s": 0.0}

    def _expired(self, holder: dict[str, Any]) -> bool:
        pid = holder.get("pid")
        if holder.get("host") == self.host and isinstance(pid, int) and not _process_alive(pid):
            return True  # its process died (kill -9, a crash): no need to wait for the expiry
        age = self.now() - float(holder.get("heartbeat", 0.0))
        return age > float(holder.get("ttl_s", self.ttl_s))

    def acquire(self) -> None:
        for _ in range(3):
            if self.store.create(LEASE_FILE, self._record()):
                self._start_heartbeat()
                return
            holder = self._holder()
            if holder is None:
                continue  # released meanwhile
            if not self._expired(holder):
                age = self.now() - float(holder.get("heartbeat", 0.0))
                raise LeaseHeldError(
                    f"another flextok tokenize (pid {holder.get('pid')} on {holder.get('host')}, last seen "
                    f"{age:.0f} s ago) is writing to this output; wait for it to finish, or if it is dead "
                    f"re-run after {float(holder.get('ttl_s', self.ttl_s)):.0f} s without a heartbeat"
                )
            log.warning("taking over the lease of a run that is gone (pid %s on %s)", holder.get("pid"),
                        holder.get("host"))
            self.store.rm(LEASE_FILE)
        raise LeaseHeldError("could not take this output's lease: other runs keep taking it; retry")

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                holder = self._holder()
                if holder is None or holder.get("token") != self.token:
                    self.lost = True
                    log.error("this run lost the output's lease to another run")
                    return
                try:
                    self.store.write_bytes(LEASE_FILE, self._record())
                except OSError as e:  # a storage hiccup: the next beat tries again
                    log.warning("lease heartbeat failed: %s", e)

        self._thread = threading.Thread(target=beat, name="flextok-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._holder()
        if holder is not None and holder.get("token") == self.token:
            self.store.rm(LEASE_FILE)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
