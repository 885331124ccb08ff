"""Checkpoint I/O: safetensors files with the model config as JSON metadata.

Owns: writing and reading `*.safetensors` (weights + string metadata), resolving a folder to its
weights file, refusing pickle-based files, and file fingerprints (sha256). This is the only place
in `flextok/` that touches the filesystem. Nothing here ever unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "flextok-at-scale"
FORMAT_VERSION = "1"
WEIGHTS_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# A tokenizer whose token-defining weights (everything but the flow decoder) are exactly those of
# other checkpoints lists their file sha256s here (JSON). A decoder-only fine-tune keeps its parents'
# tokens, so token datasets and generators made with a parent stay valid with it.
SAME_TOKENS_KEY = "same_tokens_as_sha256"
DECODER_PREFIX = "decoder."


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message is one line a user can act on."""


def resolve_weights_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a folder holding `model.safetensors` (also an official release)."""
    p = Path(path)
    if p.is_dir():
        for name in WEIGHTS_NAMES:
            if (p / name).is_file():
                return p / name
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise CheckpointError(f"no model.safetensors in folder {p}")
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def _check_safetensors(path: Path) -> None:
    """Refuse anything that is not a safetensors file, pickles and torch zip archives above all."""
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors first: its little-endian header length may itself start with 0x80, pickle's PROTO byte
    if len(head) == 9 and struct.unpack("<Q", head[:8])[0] <= _MAX_HEADER_BYTES and head[8:9] == b"{":
        return
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise CheckpointError(
            f"{path} is a pickle-based (torch.save) file; only safetensors checkpoints are loaded, "
            "nothing is ever unpickled"
        )
    if len(head) < 9:
        raise CheckpointError(f"{path} is not a safetensors file (too short)")
    raise CheckpointError(f"{path} is not a safetensors file")


def save_checkpoint(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    *,
    kind: str,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write weights and metadata atomically (temporary name, then rename)."""
    p = Path(path)
    if p.suffix != ".safetensors":
        p.mkdir(parents=True, exist_ok=True)
        p = p / WEIGHTS_NAMES[0]
    p.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": json.dumps(config, sort_keys=True),
    }
    for key, value in (extra or {}).items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    tmp = p.with_name(p.name + f".tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, _new_file_mode())  # safetensors creates 0600 files; others on the cluster must read them
    os.replace(tmp, p)
    return p


def _new_file_mode() -> int:
    """What `open()` gives a new file: 0666 less the process umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    p = resolve_weights_path(path)
    _check_safetensors(p)
    try:
        with safe_open(str(p), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{p}: unreadable safetensors file ({e})") from None


def read_shapes(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as an empty `meta` tensor of its shape: the header alone is
    read, so a multi-GB release answers "what architecture is this" in milliseconds."""
    p = resolve_weights_path(path)
    _check_safetensors(p)
    try:
        with safe_open(str(p), framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise CheckpointError(f"{p}: unreadable safetensors file ({e})") from None


def load_checkpoint(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32,
    keep: Callable[[str], bool] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read (state_dict, metadata) from a safetensors file or a folder holding one.

    Floating-point tensors are cast to `dtype` (fp32 by default: weights shipped in fp16 or bf16
    compute in full precision; autocast lowers it where wanted); None keeps the stored dtypes.
    `keep(name)` selects the tensors to read: the others are never read from the file.
    """
    p = resolve_weights_path(path)
    _check_safetensors(p)
    try:
        with safe_open(str(p), framework="pt", device=str(device)) as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}  # noqa: SIM118
    except Exception as e:
        raise CheckpointError(f"{p}: unreadable safetensors file ({e})") from None
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state, metadata


def export_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, *, dtype: torch.dtype, extra: dict[str, Any] | None = None
) -> Path:
    """Copy a checkpoint with its floating-point weights cast to `dtype` (fp16 to ship small models).

    Every metadata entry is kept (config, kind, provenance); `extra` adds or replaces entries, and the
    source's sha256 is recorded as `exported_from_sha256`.
    """
    state, metadata = load_checkpoint(src, dtype=None)
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(f"{src}: not a {FORMAT} checkpoint (no config in its metadata)")
    kept = {k: v for k, v in metadata.items() if k not in ("format", "format_version", "kind", "config")}
    if SAME_TOKENS_KEY in kept and not all(
        torch.equal(v.to(dtype).to(v.dtype), v) for k, v in state.items()
        if v.is_floating_point() and not k.startswith(DECODER_PREFIX)
    ):
        del kept[SAME_TOKENS_KEY]  # the cast moves token-defining weights: tokens may change
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    kept.update(extra or {})
    kept["exported_from_sha256"] = file_sha256(src)
    return save_checkpoint(dst, state, kind=metadata.get("kind", ""), config=json.loads(metadata["config"]), extra=kept)


def check_finite(state: dict[str, torch.Tensor], path: Any = "") -> None:
    """Refuse weights holding NaN or infinity (a diverged or corrupted run) before they make NaN tokens."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensors hold NaN or infinite weights (first: {bad[0]}); "
                              "the checkpoint is corrupt or its training diverged")


def config_from_metadata(metadata: dict[str, str], *, kind: str, path: Any = "") -> dict[str, Any]:
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (no config in its metadata)")
    if metadata.get("kind") != kind:
        raise CheckpointError(f"{path}: holds a {metadata.get('kind')!r}, expected a {kind!r}")
    try:
        config = json.loads(metadata["config"])
    except ValueError:
        raise CheckpointError(f"{path}: its config metadata is not JSON") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: its config metadata is not a JSON object")
    return config


def same_tokens_shas(path: str | os.PathLike) -> set[str]:
    """The sha256s of every checkpoint whose tokens `path` reproduces: its own and its recorded parents'."""
    listed = read_metadata(path).get(SAME_TOKENS_KEY)
    try:
        parents = set(json.loads(listed)) if listed else set()
    except ValueError:
        raise CheckpointError(f"{path}: metadata {SAME_TOKENS_KEY} is not a JSON list") from None
    return {file_sha256(path)} | parents


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(resolve_weights_path(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
