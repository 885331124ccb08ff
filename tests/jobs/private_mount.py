"""A real full disk and a real read-only folder for job outputs, without touching the machine's mounts:
a private mount namespace (`unshare --user --map-root-user --mount`, unprivileged where the kernel
allows user namespaces) with a size-limited tmpfs and a read-only bind mount.

As a module: `namespace_problem()` says whether this machine can do it (and whether it should).
As a script (run inside the namespace by the test): the jobs, on a local Ray started inside the
namespace so that its workers see the same mounts; what happened goes to RESULT/result.json.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

UNSHARE = ["unshare", "--user", "--map-root-user", "--mount"]


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def userns_expected() -> bool:
    """Whether the kernel says this user may create a user namespace (so a failure is a real problem)."""
    if _read("/proc/sys/user/max_user_namespaces") in (None, "0"):
        return False
    if os.geteuid() != 0 and _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return False
    return not (os.geteuid() != 0 and _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1")


def namespace_problem(scratch: Path) -> str | None:
    """None when a private namespace can mount a tmpfs here; else why not."""
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run([*UNSHARE, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(scratch)],
                              capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return "no `unshare` command (util-linux)"
    return None if proc.returncode == 0 else f"`unshare` failed: {proc.stderr.strip() or proc.returncode}"


SCRIPT = """set -eu
mount -t tmpfs -o size={size} tmpfs "{full}"
mount --bind "{ro}" "{ro}"
mount -o remount,bind,ro "{ro}"
exec "{python}" "{me}" "$@"
"""


def run_in_namespace(python: str, full: Path, ro: Path, size: str, args: list[str], env: dict, timeout: float):
    script = SCRIPT.format(size=size, full=full, ro=ro, python=python, me=Path(__file__).resolve())
    return subprocess.run([*UNSHARE, "sh", "-c", script, "sh", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _main(argv: list[str]) -> None:
    """Inside the namespace: FULL (a tmpfs nearly filled), RO (read-only), INPUT, RESULT."""
    import contextlib
    import io
    import json
    import logging
    import shutil
    import time

    full, ro, data, result = (Path(a) for a in argv)
    from jobs import tokenize, train_tokenizer
    from pipelines.cluster import start_local_ray

    def run(job, args: list[str]) -> dict:
        buf = io.StringIO()
        start = time.monotonic()
        with contextlib.redirect_stderr(buf):
            code = job.main(args)
        logging.getLogger().handlers.clear()  # the next job's logging goes to its own buffer
        return {"code": code, "err": buf.getvalue(), "seconds": time.monotonic() - start}

    tiny = ["--encoder-dim", "32", "--decoder-dim", "32", "--encoder-depth", "1", "--decoder-depth", "1",
            "--head-dim", "16", "--threads", "1", "--max-steps", "2", "--batch-size", "8", "--quiet"]
    out: dict = {
        "tokenize_ro": run(tokenize, ["--input", str(data), "--output", str(ro / "tokens"), "--model", "tiny", "--quiet"]),
        "train_ro": run(train_tokenizer, ["--data", str(data), "--output", str(ro / "run"), *tiny]),
    }
    start_local_ray(num_cpus=2)
    filler = full / "filler"
    free = os.statvfs(full).f_bavail * os.statvfs(full).f_frsize
    filler.write_bytes(b"\0" * (free - 24 * 1024))  # 24 KiB left: the job's first few files fit
    tokens = ["--input", str(data), "--output", str(full / "tokens"), "--model", "tiny", "--batch-size", "8", "--quiet"]
    out["tokenize_full"] = run(tokenize, tokens)
    out["tokenize_full"]["manifest"] = (full / "tokens" / "_manifest.json").exists()
    filler.unlink()  # space freed: the same command again
    out["tokenize_rerun"] = run(tokenize, tokens)
    shutil.copytree(full / "tokens", result / "tokens")
    (result / "result.json").write_text(json.dumps(out))


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
