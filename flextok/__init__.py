"""FlexTok at scale: a 1D coarse-to-fine image tokenizer and autoregressive generators, pure PyTorch.

Shape glossary used across the package:
    B batch, C channels, H W height width, P patch size, N patches, K registers (max tokens),
    D model width, d FSQ dims, V vocabulary, T sequence length, k kept tokens (prefix length).
Names: `tokens` are integer ids, `codes` FSQ outputs in [-1, 1], `latents` continuous VAE/pixel values.
"""

from flextok.checkpoint import CheckpointError
from flextok.config import TOKENIZER_PRESETS, FlexTokConfig, FSQConfig, VAEConfig
from flextok.flow import APGConfig
from flextok.tokenizer import FlexTok, load_tokenizer

__all__ = [
    "TOKENIZER_PRESETS",
    "APGConfig",
    "CheckpointError",
    "FSQConfig",
    "FlexTok",
    "FlexTokConfig",
    "VAEConfig",
    "load_tokenizer",
]
