"""Which tokenizer a pipeline runs, loaded the same way on the driver and in every actor.

Owns: resolving `--model` (a checkpoint of ours, an official FlexTok release, a preset name with
random weights, or by default the bundled tiny tokenizer under `flextok/assets/`), seeding random
presets so that every actor holds identical weights, and the facts about the model that go into
file metadata and the manifest. Uses only the public API of `flextok`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PRESET = "tiny"
PRESET_SEED = 0


def bundled_tokenizers() -> list[Path]:
    """Tokenizer checkpoints shipped under `flextok/assets/` (sorted), by their metadata kind."""
    import flextok
    from flextok.checkpoint import CheckpointError, read_metadata

    root = Path(flextok.__file__).parent / "assets"
    found = []
    for path in sorted(root.rglob("*.safetensors")) if root.is_dir() else []:
        try:
            if read_metadata(path).get("kind") == "FlexTok":
                found.append(path)
        except CheckpointError:
            continue
    return found


def is_preset(spec: str) -> bool:
    from flextok import TOKENIZER_PRESETS

    return spec in TOKENIZER_PRESETS and not Path(spec).exists()


def resolve_model_spec(spec: str | None, *, keep_relative: bool = False) -> str:
    """`--model` -> what `load_model` takes. None = the bundled tiny tokenizer, else preset 'tiny'.

    A relative checkpoint path becomes absolute (actors may run in another folder) unless
    `keep_relative` (under `ray job submit --working-dir`, every worker runs in the working dir).
    """
    if spec is None:
        bundled = bundled_tokenizers()
        if bundled:
            log.info("model: bundled tokenizer %s", bundled[0])
            return str(bundled[0])
        log.warning(
            "model: no bundled tokenizer under flextok/assets/; using preset %r with RANDOM weights "
            "(tokens carry no information; pass --model CKPT for real ones)", DEFAULT_PRESET,
        )
        return DEFAULT_PRESET
    if is_preset(spec):
        log.warning("model: preset %r with RANDOM weights (seed %d)", spec, PRESET_SEED)
        return spec
    if is_remote(spec):  # stays a URL: each node fetches it into its own cache
        return spec
    path = Path(spec).expanduser()
    if not path.exists():
        from flextok import TOKENIZER_PRESETS

        raise FileNotFoundError(
            f"--model {spec}: no such checkpoint, and not a preset ({', '.join(sorted(TOKENIZER_PRESETS))})"
        )
    return str(path) if keep_relative else str(path.resolve())


def is_remote(spec: str) -> bool:
    """A model at an fsspec URL other than the local filesystem (s3://, gs://, https://, ...)."""
    import fsspec

    return "://" in spec and fsspec.utils.get_protocol(spec) not in ("file", "local")


def local_checkpoint(spec: str, storage_options: Mapping[str, Any] | None = None, sha256: str | None = None) -> str:
    """A remote checkpoint -> its copy in this node's cache (downloaded once per node, checked against
    `sha256` when given); local paths and presets unchanged."""
    if not is_remote(spec):
        return spec
    from pipelines.storage import fetch_checkpoint

    return fetch_checkpoint(spec, storage_options, sha256=sha256)


def load_model(spec: str, device: str | None = None, *, storage_options: Mapping[str, Any] | None = None,
               sha256: str | None = None, encoder_only: bool = False):
    """A `FlexTok` in eval mode. Presets are built under a fixed seed: identical in every actor.
    `encoder_only` reads and builds only what tokenizing uses (`FlexTok.from_pretrained`)."""
    import torch

    from flextok import load_tokenizer

    verified = sha256 if is_remote(spec) else None  # the fetched copy was checked against it
    spec = local_checkpoint(spec, storage_options, sha256)
    if is_preset(spec):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(PRESET_SEED)
            model = load_tokenizer(spec, device=device, encoder_only=encoder_only)
    else:
        model = load_tokenizer(spec, device=device, encoder_only=encoder_only, sha256=verified)
    return model.eval()


@dataclass(frozen=True)
class TokenizerInfo:
    """What the output records about the tokenizer."""

    spec: str
    checkpoint_id: str
    checkpoint_sha256: str | None
    image_size: int
    num_registers: int
    codebook_size: int
    fsq_levels: tuple[int, ...]
    random_weights: bool
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: Any, spec: str) -> TokenizerInfo:
        c = model.config
        return cls(
            spec=spec,
            checkpoint_id=str(model.checkpoint_id),
            checkpoint_sha256=model.checkpoint_sha256,
            image_size=int(c.image_size),
            num_registers=int(c.num_registers),
            codebook_size=int(c.codebook_size),
            fsq_levels=tuple(int(x) for x in c.fsq.levels),
            random_weights=is_preset(spec),
            config=c.to_dict(),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "checkpoint_id": self.checkpoint_id,
            "checkpoint_sha256": self.checkpoint_sha256,
            "random_weights": self.random_weights,
            "image_size": self.image_size,
            "num_registers": self.num_registers,
            "codebook_size": self.codebook_size,
            "fsq_levels": list(self.fsq_levels),
            "config": self.config,
        }


def model_identity(spec: str, storage_options: Mapping[str, Any] | None = None) -> tuple[str, str | None]:
    """(checkpoint id, sha256) of a resolved spec without loading it, as `FlexTok` would report them.
    A remote checkpoint is named by its URL (without credentials); its sha256 is of the bytes fetched."""
    if is_preset(spec):
        return f"preset:{spec}", None
    from flextok.checkpoint import file_sha256

    if is_remote(spec):
        from pipelines.storage import redact_url

        return redact_url(spec), file_sha256(local_checkpoint(spec, storage_options))
    return spec, file_sha256(spec)


def inspect_model(spec: str, storage_options: Mapping[str, Any] | None = None) -> TokenizerInfo:
    """Load once on the driver (CPU) to learn sizes and ids; fails early with a one-line error."""
    model = load_model(spec, device="cpu", storage_options=storage_options)
    info = TokenizerInfo.from_model(model, spec)
    if is_remote(spec):  # the URL, not this node's cache path, names the model
        info = replace(info, checkpoint_id=model_identity(spec, storage_options)[0])
    del model
    return info


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != "" else "cpu"
