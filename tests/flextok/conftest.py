import pytest
import torch

from flextok import FlexTok

SMALL = dict(encoder_dim=64, decoder_dim=64, head_dim=32, encoder_depth=2, decoder_depth=2)


def trained_like(model: FlexTok, seed: int = 0) -> FlexTok:
    """Zero-initialised heads and adaLN layers make a fresh model ignore its inputs (constant codes,
    registers gated off, zero velocity), which would let causality and guidance checks pass
    trivially. Give those layers random values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.encoder.to_codes.weight.normal_(0, 0.5, generator=g)
        for block in model.decoder.blocks:
            block.adaLN_modulation[1].weight.normal_(0, 0.05, generator=g)
        model.decoder.final.proj.weight.normal_(0, 0.05, generator=g)
        model.decoder.final.adaLN_modulation[1].weight.normal_(0, 0.05, generator=g)
    return model


@pytest.fixture(scope="module")
def small_model() -> FlexTok:
    torch.manual_seed(0)
    return trained_like(FlexTok.from_preset("tiny", **SMALL).eval())
