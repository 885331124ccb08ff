"""`flextok train-generator --tokens DST --output RUN --cond {class,text}`: train an AR generator.

Reads the token Parquet of `flextok tokenize` (DESIGN §2.3) with `ray.data.read_parquet`; each
worker pads its ragged `tokens` lists with an Arrow-level collate (`jobs.train_common.TokenCollate`).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.cli_util import positive_int, run_cli

log = logging.getLogger("jobs.train_generator")

DEFAULT_PRESET = "tiny"
MAX_CACHED_CAPTIONS = 200_000  # per worker; beyond that captions are encoded batch by batch
_TEXT_ENCODERS: dict[tuple[str, int, str], Any] = {}  # per process: (name, max_length, device) -> encoder
_CAPTION_CACHE: dict[tuple[str, str], Any] = {}  # (encoder name, caption) -> states (n, E) on device
_TOKENIZERS: dict[tuple[str, str], Any] = {}  # (path, device) -> FlexTok for grids


def build_parser() -> argparse.ArgumentParser:
    from jobs.train_common import TrainConfig, add_init_arg, add_train_args, add_val_args

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
    g.add_argument("--cond-dropout", type=float, default=None, help="probability of the null condition (CFG)")
    g = p.add_argument_group("grids")
    g.add_argument("--grid-conditions", type=positive_int, default=8, help="classes or captions per grid (default %(default)s)")
    g.add_argument("--grid-per-condition", type=positive_int, default=4, help="samples each (default %(default)s)")
    g.add_argument("--grid-cfg", type=float, default=3.0, help="CFG scale of grid samples (default %(default)s)")
    g.add_argument("--grid-steps", type=positive_int, default=25, help="decoder Euler steps (default %(default)s)")
    add_train_args(p, TrainConfig(lr=1e-3, batch_size=64, max_steps=2000, warmup_steps=100, weight_decay=0.05))
    add_init_arg(p, "generator")
    add_val_args(p, "--val-tokens", "token rows (a `flextok tokenize` output of held-out images, same tokenizer)")
    return p


def text_encoder(name: str, max_length: int, device) -> Any:
    """The frozen text encoder, loaded once per worker process."""
    from flextok.text_encoder import load_text_encoder

    key = (name, max_length, str(device))
    if key not in _TEXT_ENCODERS:
        _TEXT_ENCODERS[key] = load_text_encoder(name, max_length=max_length, device=device)
    return _TEXT_ENCODERS[key]


def encode_captions(encoder: Any, captions: list[str]) -> tuple[Any, Any]:
    """Captions -> (states (B, T, E), mask (B, T)) as `TextEncoder.encode` gives, from a cache."""
    import torch

    missing = [c for c in dict.fromkeys(captions) if (encoder.name, c) not in _CAPTION_CACHE]
    fresh = {}
    if missing:
        states, mask = encoder.encode(missing)  # (M, T, E), (M, T), valid tokens first
        for i, caption in enumerate(missing):
            fresh[caption] = states[i, : int(mask[i].sum())]  # (n, E)
        if len(_CAPTION_CACHE) + len(fresh) <= MAX_CACHED_CAPTIONS:
            _CAPTION_CACHE.update({(encoder.name, c): s for c, s in fresh.items()})
    rows = [fresh[c] if c in fresh else _CAPTION_CACHE[(encoder.name, c)] for c in captions]
    lengths = torch.tensor([len(r) for r in rows], device=rows[0].device)
    states = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (B, T, E), zero padded
    mask = torch.arange(states.shape[1], device=states.device)[None, :] < lengths[:, None]  # (B, T)
    return states, mask


@dataclass(frozen=True)
class GeneratorTask:
    """The generator's hooks for `jobs.train_common` (shipped to every worker)."""

    config: Any  # GPTConfig
    tokenizer_id: str | None
    tokenizer_sha256: str | None
    tokenizer_path: str | None = None  # decodes grids; None = no grids
    class_names: tuple[str, ...] = ()  # names of the labels, recorded in the checkpoint for `flextok sample`
    init_path: str | None = None  # fine-tuning: the weights to start from
    init_sha256: str | None = None
    grid_conditions: int = 8
    grid_per_condition: int = 4
    grid_cfg: float = 3.0
    grid_steps: int = 25
    name: str = "generator"
    item_name: str = "tokens"

    @property
    def find_unused_parameters(self) -> bool:
        # The learned null prefix enters the graph only through CFG dropout.
        return self.config.cond == "text" and self.config.cond_dropout_prob == 0

    def _encoder(self, device):
        return text_encoder(self.config.text_encoder, self.config.num_prefix_tokens, device)

    def build_model(self, device):
        import torch

        from flextok.generator import Generator

        encoder = self._encoder(device) if self.config.cond == "text" else None
        with torch.device(device):
            model = Generator(self.config, text_encoder=encoder, tokenizer_id=self.tokenizer_id,
                              tokenizer_sha256=self.tokenizer_sha256)
        if self.init_path is not None:
            model.load_state_dict(Generator.from_pretrained(self.init_path, device=device).state_dict(), strict=True)
        return model

    def collate_fn(self):
        from jobs.train_common import TokenCollate

        return TokenCollate(labels=self.config.cond == "class", captions=self.config.cond == "text")

    def prepare_batch(self, batch, device) -> dict[str, Any]:
        from jobs.train_common import batch_to_device

        out = {"num_tokens": int(batch["lengths"].sum()), **batch_to_device(batch, device)}
        if self.config.cond == "class":
            out["cond"] = out["label"]
        else:
            out["cond"] = encode_captions(self._encoder(device), batch["caption"])
        return out

    def loss(self, model, batch, generator):
        return model(batch["tokens"], batch["cond"], generator=generator)

    def num_items(self, batch) -> int:
        return batch["num_tokens"]

    def save_pretrained(self, model, path, *, step: int) -> None:
        extra: dict[str, Any] = {"step": step}
        if self.class_names:
            extra["class_names"] = list(self.class_names)
        model.save_pretrained(path, extra=extra)

    def _tokenizer(self, device):
        from flextok import FlexTok

        key = (self.tokenizer_path, str(device))
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = FlexTok.from_pretrained(self.tokenizer_path, device=device).eval()
        return _TOKENIZERS[key]

    def grid(self, model, batch):
        """Rows: classes 0.. (or captions seen in training), `grid_per_condition` samples each."""
        import torch

        if self.tokenizer_path is None:
            return None
        if self.config.cond == "class":
            conditions: list[Any] = list(range(min(self.config.num_classes, self.grid_conditions)))
            labels = [f"{c}: {self.class_names[c]}" if self.class_names else f"class {c}" for c in conditions]
        else:
            conditions = list(dict.fromkeys(batch["caption"]))[: self.grid_conditions]
            labels = list(conditions)
        n = self.grid_per_condition
        device = next(model.parameters()).device
        g = torch.Generator(device=device).manual_seed(0)
        expanded = [c for c in conditions for _ in range(n)]
        cond = torch.tensor(expanded, device=device) if self.config.cond == "class" else encode_captions(
            self._encoder(device), expanded)
        tokens = model.generate(cond, cfg_scale=self.grid_cfg, generator=g)  # (R * n, K)
        images = self._tokenizer(device).detokenize(tokens, steps=self.grid_steps, generator=g)
        return images.view(len(conditions), n, *images.shape[1:]), labels, None  # (R, n, 3, H, W)

    def describe(self) -> dict[str, Any]:
        described = {"kind": "Generator", "config": self.config.to_dict(), "tokenizer_id": self.tokenizer_id,
                     "tokenizer_sha256": self.tokenizer_sha256}
        if self.init_path is not None:
            described.update(init=self.init_path, init_sha256=self.init_sha256)
        return described


# The token dataset --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenData:
    """What the driver learns about DST from the Parquet footers alone."""

    paths: list[str]
    num_rows: int
    metadata: dict[str, Any]
    max_label: int | None
    has_captions: bool


def inspect_tokens(store) -> TokenData:
    """List DST's part files and read their footers: schema metadata, row counts, label statistics."""
    import pyarrow.parquet as pq

    from pipelines.schema import read_file_metadata

    names = [n for n in store.listdir("") if n.startswith("part-") and n.endswith(".parquet")]
    if not names:
        raise FileNotFoundError(f"no token files (part-*.parquet) in {store.url}; run `flextok tokenize` first")
    metadata: dict[str, Any] | None = None
    num_rows, max_label, has_captions = 0, None, False
    for name in names:
        with store.fs.open(store.path(name), "rb") as f:
            pf = pq.ParquetFile(f)
            md = read_file_metadata(pf.schema_arrow)
            names_in_file = pf.schema_arrow.names
            if "tokens" not in names_in_file:
                raise ValueError(f"{name} has no `tokens` column; not a flextok token file")
            if metadata is None:
                metadata = md
            for key in ("checkpoint_sha256", "checkpoint_id", "codebook_size", "max_tokens"):
                if md.get(key) != metadata.get(key):
                    raise ValueError(f"{name} was tokenized with {key}={md.get(key)!r}, other files with "
                                     f"{metadata.get(key)!r}; one token dataset must come from one tokenizer")
            num_rows += pf.metadata.num_rows
            if "label" in names_in_file:
                max_label = _max_label(pf, names_in_file.index("label"), max_label)
            has_captions = has_captions or "caption" in names_in_file
    assert metadata is not None, "no files"
    for key in ("codebook_size", "max_tokens"):
        if key not in metadata:
            raise ValueError(f"{store.url} carries no flextok metadata ({key}); tokens must come from `flextok tokenize`")
    return TokenData([store.path(n) for n in names], num_rows, metadata, max_label, has_captions)


def _max_label(pf, column: int, current: int | None) -> int | None:
    """Largest label from the row-group statistics (the column itself when they are missing)."""
    import pyarrow.compute as pc

    for i in range(pf.metadata.num_row_groups):
        stats = pf.metadata.row_group(i).column(column).statistics
        if stats is not None and stats.has_min_max:
            value = int(stats.max)
        elif stats is not None and stats.null_count == pf.metadata.row_group(i).num_rows:
            continue
        else:
            value = pc.max(pf.read_row_group(i, columns=["label"])["label"]).as_py()
            if value is None:
                continue
        current = value if current is None else max(current, value)
    return current


def conditioned_rows(batch, *, column: str):
    """Token rows that carry their condition (a label or a caption); the others are dropped."""
    import pyarrow.compute as pc

    return batch.filter(pc.is_valid(batch[column]))


def token_dataset(store, data: TokenData, cond: str, order_seed: int | None = None):
    """Ray Dataset of (tokens, label | caption) rows read straight from DST's Parquet files.

    With `order_seed` the files are read in a seeded order that changes at every epoch (execution);
    without it, in listing order (held-out data).
    """
    import pyarrow.fs
    import ray.data

    column = "label" if cond == "class" else "caption"
    filesystem = None if store.is_local else pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(store.fs))
    shuffle = None if order_seed is None else ray.data.FileShuffleConfig(seed=order_seed, reseed_after_execution=True)
    ds = ray.data.read_parquet(data.paths, filesystem=filesystem, shuffle=shuffle).select_columns(["tokens", column])
    return ds.map_batches(conditioned_rows, batch_format="pyarrow", fn_kwargs={"column": column})


def resolve_grid_tokenizer(explicit: str | None, metadata: dict[str, Any]) -> str | None:
    """A tokenizer file to decode grids, or None (with a log line) when only a random preset is known."""
    from flextok.checkpoint import file_sha256, resolve_weights_path

    if explicit is not None:
        path = resolve_weights_path(explicit)  # one clear error when missing
        sha = metadata.get("checkpoint_sha256")
        if sha and file_sha256(path) != sha:
            raise ValueError(f"--tokenizer {explicit} is not the tokenizer these tokens were made with "
                             f"(sha256 {sha[:12]}…)")
        return str(path)
    recorded = metadata.get("checkpoint_id") or ""
    if recorded.startswith("preset:") or not recorded:
        log.info("tokens come from %s (random weights): no sample grids", recorded or "an unknown tokenizer")
        return None
    if not Path(recorded).exists():
        log.info("tokenizer %s named in the token metadata is not here: no sample grids (pass --tokenizer)", recorded)
        return None
    return str(resolve_weights_path(recorded))


def init_config(args: argparse.Namespace, data: TokenData, init_path: str):
    """With --init: the checkpoint's config (CFG dropout may change), checked against DST and --cond."""
    from flextok.checkpoint import read_metadata
    from flextok.gpt import GPTConfig

    shaped = [flag for flag in ("preset", "depth", "dim", "num_heads", "num_classes", "text_encoder", "max_text_tokens")
              if getattr(args, flag) is not None]
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
    if recorded and tokens_sha and recorded != tokens_sha and not _keeps_tokens_of(data.metadata.get("checkpoint_id"), recorded):
        raise ValueError(f"--init {init_path} was trained on tokens of tokenizer {recorded[:12]}…, {args.tokens} "
                         f"comes from {tokens_sha[:12]}…: its tokens mean other things")
    if config.cond == "class" and data.max_label is not None and data.max_label >= config.num_classes:
        raise ValueError(f"{args.tokens} has label {data.max_label}; --init {init_path} knows {config.num_classes} classes")
    return config.replace(cond_dropout_prob=args.cond_dropout) if args.cond_dropout is not None else config


def _keeps_tokens_of(tokenizer: str | None, sha256: str) -> bool:
    """Whether the tokenizer that made the tokens (a readable checkpoint) emits the same tokens as the
    checkpoint `sha256` (it is that checkpoint, or a decoder-only fine-tune of it)."""
    from flextok.checkpoint import same_tokens_shas

    try:
        return bool(tokenizer) and sha256 in same_tokens_shas(Path(tokenizer).expanduser())
    except (OSError, ValueError):
        return False


def generator_config(args: argparse.Namespace, data: TokenData):
    from flextok.gpt import GPTConfig

    changes: dict[str, Any] = {"codebook_size": data.metadata["codebook_size"], "max_tokens": data.metadata["max_tokens"],
                               "cond": args.cond}
    for flag, field in (("depth", "depth"), ("dim", "dim"), ("num_heads", "num_heads"),
                        ("cond_dropout", "cond_dropout_prob")):
        if getattr(args, flag) is not None:
            changes[field] = getattr(args, flag)
    if args.cond == "class":
        if data.max_label is None and args.num_classes is None:
            raise ValueError(f"{args.tokens} has no class labels; use --cond text or tokens of a labelled corpus")
        # The corpus's class names, when known, define the label space (a class may be absent here).
        named = len(data.metadata.get("class_names") or ())
        changes["num_classes"] = args.num_classes or max(named, data.max_label + 1 if data.max_label is not None else 0)
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
    from jobs import train_common as tc
    from pipelines.sources import effective_storage_options
    from pipelines.writer import OutputStore

    cfg = tc.train_config_from_args(args)
    store = OutputStore(args.tokens, effective_storage_options(args.tokens, args.storage_options))
    if not store.exists(""):
        raise FileNotFoundError(f"--tokens {args.tokens} does not exist")
    data = inspect_tokens(store)
    init_path, init_sha256 = tc.resolve_init(args.init)
    config = init_config(args, data, init_path) if init_path else generator_config(args, data)
    if data.num_rows < cfg.batch_size:
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

    def datasets(order_seed: int) -> dict:
        log.info("tokens: %s, %d rows in %d file(s), codebook %d, K %d, tokenizer %s", args.tokens, data.num_rows,
                 len(data.paths), md["codebook_size"], md["max_tokens"], md.get("checkpoint_id"))
        out = {"train": token_dataset(store, data, args.cond, order_seed)}
        if val is not None:
            out[tc.VAL] = token_dataset(val_store, val, args.cond).limit(args.val_items).materialize()
        return out

    summary = tc.run_training(task, datasets, cfg, run_url=args.output, storage_options=args.storage_options,
                              job="train-generator", quiet=args.quiet)
    print(tc.summary_line("train-generator", summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("flextok train-generator", _run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
