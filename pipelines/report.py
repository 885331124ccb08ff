"""What a tokenization run reports: `_manifest.json` and the one-screen summary.

Owns: the manifest's content (inputs, counts, errors by kind, token-length histogram, model id and
sha256, config, package versions, timings; storage options only redacted, URLs without credentials)
and the summary text printed at the end. Does not own: running the pipeline (`pipelines.tokenize`).
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from typing import Any

from pipelines import writer
from pipelines.model import TokenizerInfo
from pipelines.schema import SCHEMA_VERSION
from pipelines.sources import InputPlan
from pipelines.storage import redact_options, redact_url

VERSIONED_PACKAGES = ("flextok-at-scale", "torch", "ray", "pyarrow", "pillow", "numpy", "fsspec", "s3fs")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def build_manifest(
    cfg: Any, plan: InputPlan, info: TokenizerInfo, max_tokens: int, markers: list[dict],
    run: dict[str, Any], opts_in: Mapping[str, Any],
) -> dict[str, Any]:
    """What `_manifest.json` holds. Storage options appear only redacted; URLs without credentials."""
    totals = writer.aggregate(markers)
    assert totals["counts"]["rows"] + totals["counts"]["errors"] == totals["counts"]["inputs"], "rows + errors != inputs"
    return {
        "schema_version": SCHEMA_VERSION,
        "status": "complete",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": {**plan.describe(), "storage_options": redact_options(opts_in)},
        "output": redact_url(cfg.output),
        "model": info.describe(),
        "settings": {
            "max_tokens": max_tokens, "batch_size": cfg.batch_size, "files_per_shard": cfg.files_per_shard,
            "max_pixels": cfg.max_pixels, "min_side": cfg.min_side, "precision": cfg.precision,
            "compile": cfg.compile, "gpu_decode": cfg.gpu_decode,
        },
        **totals,
        "run": run,
        "versions": _versions(),
        "shards": [
            {k: m[k] for k in ("shard", "source", "inputs", "rows", "errors", "files")} for m in markers
        ],
    }


def _bar(count: int, largest: int, width: int = 30) -> str:
    return "#" * max(1, round(width * count / largest)) if largest else ""


def summary_text(manifest: dict[str, Any], *, nothing_to_do: bool = False) -> str:
    """The one-screen summary printed at the end of a run."""
    c, run, model = manifest["counts"], manifest["run"], manifest["model"]
    lines = [f"flextok tokenize -> {manifest['output']}"]
    if nothing_to_do:
        lines.append("  nothing to do: every input shard is already tokenized (summary of the existing dataset)")
    weights = " (RANDOM weights)" if model["random_weights"] else ""
    lines.append(f"  model    {model['checkpoint_id']}{weights}, K={model['num_registers']}, stored "
                 f"{manifest['settings']['max_tokens']}, codebook {model['codebook_size']}")
    lines.append(f"  inputs   {c['inputs']:,} samples in {manifest['inputs']['num_shards']} shards "
                 f"({manifest['inputs']['format']}) from {manifest['inputs']['url']}")
    skipped = manifest["inputs"].get("skipped_files") or {}
    if skipped:
        lines.append(f"  skipped  {sum(skipped.values()):,} files not read: "
                     + "; ".join(f"{n:,} {reason}" for reason, n in skipped.items()))
    lines.append(f"  rows     {c['rows']:,}")
    lines.append(f"  errors   {c['errors']:,}")
    for kind, n in c["errors_by_kind"].items():
        lines.append(f"           {n:>8,}  {kind}")
    if c.get("io_retries"):
        lines.append(f"  retried  {c['io_retries']:,} storage faults (transient; no sample lost, none counted as an error)")
    lines.append(
        f"  this run {run['samples_processed']:,} samples from {run['shards_processed']} shards "
        f"({run['shards_already_done']} already done) in {run['pipeline_time_s']:.1f} s: "
        f"{run['images_per_s']:.1f} images/s; wall {run['wall_time_s']:.1f} s"
    )
    lines.append(f"           {run['actors']} actor(s) x {run['cpus_per_actor']:g} CPU / {run['gpus_per_actor']:g} GPU, "
                 f"batch {run['batch_size']}, cluster {run['cluster']['nodes']} node(s) {run['cluster']['cpus']:g} CPU "
                 f"{run['cluster']['gpus']:g} GPU")
    hist = manifest["token_length_histogram"]
    lines.append("  tokens per row (histogram):")
    largest = max(hist.values(), default=0)
    for k, n in hist.items():
        lines.append(f"           {k:>5}  {n:>8,}  {_bar(n, largest)}")
    lines.append(f"  manifest {manifest['output'].rstrip('/')}/{writer.MANIFEST}")
    return "\n".join(lines)
