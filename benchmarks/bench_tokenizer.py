"""Tokenizer throughput on this machine: encoder and decoder images/s and achieved GFLOP/s, beside a
plain fp32 matmul peak measured in the same run, plus the cost of CFG in detokenize.

    .venv/bin/python -m benchmarks.bench_tokenizer [--threads N] [--repeats N]

Prints a Markdown table (paste into BENCHMARKS.md with the command, machine and date).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from flextok import FlexTok
from flextok.flops import decoder_flops, encoder_flops

# A mid-size configuration runnable on CPU: d12 width/depth over the f8-VAE latent grid of a 256 px
# image (32x32x16 latents, 256 patches + 256 registers), fed random latents (the VAE is timed apart).
MID = dict(image_size=32, image_channels=16, patch_size=2, num_registers=256, encoder_depth=12,
           encoder_dim=768, decoder_depth=12, decoder_dim=768, head_dim=64,
           fsq={"levels": (8, 8, 8, 5, 5, 5)}, vae=None)


def timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(repeats: int, sizes: tuple[int, ...] = (1024, 2048, 3072)) -> float:
    """The best fp32 GEMM rate over a few square sizes (one size alone under-reads on some CPUs:
    a first run here measured 96 GFLOP/s at 2048^3 while the d12 encoder then ran at 142)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        best = max(best, 2 * n**3 / timeit(lambda: a @ b, repeats) / 1e9)  # noqa: B023 (called at once)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peak = matmul_peak(args.repeats)
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(f"fp32 matmul peak (best of 1024^3, 2048^3, 3072^3): {peak:.0f} GFLOP/s\n")
    print("| model | part | batch | images/s | GFLOP/image | GFLOP/s | % of matmul peak |")
    print("|---|---|---|---|---|---|---|")
    rows = [("tiny", FlexTok.from_preset("tiny"), 64), ("d12 trunk, 512 tokens", FlexTok.from_config(FlexTok.from_preset("tiny").config.replace(**MID)), 8)]
    for name, model, batch in rows:
        model.eval()
        c = model.config
        latents = torch.randn(batch, c.latent_channels, c.latent_size, c.latent_size)
        with torch.inference_mode():
            enc_s = timeit(lambda m=model, x=latents: m.encoder(x), args.repeats)
            regs = model.decoder.embed_registers(torch.zeros(batch, c.num_registers, c.fsq.num_dims),
                                                 torch.full((batch,), c.num_registers))
            t = torch.full((batch,), 0.5)
            dec_s = timeit(lambda m=model, x=latents, r=regs, t=t: m.decoder(x, t, r), args.repeats)
        for part, secs, flops in (("encoder", enc_s, encoder_flops(c)), ("decoder step", dec_s, decoder_flops(c))):
            gflops = flops * batch / secs / 1e9
            print(f"| {name} | {part} | {batch} | {batch / secs:.1f} | {flops / 1e9:.3f} | {gflops:.0f} | {100 * gflops / peak:.0f}% |")
    # CFG: the conditional and unconditional rows share one batched forward per step.
    model = rows[0][1]
    ids = model.tokenize(torch.rand(64, 3, 32, 32) * 2 - 1)
    plain = timeit(lambda: model.detokenize(ids, steps=10), args.repeats)
    guided = timeit(lambda: model.detokenize(ids, steps=10, guidance_scale=3.0), args.repeats)
    print(f"\ntiny detokenize, 64 images, 10 steps: {plain:.2f} s without CFG, {guided:.2f} s with CFG "
          f"(ratio {guided / plain:.2f}; 2.0 = twice the rows through one batched forward per step)")


if __name__ == "__main__":
    main()
