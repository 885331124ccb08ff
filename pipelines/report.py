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


EXAMPLES_PICTURE = "_adaptive_examples.png"


def adaptive_section(totals: Mapping[str, Any], length_target: Mapping[str, Any], num_rows: int) -> dict[str, Any]:
    """The manifest's adaptive-length summary from `writer.aggregate_adaptive`'s sums: the chosen-length
    histogram, mean tokens per image, and quality vs length over the corpus (mean latent MSE of a
    one-step decode at every candidate length, and the share of images whose chosen length is at most
    that length)."""
    lengths = length_target["candidate_lengths"]
    chosen = {int(k): v for k, v in totals["chosen_length_histogram"].items()}
    rows = max(num_rows, 1)
    quality = []
    for k, mse_sum in zip(lengths, totals["candidate_mse_sum"]):
        quality.append({"num_tokens": k, "mean_mse": round(mse_sum / rows, 6),
                        "share_chosen_at_most": round(sum(v for n, v in chosen.items() if n <= k) / rows, 4)})
    return {
        "target": {k: v for k, v in length_target.items() if k != "candidate_lengths"},
        "mean_tokens": round(totals["tokens_sum"] / rows, 3),
        "max_tokens": lengths[-1] if lengths else None,
        "chosen_length_histogram": totals["chosen_length_histogram"],
        "mean_chosen_mse": round(totals["chosen_mse_sum"] / rows, 6),
        "mean_full_mse": round(totals["full_mse_sum"] / rows, 6),
        "rows_missing_target": totals["rows_missing_target"],
        "quality_vs_length": quality,
    }


def build_manifest(
    cfg: Any, plan: InputPlan, info: TokenizerInfo, max_tokens: int, markers: list[dict],
    run: dict[str, Any], opts_in: Mapping[str, Any], length_target: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What `_manifest.json` holds. Storage options appear only redacted; URLs without credentials.
    `length_target`: an adaptive run's target (`LengthTarget.describe()` + keep_all_tokens +
    candidate_lengths)."""
    totals = writer.aggregate(markers)
    adaptive_totals = totals.pop("adaptive_totals", None)
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
        **({"adaptive": adaptive_section(adaptive_totals, length_target, totals["counts"]["rows"])}
           if length_target is not None and adaptive_totals is not None else {}),
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
    if len(hist) > 12:  # adaptive prefixes: every length may occur; the chosen-length histogram follows
        hist = {}
    lines.append("  tokens per row (histogram):")
    largest = max(hist.values(), default=0)
    for k, n in hist.items():
        lines.append(f"           {k:>5}  {n:>8,}  {_bar(n, largest)}")
    adaptive = manifest.get("adaptive")
    if adaptive:
        target = adaptive["target"]
        goal = (f"MSE within {100 * target['max_relative_error']:g}% of all {adaptive['max_tokens']} tokens'"
                if target.get("max_relative_error") is not None else f"MSE <= {target['max_error']:g}")
        stored = "all K stored, chosen length recorded" if target.get("keep_all_tokens") else "prefix stored"
        lines.append(f"  adaptive {goal} ({stored}): {adaptive['mean_tokens']:.2f} tokens per image on average, "
                     f"mean MSE {adaptive['mean_chosen_mse']:.4f} (all tokens {adaptive['mean_full_mse']:.4f}), "
                     f"{adaptive['rows_missing_target']:,} rows missed the target")
        if target.get("keep_all_tokens") or len(manifest["token_length_histogram"]) > 12:
            chosen = adaptive["chosen_length_histogram"]
            top = max(chosen.values(), default=0)
            lines.append("  chosen length (histogram):")
            for k, n in sorted(chosen.items(), key=lambda item: int(item[0])):
                lines.append(f"           {k:>5}  {n:>8,}  {_bar(n, top)}")
    lines.append(f"  manifest {manifest['output'].rstrip('/')}/{writer.MANIFEST}")
    return "\n".join(lines)


def adaptive_examples(model: Any, tokens: Any, chosen: Any, *, num_examples: int = 10, steps: int = 25) -> Any:
    """The picture of an adaptive run: images spread over the chosen lengths (shortest to longest),
    each decoded from all K tokens (top row) and from its chosen prefix (bottom row), as a PIL image.

    Args:
        tokens: rows of token ids (each the prefix stored, or all K); chosen: their chosen lengths.
    """
    import numpy as np
    import torch

    from flextok.viz import image_grid

    order = np.argsort(np.asarray(chosen), kind="stable")
    picks = order[np.linspace(0, len(order) - 1, min(num_examples, len(order))).round().astype(int)]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731  (the same noise for both rows)
    rows = [torch.as_tensor(np.asarray(tokens[i], np.int64)) for i in picks]
    prefixes = [r[: int(chosen[i])] for r, i in zip(rows, picks)]
    K = model.config.num_registers
    have_all = all(len(r) == K for r in rows)
    with torch.inference_mode():
        short = model.detokenize(prefixes, steps=steps, generator=g())
        full = model.detokenize(rows, steps=steps, generator=g()) if have_all else None
    grid = short[None] if full is None else torch.stack([full, short])  # (R, N, 3, H, W)
    labels = [f"k={int(chosen[i])}" for i in picks]
    row_labels = ([f"all {K} tokens"] if full is not None else []) + ["chosen prefix (k above)"]
    return image_grid(grid, row_labels=row_labels, col_labels=labels)
