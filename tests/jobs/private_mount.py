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


def run(job, args: list[str]) -> dict:
    """`job.main(args)` with its stderr captured: exit status, stderr, seconds."""
    import contextlib
    import io
    import logging
    import time

    buf = io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stderr(buf):
        code = job.main(args)
    logging.getLogger().handlers.clear()  # the next job's logging goes to its own buffer
    return {"code": code, "err": buf.getvalue(), "seconds": time.monotonic() - start}


def _main(argv: list[str]) -> None:
    """Inside the namespace: FULL (a tmpfs nearly filled), RO (read-only), INPUT, RESULT."""
    import json
    import shutil

    full, ro, data, result = (Path(a) for a in argv)
    from jobs import tokenize, train_tokenizer
    from pipelines.cluster import start_local_ray

    tiny = ["--encoder-dim", "32", "--decoder-dim", "32", "--encoder-depth", "1", "--decoder-depth", "1",
            "--head-dim", "16", "--threads", "1", "--max-steps", "2", "--batch-size", "8", "--quiet"]
    start_local_ray(num_cpus=2)  # one Ray for every job (train-tokenizer would start and stop its own)
    out: dict = {
        "tokenize_ro": run(tokenize, ["--input", str(data), "--output", str(ro / "tokens"), "--model", "tiny", "--quiet"]),
        "train_ro": run(train_tokenizer, ["--data", str(data), "--output", str(ro / "run"), *tiny]),
    }
    filler = full / "filler"
    free = os.statvfs(full).f_bavail * os.statvfs(full).f_frsize
    filler.write_bytes(b"\0" * (free - 24 * 1024))  # 24 KiB left: the job's first few files fit
    tokens = ["--input", str(data), "--output", str(full / "tokens"), "--model", "tiny", "--batch-size", "8", "--quiet"]
    out["tokenize_full"] = run(tokenize, tokens)
    out["tokenize_full"]["manifest"] = (full / "tokens" / "_manifest.json").exists()
    filler.unlink()  # space freed: the same command again
    out["tokenize_rerun"] = run(tokenize, tokens)
    shutil.copytree(full / "tokens", result / "tokens")
    out.update(_train_on_full_disk(full))
    (result / "result.json").write_text(json.dumps(out))


def _train_on_full_disk(full: Path) -> dict:
    """train-generator on FULL's tokens into FULL/run, a checkpoint every 4 steps; the disk fills up
    once the first one is complete (a thread writes a filler then), and the same command runs again
    once the filler is removed."""
    import json
    import threading

    from jobs import train_generator

    run_dir, filler = full / "run", full / "filler"
    marker = run_dir / "checkpoint_00000004" / "_COMPLETE"
    done = threading.Event()

    def fill() -> None:
        while not marker.exists() and not done.wait(0.01):
            pass
        with open(filler, "wb") as f:  # until the disk takes no more
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass

    args = ["--tokens", str(full / "tokens"), "--output", str(run_dir), "--cond", "class", "--depth", "1", "--dim", "32",
            "--num-heads", "2", "--threads", "1", "--warmup-steps", "1", "--batch-size", "4", "--max-steps", "24",
            "--checkpoint-every", "4", "--grid-every", "0"]
    filling = threading.Thread(target=fill, daemon=True)
    filling.start()
    out = {"train_full": run(train_generator, [*args, "--quiet"])}
    done.set()
    filling.join()
    out["train_full"].update(
        filled=filler.exists(), model=(run_dir / "model.safetensors").exists(),
        summary=(run_dir / "train_summary.json").exists(),
        attempts=len(list((run_dir / "tensorboard").iterdir())),  # each attempt of rank 0 opens an event file
        complete=sorted(p.parent.name for p in run_dir.glob("checkpoint_*/_COMPLETE")))
    filler.unlink(missing_ok=True)  # space freed: the same command again
    out["train_rerun"] = run(train_generator, args)
    if (run_dir / "train_summary.json").exists():
        out["train_rerun"]["summary"] = json.loads((run_dir / "train_summary.json").read_text())
    return out


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
