"""Tokenizer load: the full model vs the encoder-only load the tokenize actors use, per preset.

Writes a random-weight checkpoint of the preset (fp32 safetensors), then loads it in a fresh process
per trial, the file first dropped from the page cache (`posix_fadvise(DONTNEED)` on that file only), so
every trial reads from disk as an actor's first load on a node does. Reports per mode: load time
(`FlexTok.from_pretrained`, imports excluded), tensor bytes read from the file (from its header), the
process's bytes read from storage (`/proc/self/io` read_bytes: the tensors, plus a sha256 pass over
the whole file unless the caller already knows the digest, as an actor does once its node's cache has
checked the file) and peak RSS.

    python -m benchmarks.bench_load --preset d12_d12 --trials 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("full", "encoder-only", "encoder-only, sha256 known")


def _io_read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes:")).split()[1])


def _peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that across exec, so a
    child would report its parent's peak (the parent holds the whole model it just wrote)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024


def _child(path: str, mode: str, sha256: str) -> None:
    """One load in this fresh process; prints a JSON line."""
    from flextok import FlexTok

    before = _io_read_bytes()
    start = time.perf_counter()
    model = FlexTok.from_pretrained(path, encoder_only=mode != "full", sha256=sha256 if "known" in mode else None)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"load_s": seconds, "disk_read_bytes": _io_read_bytes() - before, "params": params,
                      "max_rss_bytes": _peak_rss_bytes()}))


def _tensor_bytes(path: Path, encoder_only: bool) -> int:
    """Bytes of the tensors a load reads, from the safetensors header (offsets of each tensor)."""
    from flextok.tokenizer import is_encoder_key

    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
               if k != "__metadata__" and (not encoder_only or is_encoder_key(k)))


def _drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="d12_d12")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the checkpoint is written (default: a temp folder)")
    p.add_argument("--child", nargs=3, metavar=("PATH", "MODE", "SHA256"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(*args.child)
        return

    import torch

    from flextok import FlexTok
    from flextok.checkpoint import file_sha256

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / f"{args.preset}.safetensors"
        torch.manual_seed(0)
        FlexTok.from_preset(args.preset).save_pretrained(path)  # the model is freed before the loads
        size, sha256 = path.stat().st_size, file_sha256(path)
        print(f"{args.preset}: checkpoint {size / 1e9:.2f} GB (fp32), {args.trials} cold loads per mode", flush=True)
        print("| mode | load s (median) | tensor GB read | disk GB read (median) | peak RSS GB | parameters |")
        print("|---|---|---|---|---|---|", flush=True)
        for mode in MODES:
            runs = []
            for _ in range(args.trials):
                _drop_from_page_cache(path)
                out = subprocess.run([sys.executable, "-m", "benchmarks.bench_load", "--child", str(path), mode, sha256],
                                     capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"| {mode} | {statistics.median(r['load_s'] for r in runs):.2f} "
                  f"| {_tensor_bytes(path, mode != 'full') / 1e9:.2f} "
                  f"| {statistics.median(r['disk_read_bytes'] for r in runs) / 1e9:.2f} "
                  f"| {max(r['max_rss_bytes'] for r in runs) / 1e9:.2f} | {runs[0]['params'] / 1e6:.1f} M |", flush=True)


if __name__ == "__main__":
    main()
