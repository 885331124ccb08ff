"""FlexTok at scale: a 1D coarse-to-fine image tokenizer and autoregressive generators, pure PyTorch.

Shape glossary used across the package:
    B batch, C channels, H W height width, P patch size, N patches, K registers (max tokens),
    D model width, d FSQ dims, V vocabulary, T sequence length, k kept tokens (prefix length),
    L condition-prefix length of a generator.
Names: `tokens` are integer ids, `codes` FSQ outputs in [-1, 1], `latents` continuous VAE/pixel values.
"""

# The names below load on first use (PEP 562): `flextok.runs`, `flextok.config` and the other light
# modules import without torch, which every Ray worker of a tokenize job (read, decode and write tasks)
# would otherwise load for ~2 s of CPU each, only to name a file.
_EXPORTS = {
    "CheckpointError": "flextok.checkpoint",
    "TOKENIZER_PRESETS": "flextok.config", "FlexTokConfig": "flextok.config", "FSQConfig": "flextok.config",
    "VAEConfig": "flextok.config",
    "APGConfig": "flextok.flow",
    "Generator": "flextok.generator",
    "GPT": "flextok.gpt", "GPT_PRESETS": "flextok.gpt", "GPTConfig": "flextok.gpt",
    "DEFAULT_TEXT_ENCODER": "flextok.text_encoder", "TextEncoder": "flextok.text_encoder",
    "load_text_encoder": "flextok.text_encoder",
    "FlexTok": "flextok.tokenizer", "load_tokenizer": "flextok.tokenizer",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flextok' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "DEFAULT_TEXT_ENCODER",
    "GPT",
    "GPT_PRESETS",
    "TOKENIZER_PRESETS",
    "APGConfig",
    "CheckpointError",
    "FSQConfig",
    "FlexTok",
    "FlexTokConfig",
    "GPTConfig",
    "Generator",
    "TextEncoder",
    "VAEConfig",
    "load_text_encoder",
    "load_tokenizer",
]
