"""`flextok train-tokenizer --data SRC --output RUN`: train a FlexTok tokenizer with Ray Train.

Images come through Ray Data with the pipeline's own readers and decoding (`pipelines.sources`,
`pipelines.decode`: WebDataset shards, image folders or Parquet image bytes from any fsspec URL),
so training sees exactly what `flextok tokenize` sees. The loop, checkpoints, resume and metrics are
`jobs.train_common`'s. Every `--grid-every` steps and at the end, RUN/grids/step_<n>.png shows a
few training images reconstructed from their first k = 1, 2, 4, ..., K tokens.

    flextok corpus fashion-mnist --out data/fm
    flextok train-tokenizer --data data/fm --output runs/tok --max-steps 2000
    flextok train-tokenizer --data s3://bucket/corpus --output s3://bucket/runs/tok --workers 8 --gpus
Re-running the same command resumes from RUN's last checkpoint; on a finished RUN it does nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jobs.cli_util import positive_int, run_cli

log = logging.getLogger("jobs.train_tokenizer")

DEFAULT_PRESET = "tiny"
# Architecture flags -> FlexTokConfig fields (None = keep the preset's value).
ARCH_FLAGS = {
    "image_size": "image_size", "patch_size": "patch_size", "num_registers": "num_registers",
    "encoder_depth": "encoder_depth", "encoder_dim": "encoder_dim", "decoder_depth": "decoder_depth",
    "decoder_dim": "decoder_dim", "head_dim": "head_dim", "nested_dropout": "nested_dropout_mode",
    "full_k_fraction": "full_k_fraction",
    "time_sampling": "time_sampling", "uniform_time_fraction": "uniform_time_fraction",
    "noise_time_fraction": "noise_time_fraction",
    "cond_dropout": "cond_dropout_prob",
}
# The flags that only change how the model trains: allowed with --init (fine-tuning).
TRAINING_FLAGS = (
    "nested_dropout", "full_k_fraction", "time_sampling", "uniform_time_fraction", "noise_time_fraction",
    "cond_dropout",
)


def _levels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 8,5,5,5, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from jobs.train_common import TrainConfig, add_init_arg, add_train_args, add_val_args

    p = argparse.ArgumentParser(
        prog="flextok train-tokenizer",
        description="Train a FlexTok tokenizer with Ray Train (DDP) on an image corpus read by Ray Data. "
        "Checkpoints, TensorBoard events, grids and the final model.safetensors go to RUN; re-running "
        "the same command resumes.",
    )
    p.add_argument("--data", required=True, help="images: WebDataset .tar shards, an image folder or Parquet "
                   "with image bytes; a local path or fsspec URL (s3://...), globs and {a..b} patterns")
    p.add_argument("--output", required=True, help="run folder RUN (local or s3://)")
    from flextok.config import NESTED_DROPOUT_MODES, TIME_SAMPLING_MODES, TOKENIZER_PRESETS

    g = p.add_argument_group("architecture (a preset, then any override)")
    g.add_argument("--preset", choices=sorted(TOKENIZER_PRESETS), default=None,
                   help=f"architecture to start from (default {DEFAULT_PRESET}: 32px, K=32, 1,000 codes)")
    g.add_argument("--image-size", type=positive_int, help="square image side in pixels")
    g.add_argument("--patch-size", type=positive_int, help="patch side in latent pixels")
    g.add_argument("--num-registers", type=positive_int, help="K, the most tokens per image")
    g.add_argument("--encoder-depth", type=positive_int, help="encoder transformer blocks")
    g.add_argument("--encoder-dim", type=positive_int, help="encoder width (a multiple of --head-dim)")
    g.add_argument("--decoder-depth", type=positive_int,
                   help="decoder transformer blocks; with --init, more than the checkpoint's grows its decoder "
                   "(new blocks start as the identity, so training starts from the checkpoint's reconstructions)")
    g.add_argument("--decoder-dim", type=positive_int, help="decoder width (a multiple of --head-dim)")
    g.add_argument("--head-dim", type=positive_int, help="attention head width")
    g.add_argument("--fsq-levels", type=_levels, help="FSQ levels, e.g. 8,5,5,5 (1,000 codes)")
    g.add_argument("--nested-dropout", choices=NESTED_DROPOUT_MODES, help="how k is drawn in training")
    g.add_argument("--full-k-fraction", type=float,
                   help="fraction of examples that keep all K tokens (the rest draw k by --nested-dropout): "
                   "trains the last tokens more often than nested dropout alone")
    g.add_argument("--time-sampling", choices=TIME_SAMPLING_MODES, help="flow time distribution")
    g.add_argument("--uniform-time-fraction", type=float, help="fraction of flow times drawn uniformly")
    g.add_argument("--noise-time-fraction", type=float,
                   help="fraction of examples at t = 1 (pure noise), where one decoder step is the mean "
                   "reconstruction: raises PSNR with few-step decoding")
    g.add_argument("--cond-dropout", type=float, help="probability of the null condition (CFG training)")
    g = p.add_argument_group("grids")
    g.add_argument("--grid-images", type=positive_int, default=8, help="images per grid (default %(default)s)")
    g.add_argument("--grid-steps", type=positive_int, default=25, help="decoder Euler steps in grids (default %(default)s)")
    add_train_args(p, TrainConfig(lr=1e-3, batch_size=64, max_steps=1000, warmup_steps=100))
    add_init_arg(p, "tokenizer (ours or an official FlexTok release)")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="with --init: train the flow decoder only; the tokens stay exactly the init's, so token "
                   "datasets and generators made with it stay valid (recorded as same_tokens_as_sha256)")
    add_val_args(p, "--val-data", "images (what --data takes)")
    return p


@dataclass(frozen=True)
class TokenizerTask:
    """The tokenizer's hooks for `jobs.train_common` (shipped to every worker)."""

    config: Any  # FlexTokConfig
    preset: str | None
    grid_images: int = 8
    grid_steps: int = 25
    name: str = "tokenizer"
    item_name: str = "images"
    find_unused_parameters: bool = False  # mask and null tokens enter the graph through torch.where
    init_path: str | None = None  # fine-tuning: the weights to start from
    init_sha256: str | None = None
    same_tokens_as: tuple[str, ...] = ()  # --freeze-encoder: the checkpoints whose tokens this run keeps

    def build_model(self, device):
        from flextok import FlexTok

        model = FlexTok.from_config(self.config, device)
        if self.init_path is not None:
            init = FlexTok.from_pretrained(self.init_path, device=device)
            if init.config.decoder_depth < self.config.decoder_depth:  # --decoder-depth grows the decoder
                model.load_with_fewer_decoder_blocks(init.state_dict())
            else:
                model.load_state_dict_strict(init.state_dict())
            model.checkpoint_id = f"init:{self.init_path}"
        else:
            model.checkpoint_id = f"preset:{self.preset}"
        return model.freeze_tokens() if self.same_tokens_as else model

    def collate_fn(self):
        from jobs.train_common import PixelCollate

        return PixelCollate(self.config.image_size)

    def prepare_batch(self, batch, device):
        """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], converted on the device."""
        pixels = batch["pixels"].to(device, non_blocking=True)
        return pixels.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (B, 3, H, W)

    def loss(self, model, images, generator):
        return model(images, generator=generator)["loss"]

    def num_items(self, images) -> int:
        return int(images.shape[0])

    def save_pretrained(self, model, path, *, step: int) -> None:
        from flextok.checkpoint import SAME_TOKENS_KEY

        extra: dict[str, Any] = {"step": step}
        if self.same_tokens_as:
            extra[SAME_TOKENS_KEY] = list(self.same_tokens_as)
        model.save_pretrained(path, extra=extra)

    def grid(self, model, images):
        """Rows: training images; columns: the input, then reconstructions from k = 1, 2, 4, .., K tokens."""
        import torch

        K = self.config.num_registers
        ks = sorted({2**i for i in range(K.bit_length()) if 2**i <= K} | {K})
        x = images[: self.grid_images]
        R = x.shape[0]
        ids = model.tokenize(x)  # (R, K)
        prefixes = [ids[r, :k] for k in ks for r in range(R)]  # one batched decode for every (k, image)
        g = torch.Generator(device=x.device).manual_seed(0)
        recs = model.detokenize(prefixes, steps=self.grid_steps, generator=g)  # (len(ks) * R, 3, H, W)
        recs = recs.view(len(ks), R, *recs.shape[1:]).transpose(0, 1)  # (R, len(ks), 3, H, W)
        return torch.cat([x[:, None], recs], dim=1), None, ["input"] + [f"k={k}" for k in ks]

    def describe(self) -> dict[str, Any]:
        described = {"kind": "FlexTok", "preset": self.preset, "config": self.config.to_dict()}
        if self.init_path is not None:
            described.update(init=self.init_path, init_sha256=self.init_sha256)
        if self.same_tokens_as:
            described.update(frozen="encoder (tokens kept)", same_tokens_as_sha256=list(self.same_tokens_as))
        return described


def training_rows(batch):
    """Decoded rows -> the pixels of the good ones (errors and shard end markers dropped)."""
    import pyarrow.compute as pc

    ok = batch.filter(pc.and_(pc.is_null(batch["error"]), pc.greater_equal(batch["index"], 0)))
    dropped = batch.num_rows - ok.num_rows - pc.sum(pc.less(batch["index"], 0)).as_py()
    if dropped:
        log.warning("skipping %d undecodable samples, e.g. %s", dropped,
                    batch.filter(pc.is_valid(batch["error"]))["error"][0].as_py())
    return ok.select(["pixels"])


def image_dataset(plan, storage_options: dict, image_size: int, order_seed: int | None = None):
    """Ray Dataset of decoded training images: the pipeline's read and decode stages, reused.

    With `order_seed` the shards are read in a seeded order that changes at every epoch (execution);
    without it, in the plan's order (held-out data).
    """
    import ray.data

    from pipelines.decode import decode_batch
    from pipelines.sources import read_shard_batch

    items = [{"shard": shard.to_json(), "skip": None} for shard in plan.shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one block per shard
    if order_seed is not None:  # shuffles the tiny shard descriptors only, before anything is read
        ds = ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=order_seed, reseed_after_execution=True))
    ds = ds.map_batches(read_shard_batch, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"storage_options": storage_options})
    ds = ds.map_batches(decode_batch, batch_format="pyarrow", fn_kwargs={"image_size": image_size})
    return ds.map_batches(training_rows, batch_format="pyarrow")


def model_config(args: argparse.Namespace, init_path: str | None = None):
    """The preset with the architecture flags applied, or with --init the checkpoint's own config
    (only the training-behaviour flags may change it then)."""
    from flextok.config import FSQConfig, get_preset

    given = {flag for flag in ARCH_FLAGS if getattr(args, flag) is not None}
    if init_path is not None:
        from flextok import FlexTok

        shaped = sorted(given - set(TRAINING_FLAGS) - {"decoder_depth"})
        shaped += (["fsq_levels"] if args.fsq_levels is not None else []) + (["preset"] if args.preset is not None else [])
        if shaped:
            raise ValueError(f"--init takes the architecture from {init_path}; drop "
                             + ", ".join("--" + f.replace("_", "-") for f in shaped))
        config = FlexTok.config_of(init_path)
        if args.decoder_depth is not None and args.decoder_depth < config.decoder_depth:
            raise ValueError(f"--decoder-depth {args.decoder_depth}: {init_path} has {config.decoder_depth} decoder "
                             "blocks; a fine-tune can add blocks (they start as the identity), not remove them")
    else:
        config = get_preset(args.preset or DEFAULT_PRESET)
    changes = {ARCH_FLAGS[flag]: getattr(args, flag) for flag in given}
    if args.fsq_levels is not None:
        changes["fsq"] = FSQConfig(levels=args.fsq_levels)
    return config.replace(**changes) if changes else config


def _check_output(data: str, output: str) -> None:
    """RUN inside the data folder would feed its own grids back as training images on a re-run."""
    from pipelines.writer import OutputStore

    src, run = OutputStore(data), OutputStore(output)
    if src.is_local == run.is_local and (run.root + "/").startswith(src.root.rstrip("/") + "/"):
        raise ValueError(f"--output {output} lies inside --data {data}; choose another folder")


def _run(args: argparse.Namespace) -> int:
    from jobs import train_common as tc
    from pipelines.sources import effective_storage_options, resolve_inputs

    cfg = tc.train_config_from_args(args)
    init_path, init_sha256 = tc.resolve_init(args.init)
    config = model_config(args, init_path)
    same_tokens: tuple[str, ...] = ()
    if args.freeze_encoder:
        if init_path is None:
            raise ValueError("--freeze-encoder keeps the tokens of --init CKPT; give --init")
        from flextok.checkpoint import same_tokens_shas

        same_tokens = tuple(sorted(same_tokens_shas(init_path)))
    task = TokenizerTask(config=config, preset=None if init_path else args.preset or DEFAULT_PRESET,
                         grid_images=args.grid_images, grid_steps=args.grid_steps,
                         init_path=init_path, init_sha256=init_sha256, same_tokens_as=same_tokens)
    data_options = effective_storage_options(args.data, args.storage_options)
    _check_output(args.data, args.output)
    plans = {}

    val_options = effective_storage_options(args.val_data, args.storage_options) if args.val_data else {}

    def preflight() -> None:
        plans["train"] = resolve_inputs(args.data, data_options)  # one clear error for missing data
        if args.val_data:
            plans[tc.VAL] = resolve_inputs(args.val_data, val_options)

    def datasets(order_seed: int) -> dict:
        plan = plans["train"]
        log.info("data: %s, %d %s shard(s)", args.data, len(plan.shards), plan.format)
        out = {"train": image_dataset(plan, data_options, config.image_size, order_seed)}
        if args.val_data:
            out[tc.VAL] = image_dataset(plans[tc.VAL], val_options, config.image_size).limit(args.val_items).materialize()
        return out

    summary = tc.run_training(task, datasets, cfg, run_url=args.output, storage_options=args.storage_options,
                              job="train-tokenizer", quiet=args.quiet, preflight=preflight)
    print(tc.summary_line("train-tokenizer", summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("flextok train-tokenizer", _run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
