"""One GPU check, a few minutes on one H100/H200, nothing downloaded: what the GPU paths really do.

    python -m benchmarks.gpu_check [--out FILE.json] [--budget SECONDS] [--skip a,b] [--fm-images NPZ]
    python -m benchmarks.gpu_check --smoke        # CPU, tiny shapes, ~1-2 minutes: checks the script

Sections, in priority order (each prints Markdown-ready lines; a failing section prints its error and
the others still run; everything lands in the JSON, `$OUT/gpu_check.json` by default when $OUT is set):
- env: torch, CUDA, GPU, a measured bf16 matmul rate (MFU below is against it and the nominal peak).
- tokens: the shipped Fashion-MNIST tokenizer on held-out images: % of tokens and of images that each
  precision (tf32, bf16, fp16; and fp32 on the CPU) changes against fp32 on the device.
- encoder: the paper's d12 and d18 encoder trunks (256 patches of 2x2x16 latents + 256 registers) at
  batch 128 in bf16: images/s, TFLOP/s and MFU with the boolean mask, the split attention, and the
  split attention compiled (`flextok.compile`).
- actor: the shipped tokenizer through the Ray Data actor's callable (`TokenizeBatch`) on pre-decoded
  Arrow batches, against a bare loop over tensors on the device, and a batch-1 loop that writes one
  .npy file per image (the "one image at a time" baseline).
- decode: JPEG (500x375, quality 90) -> 256 px per CPU core with the pipeline's Pillow path, and
  batched on the GPU with nvJPEG (`torchvision.io.decode_jpeg`); the CPU cores per GPU that the
  encoder rate implies.
- train: generator training steps at a paper preset (bf16 autocast, fused AdamW) on one device as
  plain DDP-style replication and under FSDP2 (`fully_shard` per block, world size 1): ms/step,
  tokens/s, MFU, peak memory.
Budget: sections after the first three give way (are skipped, and say so) when `--budget` runs out.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from flextok import FlexTok
from flextok.config import FlexTokConfig
from flextok.flops import encoder_flops
from flextok.precision import precision_context

ASSETS = Path(__file__).resolve().parents[1] / "flextok" / "assets"
NOMINAL_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 125.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up (and compile)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


class Check:
    """Shared settings, the JSON record and the time budget."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.smoke = args.smoke
        self.device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
        self.repeats = 1 if args.smoke else 5
        self.start = time.perf_counter()
        self.budget = args.budget
        self.fm_images = args.fm_images
        self.results: dict[str, object] = {"date": time.strftime("%Y-%m-%d"), "smoke": args.smoke}
        self.peak_tflops: float | None = None
        self.nominal_tflops: float | None = None

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def line(self, text: str) -> None:
        print(text, flush=True)

    def mfu(self, tflops: float) -> str:
        parts = []
        if self.peak_tflops:
            parts.append(f"{100 * tflops / self.peak_tflops:.0f}% of measured")
        if self.nominal_tflops:
            parts.append(f"{100 * tflops / self.nominal_tflops:.0f}% of nominal")
        return ", ".join(parts) or "n/a"


# Sections ----------------------------------------------------------------------------------------
def env(c: Check) -> dict:
    out: dict[str, object] = {"torch": torch.__version__, "device": str(c.device), "python": platform.python_version()}
    if c.device.type == "cuda":
        name = torch.cuda.get_device_name(c.device)
        out.update(gpu=name, cuda=torch.version.cuda, capability=list(torch.cuda.get_device_capability(c.device)))
        c.nominal_tflops = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)
    n = 256 if c.smoke else 8192
    dtype = torch.bfloat16 if c.device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=c.device, dtype=dtype)
    b = torch.randn(n, n, device=c.device, dtype=dtype)
    secs = best_seconds(lambda: a @ b, c.device, c.repeats)
    c.peak_tflops = 2 * n**3 / secs / 1e12
    out.update(matmul_n=n, matmul_dtype=str(dtype), matmul_tflops=round(c.peak_tflops, 1),
               nominal_bf16_tflops=c.nominal_tflops)
    c.line(f"env: torch {torch.__version__}, {out.get('gpu', 'CPU')}, {n}^3 {dtype} matmul {c.peak_tflops:.1f} TFLOP/s"
           f" (nominal {c.nominal_tflops or 'n/a'})")
    return out


def _fm_images(c: Check, count: int) -> torch.Tensor:
    """Held-out Fashion-MNIST test images as (N, 3, 28, 28) in [-1, 1]: from --fm-images (an .npz with
    an `images` uint8 array) or built from the Debian package through the project's corpus reader."""
    if c.fm_images:
        with np.load(c.fm_images) as data:
            arr = data["images"][:count]
        x = torch.from_numpy(np.ascontiguousarray(arr))
        x = x.permute(0, 3, 1, 2) if x.shape[-1] == 3 else x
        return x.float() / 127.5 - 1
    from pipelines.corpus import build_corpus
    from pipelines.images import read_corpus

    folder = Path(tempfile.mkdtemp(prefix="gpu-check-fm-"))
    build_corpus("fashion-mnist", folder, split="test", limit=count, samples_per_shard=count)
    return read_corpus(str(folder), 28).images.float() / 127.5 - 1


def tokens(c: Check) -> dict:
    tok = FlexTok.from_pretrained(ASSETS / "fashion-mnist/tokenizer.safetensors", device=c.device).eval()
    x = _fm_images(c, 64 if c.smoke else 1024).to(c.device)
    with precision_context("fp32", c.device):
        ref = tok.tokenize(x)
    out = {"images": int(x.shape[0]), "reference": f"fp32 on {c.device.type}"}
    runs = {p: (c.device, p) for p in ("tf32", "bf16", "fp16")}
    if c.device.type == "cuda":
        runs["fp32 on cpu"] = (torch.device("cpu"), "fp32")
    for name, (device, precision) in runs.items():
        model = tok if device == c.device else FlexTok.from_pretrained(ASSETS / "fashion-mnist/tokenizer.safetensors").eval()
        with precision_context(precision, device):
            ids = model.tokenize(x.to(device)).to(c.device)
        diff = ids != ref
        out[name] = {"tokens_changed_pct": round(100 * diff.float().mean().item(), 3),
                     "first4_changed_pct": round(100 * diff[:, :4].float().mean().item(), 3),
                     "images_changed_pct": round(100 * diff.any(1).float().mean().item(), 2)}
        c.line(f"tokens {name}: {out[name]['tokens_changed_pct']}% of tokens, {out[name]['first4_changed_pct']}% of the "
               f"first 4, {out[name]['images_changed_pct']}% of images differ from {out['reference']}")
    return out


def _trunk_config(depth: int, smoke: bool) -> FlexTokConfig:
    """The paper's dN encoder over the f8-VAE latent grid of a 256 px image (VAE left out)."""
    base = FlexTok.from_preset("tiny", device="meta").config
    if smoke:
        return base.replace(image_size=8, image_channels=16, patch_size=2, num_registers=16, encoder_depth=1,
                            encoder_dim=64, decoder_depth=1, decoder_dim=64, head_dim=32,
                            fsq={"levels": (8, 8, 8, 5, 5, 5)}, vae=None)
    return base.replace(image_size=32, image_channels=16, patch_size=2, num_registers=256, encoder_depth=depth,
                        encoder_dim=64 * depth, decoder_depth=1, decoder_dim=64, head_dim=64,
                        fsq={"levels": (8, 8, 8, 5, 5, 5)}, vae=None)


def encoder(c: Check) -> dict:
    from flextok.compile import compile_blocks
    from flextok.encoder import Encoder

    out = {}
    batch = 2 if c.smoke else 128
    precision = "bf16" if c.device.type == "cuda" else "fp32"
    for depth in (12, 18):
        cfg = _trunk_config(depth, c.smoke)
        with torch.device(c.device):
            enc = Encoder(cfg).eval()
        enc.init_weights()
        latents = torch.randn(batch, cfg.latent_channels, cfg.latent_size, cfg.latent_size, device=c.device)
        flops = encoder_flops(cfg) * batch

        def run(e=enc, x=latents):
            with torch.inference_mode(), precision_context(precision, c.device):
                return e(x)

        row = {}
        for mode in ("masked", "split", "split compiled"):
            if mode == "split compiled":
                if c.left() < 60 and not c.smoke:
                    row[mode] = "skipped: budget"
                    continue
                compile_blocks(enc)
            enc.use_split_attention = mode != "masked"
            secs = best_seconds(run, c.device, c.repeats)
            tflops = flops / secs / 1e12
            row[mode] = {"images_per_s": round(batch / secs, 1), "tflops": round(tflops, 1), "mfu": c.mfu(tflops)}
            c.line(f"encoder d{depth} {mode} ({precision}, batch {batch}): {batch / secs:.0f} images/s, "
                   f"{tflops:.1f} TFLOP/s ({c.mfu(tflops)})")
        out[f"d{depth}"] = row
    return out


def actor(c: Check) -> dict:
    import pyarrow as pa

    from pipelines.encode import TokenizeBatch
    from pipelines.schema import DECODED_SCHEMA

    path = str(ASSETS / "fashion-mnist/tokenizer.safetensors")
    stage = TokenizeBatch(path, device=str(c.device))
    size = stage.image_size
    n, batch = (64, 32) if c.smoke else (4096, 128)
    pixels = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    tables = []
    for s in range(0, n, batch):
        rows = pixels[s : s + batch]
        m = len(rows)
        cols = {f.name: pa.nulls(m, f.type) for f in DECODED_SCHEMA}
        cols.update(index=pa.array(range(s, s + m), pa.int64()), total=pa.array([n] * m, pa.int64()),
                    key=pa.array([f"k{i}" for i in range(s, s + m)]), source=pa.array(["mem"] * m),
                    pixels=pa.array([r.tobytes() for r in rows], pa.binary()),
                    width=pa.array([size] * m, pa.int32()), height=pa.array([size] * m, pa.int32()))
        tables.append(pa.table(cols, schema=DECODED_SCHEMA))
    model = stage.model
    on_device = torch.from_numpy(pixels).to(c.device).permute(0, 3, 1, 2).float().div(127.5).sub(1)

    def actor_path():
        for t in tables:
            stage(t)

    def bare():
        with torch.inference_mode():
            for s in range(0, n, batch):
                model.tokenize(on_device[s : s + batch])
        sync(c.device)

    folder = Path(tempfile.mkdtemp(prefix="gpu-check-npy-"))
    per_image = min(n, 16 if c.smoke else 512)

    def one_by_one():
        with torch.inference_mode():
            for i in range(per_image):
                np.save(folder / f"{i}.npy", model.tokenize(on_device[i : i + 1]).cpu().numpy())

    rates = {}
    for name, fn, count in (("actor", actor_path, n), ("bare loop", bare, n), ("batch-1 + .npy", one_by_one, per_image)):
        rates[name] = count / best_seconds(fn, c.device, max(1, c.repeats // 2))
    for name, rate in rates.items():
        c.line(f"actor path: {name}: {rate:.0f} images/s ({rate / rates['bare loop']:.2f}x the bare loop)")
    return {k: round(v, 1) for k, v in rates.items()} | {"batch": batch, "images": n}


def _jpegs(count: int) -> list[bytes]:
    """500x375 JPEGs (quality 90) with photo-like structure: smooth gradients plus texture."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    out = []
    for i in range(count):
        base = (np.sin(xx / (30 + i % 7)) + np.cos(yy / (20 + i % 5))) * 60 + 128
        img = np.stack([base, base[::-1], base[:, ::-1]], -1) + rng.normal(0, 12, (375, 500, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def decode(c: Check) -> dict:
    from pipelines.decode import DecodeConfig, decode_image

    n = 16 if c.smoke else 256
    data = _jpegs(n)
    cfg = DecodeConfig(image_size=256)
    t0 = time.perf_counter()
    for d in data:
        decode_image(d, cfg)
    cpu_rate = n / (time.perf_counter() - t0)
    out = {"cpu_pillow_images_per_s_per_core": round(cpu_rate, 1)}
    c.line(f"decode: Pillow JPEG 500x375 -> 256 px: {cpu_rate:.0f} images/s per core")
    if c.device.type == "cuda":
        import torchvision
        from torchvision.io import decode_jpeg

        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]

        def gpu():
            imgs = decode_jpeg(tensors, device=c.device)
            return [torch.nn.functional.interpolate(im[None].float(), size=(256, 256), mode="bicubic",
                                                    antialias=True) for im in imgs]

        secs = best_seconds(gpu, c.device, c.repeats)
        out.update(gpu_nvjpeg_images_per_s=round(n / secs, 1), torchvision=torchvision.__version__)
        c.line(f"decode: nvJPEG batched + resize on the GPU: {n / secs:.0f} images/s")
    enc = c.results.get("encoder", {})
    d12 = enc.get("d12", {}).get("split", {}) if isinstance(enc, dict) else {}
    if isinstance(d12, dict) and "images_per_s" in d12:
        out["cpu_cores_per_gpu_for_d12_encoder"] = round(d12["images_per_s"] / cpu_rate, 1)
        c.line(f"decode: the d12 encoder's rate needs {out['cpu_cores_per_gpu_for_d12_encoder']} Pillow cores per GPU")
    return out


def train(c: Check) -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from flextok.generator import Generator
    from flextok.gpt import GPTConfig

    presets = [("tiny", 4, 32)] if c.smoke else [("d20", 32, 256), ("d30", 32, 256)]
    backend = "nccl" if c.device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
    out = {}
    for name, batch, seq in presets:
        if c.left() < 45 and not c.smoke and out:
            out[name] = "skipped: budget"
            continue
        cfg = GPTConfig.from_preset(name, max_tokens=seq) if name != "tiny" else GPTConfig.from_preset("tiny")
        row = {}
        for strategy in ("replicated", "fsdp"):
            torch.manual_seed(0)
            if c.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(c.device)
            with torch.device(c.device):
                model = Generator(cfg)
            if strategy == "fsdp":
                mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                for block in model.gpt.blocks:
                    fully_shard(block, mp_policy=mp)
                fully_shard(model, mp_policy=mp)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=c.device.type == "cuda")
            tokens = torch.randint(0, cfg.codebook_size, (batch, seq), device=c.device)
            labels = torch.randint(0, cfg.num_classes, (batch,), device=c.device)

            def step(m=model, o=opt, t=tokens, y=labels, s=strategy):
                dtype = torch.bfloat16 if c.device.type == "cuda" else torch.float32
                with torch.autocast(c.device.type, dtype=dtype, enabled=s != "fsdp" and c.device.type == "cuda"):
                    loss = m(t, y)
                loss.backward()
                o.step()
                o.zero_grad(set_to_none=True)

            secs = best_seconds(step, c.device, max(1, c.repeats // 2))
            params = sum(p.numel() for p in model.parameters())
            flops = (6 * params + 12 * cfg.depth * cfg.dim * seq) * batch * seq
            tflops = flops / secs / 1e12
            peak = torch.cuda.max_memory_allocated(c.device) / 2**30 if c.device.type == "cuda" else None
            row[strategy] = {"ms_per_step": round(1000 * secs, 1), "tokens_per_s": round(batch * seq / secs),
                             "tflops": round(tflops, 1), "mfu": c.mfu(tflops),
                             "peak_gib": None if peak is None else round(peak, 1)}
            c.line(f"train {name} ({params / 1e9:.2f} B params, batch {batch} x {seq}) {strategy}: "
                   f"{1000 * secs:.0f} ms/step, {batch * seq / secs:.0f} tokens/s, {tflops:.1f} TFLOP/s ({c.mfu(tflops)})"
                   + (f", peak {peak:.1f} GiB" if peak is not None else ""))
            del model, opt
        out[name] = row
    dist.destroy_process_group()
    return out


SECTIONS: dict[str, Callable[[Check], dict]] = {
    "env": env, "tokens": tokens, "encoder": encoder, "actor": actor, "decode": decode, "train": train,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks that every section runs")
    p.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET", 280)),
                   help="seconds after which optional parts give way (default %(default)s)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip")
    p.add_argument("--fm-images", default=None, metavar="NPZ",
                   help="held-out Fashion-MNIST images (.npz, 'images' uint8 [N, 28, 28, 3]); default: the Debian package")
    p.add_argument("--out", type=Path, default=None, help="JSON of every figure (default $OUT/gpu_check.json when $OUT is set)")
    args = p.parse_args(argv)
    c = Check(args)
    skip = {s for s in args.skip.split(",") if s}
    failed = []
    for name, section in SECTIONS.items():
        if name in skip:
            continue
        try:
            c.results[name] = section(c)
        except Exception as e:
            failed.append(name)
            c.results[name] = {"error": f"{type(e).__name__}: {e}"}
            c.line(f"{name}: FAILED: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stderr)
    c.results["seconds"] = round(time.perf_counter() - c.start, 1)
    out = args.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(c.results, indent=1, default=str) + "\n")
        c.line(f"figures in {out}")
    c.line(f"gpu_check: {len(SECTIONS) - len(skip) - len(failed)} sections ran, {len(failed)} failed "
           f"({', '.join(failed) or 'none'}) in {c.results['seconds']} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
