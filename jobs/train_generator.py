"""`flextok train-generator --tokens DST --output RUN --cond {class,text}`: train an AR generator.

Reads the token Parquet of `flextok tokenize` (DESIGN §2.3) with `ray.data.read_parquet`; each
worker pads its ragged `tokens` lists with an Arrow-level collate (`training.data.TokenCollate`).
Class labels come from the `label` column, captions from `caption` (encoded by the frozen text
encoder in the loop, each distinct caption once per worker, then cached); CFG dropout is the
generator's own. The tokenizer id and sha256 in the Parquet file metadata are recorded in the
generator checkpoint. Every `--grid-every` steps and at the end, RUN/grids/step_<n>.png shows
samples decoded by that tokenizer (when it is a file: a random preset has nothing to show).

    flextok train-generator --tokens tokens/fm --output runs/gen-fm --cond class --max-steps 3000
    flextok train-generator --tokens tokens/emoji --output runs/gen-emoji --cond text
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from jobs.cli_util import finite_float, positive_int, run_cli

log = logging.getLogger("jobs.train_generator")

DEFAULT_PRESET = "tiny"
MAX_INFERRED_CLASSES = 100_000  # a larger id without --num-classes is a broken label, not a class count


def build_parser() -> argparse.ArgumentParser:
    from jobs.train_flags import add_init_arg, add_token_budget_args, add_train_args, add_val_args
    from training.settings import TrainConfig

    p = argparse.ArgumentParser(
        prog="flextok train-generator",
        description="Train a class- or text-conditional autoregressive generator on FlexTok token shards "
        "with Ray Train (DDP). Checkpoints, TensorBoard events, sample grids and the final "
        "model.safetensors go to RUN; re-running the same command resumes.",
    )
    p.add_argument("--tokens", required=True, help="token dataset DST written by `flextok tokenize` (local or s3://)")
    p.add_argument("--output", required=True, help="run folder RUN (local or s3://)")
    p.add_argument("--cond", required=True, choices=("class", "text"),
                   help="condition on the `label` column or on the `caption` column")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer checkpoint to decode sample grids (default: the one named in DST's metadata)")
    from flextok.gpt import GPT_PRESETS

    g = p.add_argument_group("architecture (a preset, then any override)")
    g.add_argument("--preset", choices=sorted(GPT_PRESETS), default=None, help=f"default {DEFAULT_PRESET}")
    g.add_argument("--depth", type=positive_int, help="transformer blocks")
    g.add_argument("--dim", type=positive_int, help="model width")
    g.add_argument("--num-heads", type=positive_int, help="attention heads (dim / heads must be even)")
    g.add_argument("--num-classes", type=positive_int, help="class count (default: the corpus's named classes, else largest label in DST + 1)")
    g.add_argument("--text-encoder", default=None, help="frozen text encoder (default: the offline MiniLM)")
    g.add_argument("--max-text-tokens", type=positive_int, default=None,
                   help="captions are cut to this many encoder tokens (default 32)")
    g.add_argument("--cond-dropout", type=finite_float, default=None, help="probability of the null condition (CFG)")
    g.add_argument("--eos", action=argparse.BooleanOptionalAction, default=None,
                   help="an end-of-sequence id after the codebook: the generator learns where each row ends and "
                   "stops there when sampling. Default: on for tokens of an adaptive-length run "
                   "(`flextok tokenize --adaptive-...`), off otherwise; on rows that keep all K tokens "
                   "(--adaptive-keep-all) it trains on each row's chosen prefix")
    g = p.add_argument_group("grids")
    g.add_argument("--grid-conditions", type=positive_int, default=8, help="classes or captions per grid (default %(default)s)")
    g.add_argument("--grid-per-condition", type=positive_int, default=4, help="samples each (default %(default)s)")
    g.add_argument("--grid-cfg", type=finite_float, default=3.0, help="CFG scale of grid samples (default %(default)s)")
    g.add_argument("--grid-steps", type=positive_int, default=25, help="decoder Euler steps (default %(default)s)")
    # Token rows are small (512 B at 256 tokens): a 65,536-row shuffle window (34 MB) mixes 1,024 slices
    # of the corpus, so tokens written in class order still give batches of many classes.
    add_train_args(p, TrainConfig(lr=1e-3, batch_size=64, max_steps=2000, warmup_steps=100, weight_decay=0.05,
                                  shuffle_buffer=65536))
    add_token_budget_args(p)
    add_init_arg(p, "generator")
    add_val_args(p, "--val-tokens", "token rows (a `flextok tokenize` output of held-out images, same tokenizer)")
    return p


def init_config(args: argparse.Namespace, data, init_path: str):
    """With --init: the checkpoint's config (CFG dropout may change), checked against DST and --cond."""
    from flextok.checkpoint import read_metadata
    from flextok.gpt import GPTConfig
    from flextok.runs import speaks_tokens_of

    shaped = [flag for flag in ("preset", "depth", "dim", "num_heads", "num_classes", "text_encoder", "max_text_tokens",
                                "eos") if getattr(args, flag) is not None]
    if shaped:
        raise ValueError(f"--init takes the architecture from {init_path}; drop "
                         + ", ".join("--" + f.replace("_", "-") for f in shaped))
    md = read_metadata(init_path)
    if md.get("kind") != "Generator":
        raise ValueError(f"--init {init_path} holds a {md.get('kind')!r}, not a generator")
    config = GPTConfig.from_dict(json.loads(md["config"]))
    if config.cond != args.cond:
        raise ValueError(f"--init {init_path} is {config.cond}-conditional; this run is --cond {args.cond}")
    if (config.codebook_size, config.max_tokens) != (data.metadata["codebook_size"], data.metadata["max_tokens"]):
        raise ValueError(f"--init {init_path} speaks {config.codebook_size} codes x K={config.max_tokens}; "
                         f"{args.tokens} has {data.metadata['codebook_size']} x K={data.metadata['max_tokens']}")
    recorded, tokens_sha = md.get("tokenizer_sha256") or None, data.metadata.get("checkpoint_sha256")
    if recorded and tokens_sha and recorded != tokens_sha and not speaks_tokens_of(data.metadata.get("checkpoint_id"), recorded):
        raise ValueError(f"--init {init_path} was trained on tokens of tokenizer {recorded[:12]}…, {args.tokens} "
                         f"comes from {tokens_sha[:12]}…: its tokens mean other things")
    if config.cond == "class":
        check_labels(data, config.num_classes, args.tokens, f"--init {init_path} knows {config.num_classes} classes")
    return config.replace(cond_dropout_prob=args.cond_dropout) if args.cond_dropout is not None else config


def use_eos(args: argparse.Namespace, data) -> bool:
    """--eos as given, else whether DST's rows are adaptive-length prefixes (all K tokens kept: off)."""
    target = data.metadata.get("length_target")
    if args.eos is not None:
        return args.eos
    return bool(target) and not target.get("keep_all_tokens")


def cuts_to_chosen_prefix(data, eos: bool) -> bool:
    """An EOS generator on `--adaptive-keep-all` rows trains on each row's chosen prefix (then EOS)."""
    target = data.metadata.get("length_target")
    return eos and bool(target) and bool(target.get("keep_all_tokens"))


def check_labels(data, num_classes: int, tokens: str, known: str) -> None:
    """Every class id in DST within 0..num_classes-1 (checked from the footers, before any worker starts)."""
    if data.min_label is not None and data.min_label < 0:
        raise ValueError(f"{tokens} has label {data.min_label}: class ids must be 0..{num_classes - 1}")
    if data.max_label is not None and data.max_label >= num_classes:
        raise ValueError(f"{tokens} has label {data.max_label}, outside 0..{num_classes - 1} ({known})")


def generator_config(args: argparse.Namespace, data):
    from flextok.gpt import GPTConfig

    changes: dict[str, Any] = {"codebook_size": data.metadata["codebook_size"], "max_tokens": data.metadata["max_tokens"],
                               "cond": args.cond, "use_eos": use_eos(args, data)}
    for flag, field in (("depth", "depth"), ("dim", "dim"), ("num_heads", "num_heads"),
                        ("cond_dropout", "cond_dropout_prob")):
        if getattr(args, flag) is not None:
            changes[field] = getattr(args, flag)
    if args.cond == "class":
        if data.max_label is None and args.num_classes is None:
            raise ValueError(f"{args.tokens} has no class labels; use --cond text or tokens of a labelled corpus")
        # The corpus's class names, when known, define the label space (a class may be absent here).
        named = len(data.metadata.get("class_names") or ())
        if args.num_classes:
            changes["num_classes"], known = args.num_classes, f"--num-classes {args.num_classes}"
        elif named:
            changes["num_classes"], known = named, f"the corpus names {named} classes"
        else:
            changes["num_classes"], known = data.max_label + 1, "class ids count from 0"
            if changes["num_classes"] > MAX_INFERRED_CLASSES:
                raise ValueError(f"{args.tokens} has label {data.max_label}: more than {MAX_INFERRED_CLASSES:,} classes "
                                 "inferred from the largest id; give --num-classes if the corpus really has that many")
        check_labels(data, changes["num_classes"], args.tokens, known)
        if args.text_encoder or args.max_text_tokens:
            raise ValueError("--text-encoder and --max-text-tokens are for --cond text")
    else:
        if not data.has_captions:
            raise ValueError(f"{args.tokens} has no captions; use --cond class or tokens of a captioned corpus")
        if args.num_classes is not None:
            raise ValueError("--num-classes is for --cond class")
        if args.text_encoder:
            changes["text_encoder"] = args.text_encoder
            if args.text_encoder != GPTConfig.from_preset(args.preset or DEFAULT_PRESET, cond="text").text_encoder:
                from flextok.text_encoder import load_text_encoder

                changes["text_dim"] = load_text_encoder(args.text_encoder, max_length=1).dim
        if args.max_text_tokens:
            changes["num_prefix_tokens"] = args.max_text_tokens
    return GPTConfig.from_preset(args.preset or DEFAULT_PRESET, **changes)


def _run(args: argparse.Namespace) -> int:
    from jobs.train_flags import train_config_from_args
    from pipelines.sources import effective_storage_options
    from pipelines.writer import OutputStore
    from training.data import VAL, inspect_tokens, token_dataset, token_source
    from training.driver import run_training, summary_line
    from training.runs import resolve_grid_tokenizer, resolve_init
    from training.tasks import GeneratorTask

    cfg = train_config_from_args(args)
    store = OutputStore(args.tokens, effective_storage_options(args.tokens, args.storage_options))
    if not store.exists(""):
        raise FileNotFoundError(f"--tokens {args.tokens} does not exist")
    data = inspect_tokens(store)
    init_path, init_local, init_sha256 = resolve_init(args.init, args.storage_options)
    config = init_config(args, data, init_local) if init_path else generator_config(args, data)
    if cfg.token_budget is not None:
        if cfg.pack_length is not None and cfg.pack_length < config.max_seq_len:
            raise ValueError(f"--pack-length {cfg.pack_length} is shorter than the longest sequence "
                             f"({config.max_seq_len} positions: condition + K tokens)")
        row = cfg.pack_length or config.max_seq_len
        if cfg.micro_token_budget < row:
            parts = cfg.num_workers * cfg.grad_accum
            raise ValueError(f"--token-budget {cfg.token_budget} leaves {cfg.micro_token_budget} positions per micro-batch "
                             f"({cfg.num_workers} worker(s) x {cfg.grad_accum} accumulation steps), fewer than a "
                             f"{'packed row' if cfg.pack_length else 'longest sequence'}'s {row}; use at least "
                             f"{row * parts}")
    elif data.num_rows < cfg.batch_size:
        raise ValueError(f"{args.tokens} holds {data.num_rows} token rows, fewer than --batch-size {cfg.batch_size}")
    md = data.metadata
    class_names = tuple(md.get("class_names") or ()) if args.cond == "class" else ()
    if class_names and len(class_names) != config.num_classes:
        log.warning("%d class names in the token metadata for %d classes: not recorded", len(class_names),
                    config.num_classes)
        class_names = ()
    task = GeneratorTask(
        config=config, tokenizer_id=md.get("checkpoint_id"), tokenizer_sha256=md.get("checkpoint_sha256"),
        tokenizer_path=resolve_grid_tokenizer(args.tokenizer, md), grid_conditions=args.grid_conditions,
        grid_per_condition=args.grid_per_condition, grid_cfg=args.grid_cfg, grid_steps=args.grid_steps,
        class_names=class_names, init_path=init_path, init_sha256=init_sha256,
        init_storage_options=dict(args.storage_options or {}),
        length_target=json.dumps(md["length_target"], sort_keys=True) if md.get("length_target") else None,
    )

    val = None
    if args.val_tokens:
        val_store = OutputStore(args.val_tokens, effective_storage_options(args.val_tokens, args.storage_options))
        if not val_store.exists(""):
            raise FileNotFoundError(f"--val-tokens {args.val_tokens} does not exist")
        val = inspect_tokens(val_store)
        for key in ("checkpoint_sha256", "codebook_size", "max_tokens"):
            if val.metadata.get(key) != md.get(key):
                raise ValueError(f"--val-tokens {args.val_tokens} has {key}={val.metadata.get(key)!r}, --tokens has "
                                 f"{md.get(key)!r}: held-out tokens must come from the same tokenizer")

    def datasets() -> dict:
        log.info("tokens: %s, %d rows in %d file(s), codebook %d, K %d, tokenizer %s", args.tokens, data.num_rows,
                 len(data.paths), md["codebook_size"], md["max_tokens"], md.get("checkpoint_id"))
        out = {"train": token_source(args.tokens, effective_storage_options(args.tokens, args.storage_options), data,
                                     args.cond, cfg.shuffle_buffer,
                                     chosen_prefix=cuts_to_chosen_prefix(data, config.use_eos))}
        if val is not None:
            out[VAL] = token_dataset(val_store, val, args.cond, chosen_prefix=cuts_to_chosen_prefix(val, config.use_eos)
                                     ).limit(args.val_items).materialize()
        return out

    summary = run_training(task, datasets, cfg, run_url=args.output, storage_options=args.storage_options,
                              job="train-generator", quiet=args.quiet)
    print(summary_line("train-generator", summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("flextok train-generator", _run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
