"""The output's lease: one writer at a time on local disks and S3; a dead holder's lease is taken over."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from pipelines.lease import LEASE_FILE, Lease, LeaseHeldError
from pipelines.writer import OutputStore


def _exited_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant(store: OutputStore, **record) -> None:
    store.write_bytes(LEASE_FILE, json.dumps({"token": "other", "ttl_s": 90.0, **record}).encode())


def test_second_holder_is_refused_until_the_first_releases(tmp_path):
    store = OutputStore(str(tmp_path))
    first = Lease(store)
    first.acquire()
    with pytest.raises(LeaseHeldError, match="another flextok tokenize .* is writing to this output"):
        Lease(store).acquire()
    first.release()
    assert not store.exists(LEASE_FILE)
    with Lease(store):
        assert json.loads(store.read_bytes(LEASE_FILE))["pid"] > 0


def test_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    store = OutputStore(str(tmp_path))
    lease = Lease(store)
    _plant(store, host=lease.host, pid=_exited_pid(), heartbeat=lease.now())  # fresh, but its process is gone
    with lease:
        assert json.loads(store.read_bytes(LEASE_FILE))["token"] == lease.token


def test_lease_of_another_host_expires_without_heartbeat(tmp_path):
    store = OutputStore(str(tmp_path))
    clock = [1000.0]
    _plant(store, host="elsewhere", pid=1, heartbeat=1000.0)
    clock[0] = 1000.0 + 60  # within its ttl: held
    with pytest.raises(LeaseHeldError, match="pid 1 on elsewhere, last seen 60 s ago"):
        Lease(store, now=lambda: clock[0]).acquire()
    clock[0] = 1000.0 + 91  # past its ttl: gone
    lease = Lease(store, now=lambda: clock[0])
    lease.acquire()
    assert json.loads(store.read_bytes(LEASE_FILE))["token"] == lease.token
    lease.release()


def test_heartbeat_keeps_the_lease_fresh(tmp_path):
    store = OutputStore(str(tmp_path))
    with Lease(store, ttl_s=0.2) as lease:
        first = json.loads(store.read_bytes(LEASE_FILE))["heartbeat"]
        time.sleep(0.3)
        assert json.loads(store.read_bytes(LEASE_FILE))["heartbeat"] > first and not lease.lost


@pytest.mark.slow
def test_lease_on_s3_is_exclusive(s3_server):
    bucket = s3_server.make_bucket("lease")
    store = OutputStore(f"s3://{bucket}/dst", s3_server.storage_options)
    with Lease(store):
        assert not store.create(LEASE_FILE, b"{}")  # the conditional PUT refuses an existing object
        with pytest.raises(LeaseHeldError):
            Lease(OutputStore(f"s3://{bucket}/dst", s3_server.storage_options)).acquire()
    assert not store.exists(LEASE_FILE)


class _ConditionalStore:
    """An in-memory object store speaking the conditional-write dialects of gcsfs (pipe_file(mode="create")
    sends ifGenerationMatch=0; GCS answers an existing object with 412) and adlfs (pipe_file(overwrite=False)
    is If-None-Match: *; Azure answers 409 ResourceExistsError). gcsfs and adlfs are not installed here, and
    no GCS or Azure emulator runs offline: this checks that create() asks for the condition and reads the
    refusal, never that it checks first (exists() fails the test)."""

    from fsspec.spec import AbstractFileSystem as _Base

    class GCS(_Base):
        protocol = ("gs", "gcs")
        cachable = False

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.objects: dict[str, bytes] = {}

        def exists(self, path, **kwargs):
            raise AssertionError("check-then-write: create() must ask the store for a conditional write")

        def pipe_file(self, path, value, mode="overwrite", **kwargs):
            if mode == "create" and path in self.objects:
                error = OSError("conditionNotMet")
                error.code = 412  # gcsfs.retry.HttpError carries the HTTP status as .code
                raise error
            self.objects[path] = value

    class Azure(GCS):
        protocol = ("abfs", "az")

        def pipe_file(self, path, value, overwrite=True, **kwargs):
            if not overwrite and path in self.objects:
                raise type("ResourceExistsError", (Exception,), {})("BlobAlreadyExists")
            self.objects[path] = value


@pytest.mark.parametrize("url, fs_class", [("gs://bucket/dst", _ConditionalStore.GCS),
                                           ("abfs://container/dst", _ConditionalStore.Azure)])
def test_lease_on_gcs_and_azure_is_a_conditional_write(url, fs_class, monkeypatch):
    from fsspec.registry import _registry  # the mutable registry behind fsspec.registry

    for name in fs_class.protocol:
        monkeypatch.setitem(_registry, name, fs_class)
    store = OutputStore(url)
    assert store.create("_state/lease.json", b"first") is True
    assert store.create("_state/lease.json", b"second") is False
    assert store.fs.objects[store.path("_state/lease.json")] == b"first"
