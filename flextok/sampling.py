"""Images from a trained generator: find its checkpoint, find and verify its tokenizer, sample in batches.

Owns: resolving a run folder to its generator checkpoint; resolving the tokenizer a generator was
trained on from the provenance in its checkpoint (id + sha256) and refusing a tokenizer whose sha256
differs; turning a list of conditions into token sequences and decoded images in batches.
Does not own: the generator or the tokenizer themselves, nor loading a tokenizer preset (callers do
that, e.g. `pipelines.model.load_model`, so that presets are seeded the way the tokenize job seeds
them).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from flextok.checkpoint import (
    WEIGHTS_NAMES,
    CheckpointError,
    file_sha256,
    read_metadata,
)
from flextok.precision import precision_context
from flextok.runs import checkpoint_step, newest_local_model, speaks_tokens_of

log = logging.getLogger(__name__)

GENERATOR_KIND = "Generator"
TOKENIZER_KIND = "FlexTok"
PRESET_PREFIX = "preset:"


def _kind(path: Path) -> str | None:
    try:
        return read_metadata(path).get("kind")
    except CheckpointError:
        return None


def _step(path: Path) -> int:
    """The training step of a checkpoint: its `step` metadata, else a `checkpoint_<step>` folder name."""
    try:
        return int(read_metadata(path)["step"])
    except (CheckpointError, KeyError, ValueError):
        pass
    step = checkpoint_step(path.parent.name)
    return step if step is not None else -1


def find_generator_checkpoint(path: str | os.PathLike) -> Path:
    """A generator checkpoint file, or a run folder -> its checkpoint.

    In a folder: `model.safetensors` at its top (the final model of a finished run) when it holds a
    generator; otherwise the newest generator checkpoint anywhere below (a run still training:
    `RUN/checkpoint_<step>/model.safetensors`), by step (metadata `step` or the folder name), then
    by modification time.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"generator checkpoint not found: {p}")
    for name in WEIGHTS_NAMES:
        if (p / name).is_file() and _kind(p / name) == GENERATOR_KIND:
            return p / name
    newest = newest_local_model(p)  # a generator run still training
    if newest is not None and _kind(newest) == GENERATOR_KIND:
        return newest
    found = [c for c in p.rglob("*.safetensors") if c.is_file() and _kind(c) == GENERATOR_KIND]
    if not found:
        raise CheckpointError(f"no generator checkpoint (a *.safetensors of kind {GENERATOR_KIND!r}) under {p}")
    return max(found, key=lambda c: (_step(c), c.stat().st_mtime))


def _short(sha: str | None) -> str:
    return (sha or "none")[:12]


def resolve_tokenizer(
    generator: Any,
    generator_path: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    *,
    check_sha256: bool = True,
) -> str:
    """Which tokenizer decodes `generator`'s tokens: a checkpoint path, or a preset name.

    With `tokenizer` None: a tokenizer checkpoint in the generator's folder with the recorded sha256
    (or keeping its tokens), preferring the recorded file name (shipped models travel together); else
    the recorded `tokenizer_id` as recorded or relative to the generator's folder.
    A tokenizer that neither has the recorded sha256 nor records it among the checkpoints whose
    tokens it keeps (a decoder-only fine-tune) is refused, unless `check_sha256` is False.
    """
    recorded_id, recorded_sha = generator.tokenizer_id, generator.tokenizer_sha256
    gen_dir = Path(generator_path).expanduser().parent
    if tokenizer is not None:
        spec = str(tokenizer)
        if not Path(spec).expanduser().exists():
            from flextok.config import TOKENIZER_PRESETS

            if spec in TOKENIZER_PRESETS:
                return spec
            raise CheckpointError(f"tokenizer checkpoint not found: {spec}")
        path = Path(spec).expanduser()
    else:
        if not recorded_id:
            raise ValueError(f"generator {generator_path} records no tokenizer; pass --tokenizer CKPT")
        if recorded_id.startswith(PRESET_PREFIX):
            log.warning("generator was trained on tokens of preset %r (random weights)", recorded_id)
            return recorded_id[len(PRESET_PREFIX):]
        recorded = Path(recorded_id).expanduser()
        path = None
        if recorded_sha:  # first a tokenizer beside the generator that speaks its tokens: shipped
            # models travel together, and the recorded path may name another copy (or none) here
            beside = [gen_dir / recorded.name] + sorted(gen_dir.glob("*.safetensors"))
            path = next((c for c in beside if c.is_file() and _kind(c) == TOKENIZER_KIND
                         and speaks_tokens_of(c, recorded_sha)), None)
        if path is None:
            path = next((c for c in (recorded, gen_dir / recorded, gen_dir / recorded.name) if c.exists()), None)
        if path is None:
            raise CheckpointError(
                f"generator {generator_path} was trained on tokenizer {recorded_id} (sha256 "
                f"{_short(recorded_sha)}…), which is not found; pass --tokenizer CKPT"
            )
    if check_sha256 and recorded_sha:
        if not speaks_tokens_of(path, recorded_sha):
            actual = file_sha256(path)
            raise CheckpointError(
                f"tokenizer {path} has sha256 {_short(actual)}… but generator {generator_path} was trained "
                f"on {recorded_id} with sha256 {_short(recorded_sha)}…; pass the tokenizer it was trained on"
            )
    elif check_sha256:
        log.warning("generator %s records no tokenizer sha256; cannot verify %s", generator_path, path)
    return str(path)


@torch.no_grad()
def decode_tokens(
    tokenizer: Any,
    tokens: torch.Tensor | Sequence[torch.Tensor],
    *,
    batch_size: int = 64,
    steps: int = 25,
    guidance_scale: float = 1.0,
    apg: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Token prefixes (N, k) or a list of 1D tensors -> images (N, 3, H, W) in [-1, 1] on CPU."""
    rows = list(tokens) if not isinstance(tokens, torch.Tensor) else tokens
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        images = tokenizer.detokenize(chunk, steps=steps, guidance_scale=guidance_scale, apg=apg, generator=generator)
        out.append(images.clamp(-1, 1).cpu())  # images to write: clamped here, not inside the model
    return torch.cat(out)


@torch.no_grad()
def sample(
    generator: Any,
    tokenizer: Any,
    conditions: Sequence[int] | Sequence[str],
    *,
    num_tokens: int,
    batch_size: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float | None = None,
    decoder_steps: int = 25,
    decoder_guidance: float = 1.0,
    decoder_apg: bool = False,
    rng: torch.Generator | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample per condition (class ids or captions), in batches.

    Returns tokens (N, num_tokens) int64 (after an EOS generator's end: PAD_ID, -1) and images
    (N, 3, H, W) fp32 in [-1, 1], both on CPU.
    `on_batch(done, total)` reports progress; `precision` is one of `flextok.precision.PRECISIONS`
    (the generator and the decoder run under it; sampling, FSQ and the Euler state stay fp32).
    """
    conditions = list(conditions)
    if not conditions:
        raise ValueError("no conditions to sample from")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    all_tokens, all_images = [], []
    for start in range(0, len(conditions), batch_size):
        chunk = conditions[start : start + batch_size]
        with precision_context(precision, tokenizer.device):
            tokens = generator.generate(
                chunk, num_tokens=num_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                cfg_scale=cfg_scale, generator=rng,
            )
            images = tokenizer.detokenize(tokens, steps=decoder_steps, guidance_scale=decoder_guidance,
                                          apg=decoder_apg, generator=rng)
        all_tokens.append(tokens.cpu())
        all_images.append(images.float().clamp(-1, 1).cpu())  # images to write: clamped here, not inside the model
        if on_batch is not None:
            on_batch(start + len(chunk), len(conditions))
    return torch.cat(all_tokens), torch.cat(all_images)
