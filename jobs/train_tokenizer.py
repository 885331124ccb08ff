"""`flextok train-tokenizer --data SRC --output RUN`: train a FlexTok tokenizer with Ray Train.

Images come through Ray Data with the pipeline's own readers and decoding (`pipelines.sources`,
`pipelines.decode`: WebDataset shards, image folders or Parquet image bytes from any fsspec URL),
so training sees exactly what `flextok tokenize` sees. The loop, checkpoints, resume and metrics are
`training`'s. Every `--grid-every` steps and at the end, RUN/grids/step_<n>.png shows a
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

from jobs.cli_util import finite_float, positive_int, run_cli

log = logging.getLogger("jobs.train_tokenizer")

DEFAULT_PRESET = "tiny"
# Architecture flags -> FlexTokConfig fields (None = keep the preset's value).
ARCH_FLAGS = {
    "image_size": "image_size", "patch_size": "patch_size", "num_registers": "num_registers",
    "encoder_depth": "encoder_depth", "encoder_dim": "encoder_dim", "decoder_depth": "decoder_depth",
    "decoder_dim": "decoder_dim", "head_dim": "head_dim",
}
# Objective flags -> TokenizerObjective fields (None = keep the preset's, or --init's, value); they only
# change how the model trains, so they are allowed with --init (fine-tuning).
OBJECTIVE_FLAGS = {
    "nested_dropout": "nested_dropout_mode", "full_k_fraction": "full_k_fraction",
    "time_sampling": "time_sampling", "uniform_time_fraction": "uniform_time_fraction",
    "noise_time_fraction": "noise_time_fraction", "cond_dropout": "cond_dropout_prob",
}


def _levels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 8,5,5,5, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from jobs.train_flags import add_init_arg, add_train_args, add_val_args
    from training.settings import TrainConfig

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
    g.add_argument("--vae", default=None, metavar="PATH",
                   help="weights of the frozen VAE of a latent-space preset (d12_d12, d18_d18, d18_d28): a "
                   "safetensors file or diffusers folder every worker can read; required by those presets")
    g = p.add_argument_group("training objective (the preset's or --init's, then any override)")
    g.add_argument("--nested-dropout", choices=NESTED_DROPOUT_MODES, help="how k is drawn in training")
    g.add_argument("--full-k-fraction", type=finite_float,
                   help="fraction of examples that keep all K tokens (the rest draw k by --nested-dropout): "
                   "trains the last tokens more often than nested dropout alone")
    g.add_argument("--time-sampling", choices=TIME_SAMPLING_MODES, help="flow time distribution")
    g.add_argument("--uniform-time-fraction", type=finite_float, help="fraction of flow times drawn uniformly")
    g.add_argument("--noise-time-fraction", type=finite_float,
                   help="fraction of examples at t = 1 (pure noise), where one decoder step is the mean "
                   "reconstruction: raises PSNR with few-step decoding")
    g.add_argument("--cond-dropout", type=finite_float, help="probability of the null condition (CFG training)")
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


def model_config(args: argparse.Namespace, init_path: str | None = None):
    """The preset with the architecture flags applied, or with --init the checkpoint's own config
    (only --decoder-depth may grow it then)."""
    from flextok.config import FSQConfig, get_preset

    given = {flag for flag in ARCH_FLAGS if getattr(args, flag) is not None}
    if init_path is not None:
        from flextok import FlexTok

        shaped = sorted(given - {"decoder_depth"})
        shaped += (["fsq_levels"] if args.fsq_levels is not None else []) + (["preset"] if args.preset is not None else [])
        if shaped:
            raise ValueError(f"--init takes the architecture from {init_path}; drop "
                             + ", ".join("--" + f.replace("_", "-") for f in shaped))
        if args.vae is not None:
            raise ValueError(f"--init {init_path} carries its own VAE; drop --vae")
        config = FlexTok.config_of(init_path)
        if args.decoder_depth is not None and args.decoder_depth < config.decoder_depth:
            raise ValueError(f"--decoder-depth {args.decoder_depth}: {init_path} has {config.decoder_depth} decoder "
                             "blocks; a fine-tune can add blocks (they start as the identity), not remove them")
    else:
        preset = args.preset or DEFAULT_PRESET
        config = get_preset(preset)
        if config.vae is None and args.vae is not None:
            raise ValueError(f"--preset {preset} trains on pixels, without a VAE; drop --vae")
        if config.vae is not None:
            if args.vae is None:
                raise ValueError(f"--preset {preset} trains in a VAE's latent space: give the VAE's weights with "
                                 "--vae PATH (a random VAE's latents mean nothing)")
            import dataclasses
            from pathlib import Path

            from flextok.checkpoint import resolve_weights_path

            weights = resolve_weights_path(Path(args.vae).expanduser()).resolve()  # one clear error when missing
            config = config.replace(vae=dataclasses.replace(config.vae, path=str(weights)))
    changes = {ARCH_FLAGS[flag]: getattr(args, flag) for flag in given}
    if args.fsq_levels is not None:
        changes["fsq"] = FSQConfig(levels=args.fsq_levels)
    return config.replace(**changes) if changes else config


def objective(args: argparse.Namespace, init_path: str | None = None):
    """The preset's training objective (or the one --init was trained with, where it says) with the
    objective flags applied."""
    from flextok.config import TokenizerObjective, get_objective

    if init_path is not None:
        from flextok import FlexTok

        base = FlexTok.objective_of(init_path) or TokenizerObjective()
    else:
        base = get_objective(args.preset or DEFAULT_PRESET)
    changes = {field: getattr(args, flag) for flag, field in OBJECTIVE_FLAGS.items() if getattr(args, flag) is not None}
    return base.replace(**changes) if changes else base


def _check_output(data: str, output: str) -> None:
    """RUN inside the data folder would feed its own grids back as training images on a re-run."""
    from pipelines.writer import OutputStore

    src, run = OutputStore(data), OutputStore(output)
    if src.is_local == run.is_local and (run.root + "/").startswith(src.root.rstrip("/") + "/"):
        raise ValueError(f"--output {output} lies inside --data {data}; choose another folder")


def usable_inputs(flag: str, url: str, storage_options: dict):
    """The input plan of `url` without the Parquet files that hold no images (a wrong column type, a
    file that is not Parquet): training skips them, named in one warning line, instead of meeting
    them as error rows in every epoch. Nothing usable at all is a one-line error."""
    import dataclasses

    from pipelines.sources import resolve_inputs, unusable_parquet_shards

    plan = resolve_inputs(url, storage_options)
    problems = unusable_parquet_shards(plan, storage_options) if plan.format == "parquet" else {}
    if not problems:
        return plan
    bad = [s for s in plan.shards if s.id in problems]
    examples = "; ".join(f"{s.source}: {problems[s.id]}" for s in bad[:3])
    more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
    if len(bad) == len(plan.shards):
        raise ValueError(f"{flag} {url}: no Parquet file holds images: {examples}{more}")
    log.warning("%s: skipping %d of %d Parquet files that hold no images: %s%s", flag, len(bad), len(plan.shards),
                examples, more)
    return dataclasses.replace(plan, shards=tuple(s for s in plan.shards if s.id not in problems))


def _run(args: argparse.Namespace) -> int:
    from jobs.train_flags import train_config_from_args
    from pipelines.sources import effective_storage_options
    from training.data import VAL, image_dataset, image_source
    from training.driver import run_training, summary_line
    from training.runs import resolve_init
    from training.tasks import TokenizerTask

    cfg = train_config_from_args(args)
    init_path, init_local, init_sha256 = resolve_init(args.init, args.storage_options)
    config = model_config(args, init_local)
    same_tokens: tuple[str, ...] = ()
    if args.freeze_encoder:
        if init_path is None:
            raise ValueError("--freeze-encoder keeps the tokens of --init CKPT; give --init")
        from flextok.checkpoint import same_tokens_shas

        same_tokens = tuple(sorted(same_tokens_shas(init_local)))
    task = TokenizerTask(config=config, preset=None if init_path else args.preset or DEFAULT_PRESET,
                         objective=objective(args, init_local),
                         grid_images=args.grid_images, grid_steps=args.grid_steps, init_path=init_path,
                         init_sha256=init_sha256, init_storage_options=dict(args.storage_options or {}),
                         same_tokens_as=same_tokens)
    data_options = effective_storage_options(args.data, args.storage_options)
    _check_output(args.data, args.output)
    plans = {}

    val_options = effective_storage_options(args.val_data, args.storage_options) if args.val_data else {}

    def preflight() -> None:
        plans["train"] = usable_inputs("--data", args.data, data_options)  # one clear error for missing data
        if args.val_data:
            plans[VAL] = usable_inputs("--val-data", args.val_data, val_options)

    def datasets() -> dict:
        plan = plans["train"]
        log.info("data: %s, %d %s shard(s)", args.data, len(plan.shards), plan.format)
        out = {"train": image_source(plan, data_options, config.image_size)}
        if args.val_data:
            out[VAL] = image_dataset(plans[VAL], val_options, config.image_size).limit(args.val_items).materialize()
        return out

    summary = run_training(task, datasets, cfg, run_url=args.output, storage_options=args.storage_options,
                              job="train-tokenizer", quiet=args.quiet, preflight=preflight)
    print(summary_line("train-tokenizer", summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("flextok train-tokenizer", _run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
