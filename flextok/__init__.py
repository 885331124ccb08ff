"""FlexTok at scale: a 1D coarse-to-fine image tokenizer and autoregressive generators, pure PyTorch.

Shape glossary used across the package:
    B batch, C channels, H W height width, P patch size, N patches, K registers (max tokens),
    D model width, d FSQ dims, V vocabulary, T sequence length, k kept tokens (prefix length),
    L condition-prefix length of a generator.
Names: `tokens` are integer ids, `codes` FSQ outputs in [-1, 1], `latents` continuous VAE/pixel values.
"""

from flextok.checkpoint import CheckpointError
from flextok.config import TOKENIZER_PRESETS, FlexTokConfig, FSQConfig, VAEConfig
from flextok.flow import APGConfig
from flextok.generator import Generator
from flextok.gpt import GPT, GPT_PRESETS, GPTConfig
from flextok.text_encoder import DEFAULT_TEXT_ENCODER, TextEncoder, load_text_encoder
from flextok.tokenizer import FlexTok, load_tokenizer

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
