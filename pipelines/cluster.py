"""Which Ray a job runs on: the cluster named by RAY_ADDRESS, or a local one this process starts.

Owns `ensure_ray`, the one way jobs and pipelines connect (`flextok tokenize`, the training jobs).
What Ray prints is set up here too, before Ray starts (`pipelines.ray_logging`).

A local Ray is started with its GCS on a port chosen here and with RAY_ADDRESS naming it in the
environment its processes inherit. Without that, Ray Train 2.60's placement-group cleaner, which
asks the State API whether its controller is alive, resolves "the" cluster as the newest one on the
machine: with two local Rays (a training beside a `flextok tokenize`, or beside tests) it may ask the
other one, hear "no such actor", and remove the healthy run's placement group, killing its workers.
"""

from __future__ import annotations

import os
import socket

from pipelines.ray_logging import quiet_ray

ADDRESS_ENV = "RAY_ADDRESS"
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"  # read by Ray when it starts a head node


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _with_defaults(defaults: dict, given: dict) -> dict:
    """`ray.init` kwargs: the caller's, over `defaults`; a given runtime_env keeps the defaults' keys
    it does not set."""
    merged = {**defaults, **given}
    if "runtime_env" in defaults and "runtime_env" in given:
        merged["runtime_env"] = {**defaults["runtime_env"], **(given["runtime_env"] or {})}
    return merged


def ensure_ray(**init_kwargs) -> bool:
    """Join RAY_ADDRESS's cluster (`ray job submit`) or the one this process already runs, else
    start a local Ray. True if it connected now."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get(ADDRESS_ENV):
        check_ray_address()
        ray.init(**_with_defaults(quiet_ray(local=False), init_kwargs))
    else:
        start_local_ray(**init_kwargs)
    return True


def check_ray_address(timeout_s: float = 5.0) -> None:
    """RAY_ADDRESS must answer: `ray.init` on a dead address retries for minutes and does not heed
    Ctrl-C, so a TCP connect to it (a few seconds at most) goes first. "auto" and "local" pass."""
    import socket
    from urllib.parse import urlsplit

    address = os.environ.get(ADDRESS_ENV, "").strip()
    if not address or address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    if parts.hostname is None or parts.port is None:
        return  # not host:port: leave it to Ray
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"the Ray cluster at {ADDRESS_ENV}={address} does not answer "
                              f"({e.strerror or type(e).__name__}); start it, or unset {ADDRESS_ENV} to run locally") from None


def start_local_ray(**init_kwargs):
    """A new single-node Ray (with the dashboard, which serves the State API) whose processes all
    know its address; returns `ray.init`'s context."""
    import ray

    init_kwargs = _with_defaults(quiet_ray(local=True), init_kwargs)
    port = _free_port()
    pinned = {GCS_PORT_ENV: str(port), ADDRESS_ENV: f"{ray.util.get_node_ip_address()}:{port}"}
    saved = {k: os.environ.get(k) for k in pinned}
    os.environ.update(pinned)  # inherited by the GCS, the raylet and every worker they start
    try:
        return ray.init(address="local", **{"include_dashboard": True, **init_kwargs})
    finally:  # this process connected explicitly; leave its environment as it was
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
