"""A local *autoscaling* Ray cluster for tests: Ray's fake multi-node node provider on this machine.

A head that schedules only (`CPU: 0`, like cluster.yaml's) and one worker type with fake `GPU: 1`
resources and `min_workers: 0`: Ray's autoscaler (the head's monitor process) starts worker nodes
(each a real raylet on this machine) when tasks or actors ask for GPUs, and removes them when idle.
Config and pitfalls: ../shared/notes/local-autoscaling-cluster.md.

Never `ray stop` (it kills every Ray of the machine) nor `AutoscalingCluster` (it runs `ray stop
--force`): `stop()` ends exactly the processes this cluster started. `ray start --head --block` runs
in a new process session; the head's daemons inherit that session, the worker nodes' processes are
its descendants, and every one of them names this cluster's temp dir or GCS port on its command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
HEAD_TYPE = "ray.head.default"  # the fake provider's name for the head's node type
GPU_TYPE = "gpu_worker"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaling_config(gcs_address: str, *, worker_cpus: int, max_workers: int) -> dict:
    """Autoscaler v1 config for Ray's fake multi-node provider (a CPU-less head, GPU workers from zero);
    `fake_node_provider` gives each fake node its own runtime-env folder."""
    empty = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
             "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
             "rsync_filter")
    return {
        "cluster_name": "flextok_fake_gpu", "max_workers": max_workers, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.25,
        "provider": {"type": "external", "module": "fake_node_provider.IsolatedFakeMultiNodeProvider",
                     "gcs_address": gcs_address, "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {
            HEAD_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            GPU_TYPE: {"resources": {"CPU": worker_cpus, "GPU": 1, "object_store_memory": 200 * 1024**2},
                       "node_config": {}, "min_workers": 0, "max_workers": max_workers},
        },
        "head_node_type": HEAD_TYPE, "auth": {}, "docker": {}, "file_mounts": {},
        "file_mounts_sync_continuously": False, **{k: [] for k in empty},
    }


@dataclass
class FakeAutoscalingCluster:
    root: Path  # the cluster's own temp dir (short: Ray's socket paths must fit 107 characters)
    ip: str
    gcs_port: int
    dashboard_port: int
    env: dict[str, str]  # the environment of the head, every node and every CLI call
    head: subprocess.Popen | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.root / "ray-start.log"

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @classmethod
    def start(cls, env: dict[str, str], *, worker_cpus: int = 2, max_workers: int = 2,
              timeout_s: float = 180.0) -> FakeAutoscalingCluster:
        import ray

        root = Path(tempfile.mkdtemp(prefix="rayfk-", dir="/tmp"))
        ip = ray.util.get_node_ip_address()
        cluster = cls(root=root, ip=ip, gcs_port=free_port(), dashboard_port=free_port(), env=dict(env))
        config = root / "autoscaling.yaml"
        config.write_text(yaml.safe_dump(autoscaling_config(cluster.address, worker_cpus=worker_cpus,
                                                            max_workers=max_workers)))
        # The autoscaler (the head's monitor process) imports the provider from beside this file.
        cluster.env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                           PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")])))
        cmd = [_ray(), "start", "--head", "--block", f"--temp-dir={root}", f"--port={cluster.gcs_port}",
               f"--dashboard-port={cluster.dashboard_port}", "--dashboard-host=127.0.0.1",
               f"--ray-client-server-port={free_port()}", "--min-worker-port=0", "--max-worker-port=0",
               "--dashboard-agent-listen-port=0", "--dashboard-agent-grpc-port=0", "--runtime-env-agent-port=0",
               "--metrics-export-port=0", "--num-cpus=0", "--num-gpus=0", "--object-store-memory=200000000",
               f"--autoscaling-config={config}", "--disable-usage-stats"]
        with open(cluster.log, "wb") as out:
            cluster.head = subprocess.Popen(cmd, env=cluster.env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        try:
            cluster._wait_ready(timeout_s)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.head.poll() is not None:
                raise RuntimeError(f"ray start exited {self.head.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=5) as r:
                    if r.status == 200 and self.nodes():
                        return
            except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
                pass
            time.sleep(1)
        raise TimeoutError(f"the fake cluster's head did not come up in {timeout_s:.0f} s: "
                           f"{self.log.read_text()[-2000:]}")

    def ray(self, *args: str, timeout_s: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """The `ray` CLI against this cluster (never another one on the machine)."""
        return subprocess.run([_ray(), *args], env=self.env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout_s)

    def state(self, kind: str, *filters: str) -> list[dict]:
        """`ray list <kind> --detail` through the State API (dead nodes and finished tasks included)."""
        args = ["list", kind, "--detail", "--format", "json", "--limit", "10000", "--address", self.address]
        for f in filters:
            args += ["--filter", f]
        proc = self.ray(*args)
        if proc.returncode != 0:
            raise RuntimeError(f"ray list {kind}: {proc.stderr[-1000:]}")
        return json.loads(proc.stdout)

    def nodes(self) -> list[dict]:
        return self.state("nodes")

    def stop(self) -> None:
        """End exactly the processes of this cluster: Ray's own teardown of the head first, then any
        process in the head's process session, or naming this cluster's temp dir or GCS port, and
        all their descendants (SIGTERM, then SIGKILL after 5 s); remove the temp dir."""
        if self.head is not None and self.head.poll() is None:
            self.head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.head.wait(timeout=15)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self._own_processes()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while pids and time.monotonic() < deadline:
                pids = [p for p in pids if _alive(p)]
                time.sleep(0.2)
        if self.head is not None and self.head.poll() is None:
            self.head.kill()
            self.head.wait(timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)

    def _own_processes(self) -> list[int]:
        marks = (str(self.root), self.address, f"--gcs_server_port={self.gcs_port}")
        session = self.head.pid if self.head is not None else None  # start_new_session: sid == its pid
        table = _process_table()
        roots = {pid for pid, (ppid, sid, cmd) in table.items()
                 if sid == session or any(m in cmd for m in marks)}
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        found, todo = set(), list(roots)
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo += children.get(pid, [])
        found -= {os.getpid(), *_ancestors(table)}
        return sorted(found)


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, command line) of this user's processes, from /proc."""
    table = {}
    uid = os.getuid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), int(fields[3]), cmd)
    return table


def _ancestors(table: dict[int, tuple[int, int, str]]) -> set[int]:
    out, pid = set(), os.getppid()
    while pid > 1 and pid not in out:
        out.add(pid)
        pid = table.get(pid, (0, 0, ""))[0]
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
