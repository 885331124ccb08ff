"""`flextok sample`: images from a class- or text-conditional generator, as a labelled grid PNG.

Loads the generator (a checkpoint, or a run folder's final or newest checkpoint), the tokenizer it
was trained on (from the generator's provenance, sha256-verified), samples `--per-condition` images
for every class id or prompt in batches, and writes the grid; optionally every image as its own PNG
and the generated token ids as Parquet (the token-dataset schema).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from flextok.precision import PRECISIONS, resolve_precision
from jobs.cli_util import (
    finite_float,
    json_arg,
    non_negative_float,
    positive_int,
    probability,
    run_cli,
)

log = logging.getLogger("jobs.sample")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flextok sample",
        description="Sample images from a trained generator: --per-condition samples for each class id "
        "(--labels) or prompt (--prompts), decoded by the tokenizer the generator was trained on, written "
        "as a grid PNG with one labelled row per condition.",
    )
    p.add_argument("--generator", required=True, metavar="RUN_OR_CKPT",
                   help="a generator checkpoint (.safetensors) or a train-generator run folder, local or s3:// (its final "
                   "model.safetensors, else its newest checkpoint_<step>/)")
    p.add_argument("--tokenizer", default=None, metavar="CKPT",
                   help="tokenizer checkpoint that decodes the tokens (default: the one recorded in the generator "
                   "checkpoint; its sha256 must match the recorded one)")
    cond = p.add_mutually_exclusive_group(required=True)
    cond.add_argument("--labels", nargs="+", metavar="LABEL",
                      help="class ids for a class-conditional generator, space or comma separated (e.g. 0 3 7 or "
                      "0,3,7); class names work when the generator or --class-names knows them")
    cond.add_argument("--prompts", nargs="+", metavar="TEXT",
                      help="captions for a text-conditional generator, one quoted argument each")
    p.add_argument("--num-tokens", type=positive_int, default=None, metavar="K",
                   help="tokens per image, 1..K of the tokenizer (fewer = coarser images); for a generator with an "
                   "end-of-sequence token, the most tokens per image (it stops each image where it chooses). "
                   "Default: K")
    p.add_argument("--out", required=True, type=Path, metavar="GRID.png", help="grid PNG to write")
    p.add_argument("--per-condition", type=positive_int, default=4, help="samples per class or prompt (default %(default)s)")
    p.add_argument("--cfg-scale", type=finite_float, default=3.0,
                   help="classifier-free guidance on the logits; 1 = none (plain conditional sampling), "
                   "0 = unconditional (default %(default)s)")
    p.add_argument("--temperature", type=non_negative_float, default=1.0, help="sampling temperature; 0 = greedy (default %(default)s)")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=probability, default=None, help="nucleus sampling: smallest token set with this mass")
    p.add_argument("--seed", type=int, default=0, help="seed of token sampling and decoder noise (default %(default)s)")
    p.add_argument("--decoder-steps", type=positive_int, default=25, help="Euler steps of the tokenizer's flow decoder (default %(default)s)")
    p.add_argument("--decoder-guidance", type=finite_float, default=1.0,
                   help="classifier-free guidance scale of the tokenizer's decoder (default %(default)s)")
    p.add_argument("--decoder-apg", action="store_true", help="adaptive projected guidance (the FlexTok release's decoder guidance: the guided update's part orthogonal to the conditional prediction, norm-capped, with momentum) instead of plain CFG")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images generated per batch (default %(default)s)")
    p.add_argument("--save-images", type=Path, default=None, metavar="DIR",
                   help="also write every sample as DIR/<n>-<condition>_<index>.png")
    p.add_argument("--save-tokens", type=Path, default=None, metavar="FILE.parquet",
                   help="also write the generated token ids as Parquet (key, tokens list<uint16>, num_tokens, label, "
                   "caption, ...: the schema of `flextok tokenize` output)")
    p.add_argument("--class-names", default=None, metavar="NAMES",
                   help="names for the grid labels: a comma-separated list or a corpus dataset.json (default: "
                   "names recorded in the generator, else 'class N')")
    p.add_argument("--storage-options", type=json_arg, default=None, metavar="JSON",
                   help="fsspec options for an s3:// --generator or --tokenizer (e.g. an endpoint); AWS variables "
                   "are used otherwise")
    p.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                   help="generator and decoder precision; auto = bf16 on CUDA, fp32 on CPU (default %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the generator's and the decoder's transformer blocks (pays off for many "
                        "samples; falls back to eager where compile is unavailable)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="log warnings only")
    return p


def _class_names(arg: str | None, metadata: dict[str, str]) -> list[str] | None:
    if arg is not None:
        path = Path(arg)
        if path.suffix == ".json" or path.is_file():
            if not path.is_file():
                raise FileNotFoundError(f"--class-names {arg}: no such file")
            try:
                names = json.loads(path.read_text())["class_names"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"--class-names {arg}: not a dataset.json with a class_names list") from None
            return [str(n) for n in names]
        return [n.strip() for n in arg.split(",")]
    if metadata.get("class_names"):
        try:
            return [str(n) for n in json.loads(metadata["class_names"])]
        except json.JSONDecodeError:
            return None
    return None


def parse_labels(items: Sequence[str], num_classes: int, class_names: Sequence[str] | None) -> list[int]:
    """`--labels` arguments (ids or names, space or comma separated) -> class ids; ValueError if bad."""
    lookup = {n.lower(): i for i, n in enumerate(class_names or ())}
    labels = []
    for item in (part.strip() for arg in items for part in arg.split(",")):
        if not item:
            continue
        if item.lstrip("-").isdigit():
            value = int(item)
        elif item.lower() in lookup:
            value = lookup[item.lower()]
        else:
            known = " or a class name" if lookup else ""
            raise ValueError(f"--labels: {item!r} is not a class id (0..{num_classes - 1}){known}")
        if not 0 <= value < num_classes:
            raise ValueError(f"--labels: class id {value} is out of range; this generator has classes 0..{num_classes - 1}")
        labels.append(value)
    if not labels:
        raise ValueError("--labels: no class ids given")
    return labels


def _device(arg: str | None) -> str:
    import torch

    if arg is not None:
        return arg
    return "cuda" if torch.cuda.is_available() else "cpu"


def write_tokens(path: Path, tokens, conditions: Sequence[int | str], *, is_class: bool, generator_path: str,
                 tokenizer, image_size: int, settings: dict) -> None:
    """Generated ids as a token-dataset Parquet file (one row per image)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flextok.generator import token_lengths
    from pipelines.schema import TOKEN_SCHEMA, file_metadata, tokens_array

    n = tokens.shape[0]
    per = n // len(conditions)
    keys = [f"sample/{i // per:04d}/{i % per:04d}" for i in range(n)]
    expanded = [c for c in conditions for _ in range(per)]
    lengths = token_lengths(tokens).numpy()
    rows = tokens_array(tokens.numpy()) if bool((lengths == tokens.shape[1]).all()) else pa.array(
        [row[:k].tolist() for row, k in zip(tokens, lengths)], pa.list_(pa.uint16()))  # ends at each EOS
    columns = {
        "key": pa.array(keys, pa.string()),
        "tokens": rows,
        "num_tokens": pa.array(lengths.astype(np.uint16), pa.uint16()),
        "label": pa.array([int(c) if is_class else None for c in expanded], pa.int32()),
        "caption": pa.array([None if is_class else str(c) for c in expanded], pa.string()),
        "source": pa.array([generator_path] * n, pa.string()),
        "width": pa.array([image_size] * n, pa.int32()),
        "height": pa.array([image_size] * n, pa.int32()),
    }
    c = tokenizer.config
    metadata = file_metadata(
        checkpoint_id=str(tokenizer.checkpoint_id), checkpoint_sha256=tokenizer.checkpoint_sha256,
        codebook_size=c.codebook_size, fsq_levels=c.fsq.levels, max_tokens=c.num_registers, image_size=c.image_size,
    )
    metadata[b"flextok.sample"] = json.dumps(settings, sort_keys=True).encode()
    table = pa.Table.from_pydict(columns, schema=TOKEN_SCHEMA).replace_schema_metadata(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _run(args: argparse.Namespace) -> int:
    import torch

    from flextok import viz
    from flextok.checkpoint import read_metadata
    from flextok.generator import Generator
    from flextok.sampling import find_generator_checkpoint, resolve_tokenizer, sample
    from pipelines.model import load_model
    from pipelines.storage import fetch_checkpoint

    start = time.perf_counter()
    if args.out.suffix.lower() != ".png":
        raise ValueError(f"--out {args.out} must be a .png file")
    if args.save_tokens is not None and args.save_tokens.suffix.lower() not in (".parquet", ".pq"):
        raise ValueError(f"--save-tokens {args.save_tokens} must be a .parquet file")
    device = _device(args.device)
    precision = resolve_precision(args.precision, device)
    gen_path = find_generator_checkpoint(fetch_checkpoint(args.generator, args.storage_options))
    metadata = read_metadata(gen_path)
    generator = Generator.from_pretrained(gen_path, device=device)
    is_class = generator.config.cond == "class"
    if is_class and args.prompts is not None:
        raise ValueError(f"{gen_path} is a class-conditional generator: use --labels, not --prompts")
    if not is_class and args.labels is not None:
        raise ValueError(f"{gen_path} is a text-conditional generator: use --prompts, not --labels")
    if is_class:
        names = _class_names(args.class_names, metadata)
        if names is not None and len(names) != generator.config.num_classes:
            log.warning("%d class names for %d classes; labelling rows by id", len(names), generator.config.num_classes)
            names = None
        conditions: list = parse_labels(args.labels, generator.config.num_classes, names)
        row_labels = [f"{c}: {names[c]}" if names else f"class {c}" for c in conditions]
    else:
        conditions = [p for p in args.prompts if p.strip()]
        if len(conditions) != len(args.prompts):
            raise ValueError("--prompts: empty prompt")
        row_labels = list(conditions)
    args.num_tokens = args.num_tokens or generator.max_tokens
    if args.num_tokens > generator.max_tokens:
        raise ValueError(f"--num-tokens {args.num_tokens} exceeds this generator's K = {generator.max_tokens}")

    tok_arg = fetch_checkpoint(args.tokenizer, args.storage_options) if args.tokenizer else None
    tok_spec = resolve_tokenizer(generator, gen_path, tok_arg)
    tokenizer = load_model(tok_spec, device=device)
    generator.check_tokenizer(tokenizer.config)
    log.info("generator %s (%s-conditional), tokenizer %s", gen_path, generator.config.cond, tokenizer.checkpoint_id)
    if args.compile:
        from flextok.compile import compile_blocks

        log.info("compiled %d transformer blocks", compile_blocks(generator) + compile_blocks(tokenizer.decoder))

    per = args.per_condition
    expanded = [c for c in conditions for _ in range(per)]
    rng = torch.Generator(device=device).manual_seed(args.seed)
    cfg = None if args.cfg_scale == 1.0 else args.cfg_scale  # 1 = conditional only; skip the null rows
    tokens, images = sample(
        generator, tokenizer, expanded, num_tokens=args.num_tokens, batch_size=args.batch_size,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg_scale=cfg,
        decoder_steps=args.decoder_steps, decoder_guidance=args.decoder_guidance, decoder_apg=args.decoder_apg, rng=rng,
        on_batch=lambda done, total: log.info("sampled %d/%d", done, total), precision=precision,
    )
    R = len(conditions)
    grid = images.view(R, per, *images.shape[1:])  # (R, per, 3, H, W)
    out = viz.save_grid(args.out, grid, row_labels=row_labels)
    if generator.config.use_eos:
        from flextok.generator import token_lengths

        lengths = token_lengths(tokens).float()
        k_text = f"k chosen by the generator: mean {lengths.mean():.1f}, {int(lengths.min())}..{int(lengths.max())} of at most {args.num_tokens}"
    else:
        k_text = f"k={args.num_tokens}"
    lines = [f"grid {out} ({R} conditions x {per}, {k_text})"]

    if args.save_images is not None:
        args.save_images.mkdir(parents=True, exist_ok=True)
        paths = [  # condition number, condition, sample index: unique even when a condition repeats
            args.save_images / f"{i:03d}-{viz.slug(row_labels[i])}_{j:03d}.png"
            for i in range(len(conditions)) for j in range(per)
        ]
        viz.save_images(images, paths)
        lines.append(f"{len(paths)} images in {args.save_images}")
    if args.save_tokens is not None:
        settings = {
            "generator": str(gen_path), "num_tokens": args.num_tokens, "cfg_scale": args.cfg_scale,
            "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
            "precision": precision,
        }
        write_tokens(args.save_tokens, tokens, conditions, is_class=is_class, generator_path=str(gen_path),
                     tokenizer=tokenizer, image_size=tokenizer.config.image_size, settings=settings)
        lines.append(f"tokens {args.save_tokens}")
    print(f"sample: {len(expanded)} images in {time.perf_counter() - start:.1f} s: " + "; ".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("flextok sample", _run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
