"""Tokenization pipeline vs a plain loop on the same cores, on two kinds of corpus, in one run.

Measures, side by side (issue 23):
  1. two corpora of the same number of images, as WebDataset shards: small PNGs (Fashion-MNIST at
     the model's image size, what `flextok corpus fashion-mnist` writes), where decoding costs a
     few % of encoding, and 500x375 JPEGs re-encoded from real photos, where it costs about a third;
  2. on each, the Ray Data pipeline (`pipelines.tokenize.run_tokenize`, its default pool sizing)
     against a plain loop doing the same read, decode, encode and Parquet write in one process with
     as many torch threads as the cores Ray is given; rounds interleaved;
  3. the same pipeline on a 2-node local cluster (`ray.cluster_utils.Cluster`, the same cores split
     between the nodes) against that plain loop;
  4. what explains the ratios: decode cost per image on one core, the bare encoder on 1 and on all
     threads over tensors already in memory, and one single-thread bare encoder per core at once
     (the ceiling of the pipeline's CPU pool);
  5. FLOPs per image (torch's FlopCounterMode on the `meta` device) and a projection for ImageNet-1k
     and a 100 M-image corpus on N GPUs, with the CPU cores per GPU that decoding needs;
  6. with --extras: a per-image batch-1 loop writing one .npy per image (LlamaGen `extract_codes`
     style) and a sweep of actor counts and batch sizes.
Writes the tables as markdown (--out, default bench_pipeline.md in the work folder) and JSON beside
it; every timed row records the load average before and after it (the machine may be shared).

    python -m benchmarks.bench_pipeline --out BENCH.md     # 6,000 images per corpus (~6 min, 2 cores)
    python -m benchmarks.bench_pipeline --smoke --out X.md # the whole script on tiny corpora (~1-2 min)
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import random
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

GPUS = {  # dense bf16 peak, TFLOP/s (vendor datasheets)
    "A100": 312.0,
    "H100 SXM": 989.0,
}
ASSUMED_MFU = 0.4  # a typical achieved fraction for transformer inference at large batch
PAPER_IMAGE_SIZE = 256


# Corpus ------------------------------------------------------------------------------------------
def photo_sources() -> list[Path]:
    """Real photos from the scikit-image and scikit-learn wheels."""
    found: list[Path] = []
    try:
        import skimage

        root = Path(skimage.__file__).parent / "data"
        found += [root / n for n in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
                                     "hubble_deep_field.jpg", "motorcycle_left.png") if (root / n).is_file()]
    except ImportError:
        pass
    import sklearn

    root = Path(sklearn.__file__).parent / "datasets" / "images"
    found += [root / n for n in ("china.jpg", "flower.jpg")]
    return found


def imagenet_like_jpegs(num: int, seed: int = 0) -> list[bytes]:
    """`num` distinct JPEGs of about ImageNet's median size (500x375, quality 90): random crops,
    scales and flips of the real photos."""
    rng = random.Random(seed)
    photos = [Image.open(p).convert("RGB") for p in photo_sources()]
    out = []
    for _ in range(num):
        img = rng.choice(photos)
        w, h = img.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = img.crop((left, top, left + cw, top + ch)).resize((500, 375), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_corpus(images: list[bytes], out: Path, per_shard: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for n, start in enumerate(range(0, len(images), per_shard)):
        with tarfile.open(out / f"photos-{n:06d}.tar", "w") as tar:
            for i, data in enumerate(images[start : start + per_shard], start):
                for name, payload in ((f"{i:08d}.jpg", data), (f"{i:08d}.cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return out


# The contenders ----------------------------------------------------------------------------------
def fashion_corpus(out: Path, num: int, size: int, per_shard: int) -> Path:
    """The first `num` Fashion-MNIST training images at `size` px, as `flextok corpus` writes them."""
    from pipelines.corpus import build_corpus

    build_corpus("fashion-mnist", out, size=size, split="train", samples_per_shard=per_shard, limit=num)
    return out


def run_serial(corpus: Path, spec: str, batch_size: int, threads: int, out: Path) -> tuple[float, int]:
    """The same stages, one process, no overlap: read -> decode -> encode -> write, shard by shard."""
    import torch

    from pipelines.decode import decode_batch
    from pipelines.encode import TokenizeBatch
    from pipelines.schema import error_rows, token_rows
    from pipelines.sources import read_shard, resolve_inputs
    from pipelines.writer import OutputStore, parquet_bytes, part_name

    torch.set_num_threads(threads)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    stage = TokenizeBatch(spec, num_threads=threads)
    store = OutputStore(str(out))
    count = 0
    for shard in resolve_inputs(str(corpus)).shards:
        decoded = pa.concat_tables([decode_batch(t, image_size=stage.image_size) for t in read_shard(shard)])
        decoded = decoded.filter(pa.compute.greater_equal(decoded["index"], 0))
        encoded = pa.concat_tables([stage(decoded.slice(i, batch_size)) for i in range(0, decoded.num_rows, batch_size)])
        store.write_bytes(part_name(shard.id), parquet_bytes(token_rows(encoded)))
        store.write_bytes(f"_errors/{part_name(shard.id)}", parquet_bytes(error_rows(encoded)))
        count += decoded.num_rows
    return time.perf_counter() - start, count


def run_bare_encoder(spec: str, batch_size: int, threads: int, num: int) -> float:
    """Images/s of the encoder alone over uint8 batches already in memory (includes the uint8 ->
    [-1, 1] conversion the stage does)."""
    import torch

    from pipelines.encode import TokenizeBatch

    torch.set_num_threads(threads)
    stage = TokenizeBatch(spec, num_threads=threads)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(batch_size, stage.image_size, stage.image_size, 3), dtype=np.uint8)
    stage._tokenize(batch)  # warm-up
    start = time.perf_counter()
    done = 0
    while done < num:
        stage._tokenize(batch)
        done += batch_size
    return done / (time.perf_counter() - start)


def _bare_process(spec: str, batch_size: int, num: int, barrier, results) -> None:
    import torch

    from pipelines.encode import TokenizeBatch

    torch.set_num_threads(1)
    stage = TokenizeBatch(spec, num_threads=1)
    batch = np.random.default_rng(0).integers(0, 256, size=(batch_size, stage.image_size, stage.image_size, 3),
                                              dtype=np.uint8)
    stage._tokenize(batch)  # warm-up
    barrier.wait()  # every process starts timing together: they share the cores' caches and memory
    start = time.perf_counter()
    done = 0
    while done < num:
        stage._tokenize(batch)
        done += batch_size
    results.put(done / (time.perf_counter() - start))


def run_bare_processes(spec: str, batch_size: int, processes: int, num: int) -> float:
    """Aggregate images/s of `processes` single-thread bare encoders running at once, one per core:
    the ceiling of any design that puts one single-thread encoder on each core (the pipeline's CPU
    pool), before any reading, decoding, writing or Ray overhead."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_bare_process, args=(spec, batch_size, num, barrier, results)) for _ in range(processes)]
    for proc in procs:
        proc.start()
    rates = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    return sum(rates)


def run_per_image(images: list[bytes], spec: str, threads: int, out: Path) -> float:
    """LlamaGen `extract_codes` style: one image at a time, batch 1, one .npy file per image, on the
    device the pipeline's encoder would use (a GPU with bf16 autocast where there is one)."""
    import contextlib

    import torch

    from pipelines.decode import DecodeConfig, decode_image
    from pipelines.model import default_device, load_model

    torch.set_num_threads(threads)
    device = default_device()
    model = load_model(spec, device=device)
    cfg = DecodeConfig(image_size=model.config.image_size)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i, data in enumerate(images):
        pixels, _, _ = decode_image(data, cfg)
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].to(device).float() / 127.5 - 1  # (1, 3, H, W)
        with torch.no_grad(), amp:
            codes = model.tokenize(x)
        np.save(out / f"{i:08d}.npy", codes.cpu().numpy())
    return len(images) / (time.perf_counter() - start)


def run_pipeline(corpus: Path, out: Path, spec: str, batch_size: int, actors: int | None = None,
                 cpus_per_actor: float | None = None) -> dict:
    from pipelines.tokenize import TokenizeConfig, run_tokenize

    shutil.rmtree(out, ignore_errors=True)
    cfg = TokenizeConfig(input=str(corpus), output=str(out), model=spec, batch_size=batch_size,
                         num_actors=actors, cpus_per_actor=cpus_per_actor)
    return run_tokenize(cfg).manifest["run"]


def decode_cost(corpus: Path, image_size: int, limit: int) -> float:
    """Seconds per image of the decode stage on one core (Arrow batch of encoded images -> pixels at
    the model's size: decode, orient, convert, resize, crop), over the first `limit` images."""
    from pipelines.decode import decode_batch
    from pipelines.sources import read_shard, resolve_inputs

    tables, rows = [], 0
    for shard in resolve_inputs(str(corpus)).shards:
        for table in read_shard(shard):
            tables.append(table)
            rows += table.num_rows
        if rows >= limit:
            break
    decode_batch(tables[0].slice(0, 8), image_size=image_size)  # warm-up
    start = time.perf_counter()
    decoded = sum(int(pa.compute.sum(pa.compute.greater_equal(decode_batch(t, image_size=image_size)["index"], 0)).as_py() or 0)
                  for t in tables)
    return (time.perf_counter() - start) / max(1, decoded)


def load_average() -> float:
    return os.getloadavg()[0]


# FLOPs and projection ----------------------------------------------------------------------------
def counted_flops(preset: str) -> tuple[float, float]:
    """(VAE-encoder FLOPs, tokenizer-encoder FLOPs) per image, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from flextok import FlexTok

    model = FlexTok.from_preset(preset, device="meta")
    # Counted through the boolean-mask attention (the full T x T scores the analytic count assumes):
    # the split path builds a CausalBias tensor subclass, which FlopCounterMode refuses in torch 2.13.
    model.encoder.use_split_attention = False
    size = model.config.image_size
    x = torch.empty(1, 3, size, size, device="meta")
    with FlopCounterMode(display=False) as vae:
        latents = model.images_to_latents(x)
    with FlopCounterMode(display=False) as enc:
        model.encoder(latents)
    return float(vae.get_total_flops()), float(enc.get_total_flops())


def projection_rows(decode_s_256: float) -> list[str]:
    from flextok.config import get_preset
    from flextok.flops import encoder_flops

    rows = []
    for preset in ("d12_d12", "d18_d18", "d18_d28"):
        vae, enc = counted_flops(preset)
        analytic = encoder_flops(get_preset(preset))
        assert abs(analytic - enc) / enc < 0.05, f"{preset}: counted {enc:.3g} vs analytic {analytic:.3g} FLOPs"
        total = vae + enc
        for gpu, peak in GPUS.items():
            per_gpu = peak * 1e12 * ASSUMED_MFU / total
            cores = per_gpu * decode_s_256
            hours = {n: (1.28e6 / (per_gpu * n) / 3600, 100e6 / (per_gpu * n) / 3600) for n in (1, 8, 64)}
            rows.append(
                f"| {preset} | {vae / 1e9:.0f} + {enc / 1e9:.0f} = {total / 1e9:.0f} | {gpu} | {per_gpu:.0f} | "
                f"{cores:.1f} | " + " | ".join(f"{a:.2g} / {b:.3g}" for a, b in hours.values()) + " |"
            )
    return rows


# Main ----
class Report:
    """The run's rows, printed as they come and written as markdown + JSON at the end."""

    def __init__(self, header: str):
        self.header = header
        self.rows: list[dict] = []
        self.sections: list[str] = []
        print(header + "\n", flush=True)

    def timed(self, corpus: str, contender: str, fn) -> dict | None:
        """Run `fn() -> (seconds, images, extra dict)` and record it with the load around it."""
        before = load_average()
        try:
            seconds, images, extra = fn()
        except ValueError as e:  # a sizing this machine cannot run (e.g. 1 CPU): said, not fatal
            print(f"{corpus} / {contender}: not run: {e}", flush=True)
            return None
        row = {"corpus": corpus, "contender": contender, "images": images, "seconds": round(seconds, 2),
               "images_per_s": round(images / seconds, 2), "load": [round(before, 1), round(load_average(), 1)],
               **extra}
        self.rows.append(row)
        print(f"{corpus} / {contender}: {row['images_per_s']:.1f} img/s ({seconds:.1f} s, {images} images; "
              f"load {row['load'][0]} -> {row['load'][1]})", flush=True)
        return row

    def best(self, corpus: str, prefix: str) -> dict | None:
        rows = [r for r in self.rows if r["corpus"] == corpus and r["contender"].startswith(prefix)]
        return max(rows, key=lambda r: r["images_per_s"]) if rows else None

    def comparison_table(self, corpora: list[str]) -> str:
        lines = ["| corpus | contender | images | seconds | images/s | vs plain loop | first rows after | "
                 "load avg (before → after) |", "|---|---|---|---|---|---|---|---|"]
        for corpus in corpora:
            plain = self.best(corpus, PLAIN)
            for r in (r for r in self.rows if r["corpus"] == corpus):
                ratio = f"{r['images_per_s'] / plain['images_per_s']:.2f}x" if plain else "n/a"
                if r["contender"].startswith(PLAIN):
                    ratio = "1.00x" if r is plain else ratio
                first = f"{r['first_output_s']:.1f} s" if "first_output_s" in r else ""
                lines.append(f"| {corpus} | {r['contender']} | {r['images']:,} | {r['seconds']:.1f} | "
                             f"{r['images_per_s']:.1f} | {ratio} | {first} | {r['load'][0]} → {r['load'][1]} |")
        return "\n".join(lines)

    def ratios(self, corpora: list[str]) -> dict:
        out = {}
        for corpus in corpora:
            plain = self.best(corpus, PLAIN)
            out[corpus] = {name: round(best["images_per_s"] / plain["images_per_s"], 3)
                           for name, prefix in (("pipeline", PIPELINE), ("previous_sizing", PREVIOUS),
                                                ("cluster", CLUSTER))
                           if plain and (best := self.best(corpus, prefix))}
        return out


PLAIN, PIPELINE, PREVIOUS, CLUSTER = "plain loop", "pipeline, default pool", "pipeline, previous sizing", "2-node cluster"


def _pipeline_fn(corpus: Path, out: Path, spec: str, batch: int, actors=None, cpus_per_actor=None):
    def fn():
        run = run_pipeline(corpus, out, spec, batch, actors, cpus_per_actor)
        pool = f"{run['actors']} x {run['cpus_per_actor']:g} CPU"
        return run["pipeline_time_s"], run["samples_processed"], {"first_output_s": run["first_output_s"], "pool": pool}
    return fn


def _serial_fn(corpus: Path, out: Path, spec: str, batch: int, threads: int):
    def fn():
        secs, n = run_serial(corpus, spec, batch, threads, out)
        return secs, n, {}
    return fn


def quiet_ray_data() -> None:
    """Ray Data's progress blocks and per-dataset INFO lines would bury the figures."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def start_cluster(cpus: int):
    """A 2-node local cluster on this machine's cores (split between the nodes), this process its driver."""
    import ray
    from ray.cluster_utils import Cluster

    head, worker = max(1, cpus // 2), max(1, cpus - cpus // 2)
    store = 512 * 1024**2
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": head, "include_dashboard": False, "object_store_memory": store})
    cluster.add_node(num_cpus=worker, object_store_memory=store)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    quiet_ray_data()
    return cluster, (head, worker)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="preset or checkpoint (default: tiny, random weights)")
    p.add_argument("--num-images", type=int, default=6000, help="images per corpus")
    p.add_argument("--per-shard", type=int, default=1000, help="images per WebDataset shard (flextok corpus's default)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2,
                   help="cores for every contender: Ray's CPUs (split between the cluster's nodes) and the "
                   "plain loop's torch threads (default: all)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of every contender, interleaved")
    p.add_argument("--bare-images", type=int, default=1000, help="images for each bare-encoder measurement")
    p.add_argument("--extras", action="store_true", help="also the batch-1 loop and the actors x batch sweep")
    p.add_argument("--per-image", type=int, default=600, help="images for the batch-1 loop (--extras)")
    p.add_argument("--sweep-images", type=int, default=2000, help="images for the sweep (--extras)")
    p.add_argument("--workdir", type=Path, default=None, help="kept afterwards (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=None, help="markdown results (JSON beside it, .json)")
    p.add_argument("--smoke", action="store_true", help="every section on tiny corpora: checks the script, measures nothing")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_images, args.per_shard, args.batch_size, args.bare_images = 96, 32, 32, 64
        args.per_image, args.sweep_images, args.extras, args.repeats = 8, 64, True, 1
    if min(args.num_images, args.per_shard, args.batch_size, args.cpus, args.repeats) < 1:
        p.error("--num-images, --per-shard, --batch-size, --cpus and --repeats must be >= 1")

    import ray
    import torch

    from pipelines.model import inspect_model

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    out_md = args.out or work / "bench_pipeline.md"
    info = inspect_model(args.model)
    S = info.image_size
    jpegs = imagenet_like_jpegs(args.num_images)
    corpora = {
        f"small PNGs (Fashion-MNIST {S} px)": fashion_corpus(work / "png_corpus", args.num_images, S, args.per_shard),
        "large JPEGs (500x375, q90)": write_corpus(jpegs, work / "jpeg_corpus", args.per_shard),
    }
    names = list(corpora)
    cpus = args.cpus
    # Ray starts its workers at nice 15, while the plain loop runs at this process's priority: on a
    # shared machine that alone would skew the comparison, so both run at the same niceness.
    os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))
    os.environ.pop("RAY_ADDRESS", None)  # this script starts its own Ray instances, never joins another
    report = Report(
        f"# bench_pipeline {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores ({cpus} used), torch "
        f"{torch.__version__}, model {info.checkpoint_id} ({S}px, K={info.num_registers}), {args.num_images:,} "
        f"images per corpus in shards of {args.per_shard}, batch {args.batch_size}; load average at start "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    quiet_ray_data()
    try:
        for _ in range(args.repeats):
            for name, corpus in corpora.items():
                report.timed(name, f"{PLAIN}, 1 process, {cpus} torch threads",
                             _serial_fn(corpus, work / "plain", args.model, args.batch_size, cpus))
                row = report.timed(name, PIPELINE, _pipeline_fn(corpus, work / "pipe", args.model, args.batch_size))
                if row:
                    row["contender"] = f"{PIPELINE} ({row['pool']} reserved, 1 thread each)"
                row = report.timed(name, PREVIOUS, _pipeline_fn(corpus, work / "pipe", args.model, args.batch_size,
                                                                max(1, cpus // 2), 1.0))
                if row:
                    row["contender"] = f"{PREVIOUS} ({row['pool']} reserved, 1 thread each)"
        decode_ms = {name: decode_cost(corpus, S, min(args.num_images, 500)) * 1e3 for name, corpus in corpora.items()}
        bare = {t: run_bare_encoder(args.model, args.batch_size, t, args.bare_images) for t in sorted({1, cpus})}
        bare_procs = run_bare_processes(args.model, args.batch_size, cpus, args.bare_images) if cpus > 1 else None
        if args.extras:
            report.sections.append(extras(args, jpegs, corpora[names[1]], work, cpus))
    finally:
        ray.shutdown()

    cluster, split = start_cluster(cpus)
    try:
        for _ in range(args.repeats):
            for name, corpus in corpora.items():
                row = report.timed(name, CLUSTER, _pipeline_fn(corpus, work / "cluster", args.model, args.batch_size))
                if row:
                    row["contender"] = f"{CLUSTER} ({split[0]} + {split[1]} CPUs), default pool ({row['pool']} reserved)"
    finally:
        ray.shutdown()
        cluster.shutdown()

    why = ["Decode stage on one core: " + ", ".join(f"{decode_ms[n]:.2f} ms/image for {n}" for n in names),
           "Bare encoder over uint8 batches in memory: " + ", ".join(f"{v:.1f} img/s on {t} thread(s)" for t, v in bare.items())
           + (f"; {cpus} single-thread processes at once: {bare_procs:.1f} img/s together (the ceiling of one "
              f"single-thread encoder per core, {bare_procs / bare[cpus]:.2f}x one process on {cpus} threads)"
              if bare_procs else "")]
    if args.model == "tiny":
        _, enc_tiny = counted_flops("tiny")
        why.append(f"tiny encoder: {enc_tiny / 1e9:.3f} GFLOP/image counted")
    dec_256 = decode_cost(corpora[names[1]], PAPER_IMAGE_SIZE, min(args.num_images, 300))
    projection = "\n".join([
        f"Projection at {PAPER_IMAGE_SIZE}px (FLOPs counted on the meta device; assumed MFU {ASSUMED_MFU:.0%} of "
        f"dense bf16 peak; JPEG decode at the measured {dec_256 * 1e3:.2f} ms/image/core):\n",
        "| preset | GFLOP/image (VAE enc + encoder) | GPU | images/s/GPU | CPU cores/GPU for decode | "
        "hours ImageNet-1k / 100M on 1 GPU | on 8 GPUs | on 64 GPUs |",
        "|---|---|---|---|---|---|---|---|", *projection_rows(dec_256)])
    ratios = report.ratios(names)
    summary = "; ".join(f"{n}: pipeline {v.get('pipeline', float('nan')):.2f}x, 2-node cluster "
                        f"{v.get('cluster', float('nan')):.2f}x the plain loop" for n, v in ratios.items())
    text = "\n\n".join([report.header, report.comparison_table(names), summary, "\n".join(f"- {w}" for w in why),
                        *report.sections, projection]) + "\n"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text)
    result = {"header": report.header, "cpus": cpus, "cluster_cpus": list(split), "rows": report.rows,
              "ratios": ratios, "decode_ms": decode_ms, "bare_encoder": {str(k): v for k, v in bare.items()},
              "bare_processes": bare_procs,
              "smoke": args.smoke}
    out_md.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + text + f"\nwritten: {out_md} (+ .json)")
    if args.workdir is None and args.out is not None:
        shutil.rmtree(work, ignore_errors=True)
    return result


def extras(args, jpegs: list[bytes], jpeg_corpus: Path, work: Path, cpus: int) -> str:
    """The batch-1 loop and the actors x batch sweep (on the JPEG corpus, as in earlier runs)."""
    per_image = run_per_image(jpegs[: args.per_image], args.model, cpus, work / "npy")
    sweep_corpus = write_corpus(jpegs[: args.sweep_images], work / "sweep_corpus", args.per_shard)
    batches = (args.batch_size,) if args.smoke else (16, 64, 256)
    lines = [f"Per image, batch 1, one .npy each (LlamaGen extract_codes style, {cpus} threads): {per_image:.1f} img/s",
             f"\nSweep on {args.sweep_images} JPEGs (pipeline images/s, end to end incl. actor start):\n",
             "| actors x CPU reserved | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    for actors, cpa in ((None, None), (max(1, cpus // 2), 1.0)):
        cells, pool = [], ""
        for batch in batches:
            try:
                run = run_pipeline(sweep_corpus, work / "sweep", args.model, batch, actors, cpa)
            except ValueError:
                cells.append("n/a")
                continue
            cells.append(f"{run['images_per_s']:.1f}")
            pool = f"{run['actors']} x {run['cpus_per_actor']:g}"
        lines.append(f"| {pool or 'n/a'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
