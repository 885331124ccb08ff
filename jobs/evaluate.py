"""`flextok evaluate {tokenizer,generator,train-classifier}`: quality of a tokenizer or generator.

- tokenizer: reconstruction MSE / PSNR for k = 1, 2, 4, ..., K on a held-out corpus (and, with
  --classifier, how often reconstructions keep their class); a plot, a reconstruction grid, a
  Markdown report and a JSON of the numbers in --out.
- generator: FID per k against a held-out corpus, in Inception-v3 space when its weights are given
  as a local safetensors file, else in the project classifier's feature space (the report says which);
  class accuracy of class-conditional samples judged by the classifier.
- train-classifier: trains that classifier on a corpus's labels and reports its held-out accuracy.
The corpus is read with the pipeline's readers and decoder (any source `flextok tokenize` takes).
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
from jobs.cli_util import finite_float, json_arg, positive_int, run_cli
from pipelines.images import read_corpus

log = logging.getLogger("jobs.evaluate")

INCEPTION_HELP = (
    "FID Inception-v3 weights as a LOCAL safetensors file: pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
    "converted to safetensors (that .pth, like torch-fidelity's, is a pickle, and nothing is ever unpickled "
    "here: convert it yourself, e.g. safetensors.torch.save_file(torch.load(PTH, weights_only=True), OUT)); "
    "key names in the torchvision layout (Conv2d_1a_3x3.conv.weight, Mixed_5b..., fc.weight). Nothing is "
    "downloaded. Without it, FID is computed in the --classifier's feature space"
)


# Arguments ----------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-options", type=json_arg, default=None, metavar="JSON",
                   help="fsspec options for remote --data (e.g. an S3 endpoint); AWS variables are used otherwise")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of all sampling and noise (default %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="log warnings only")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flextok evaluate",
        description="Evaluate a tokenizer (reconstruction vs number of tokens) or a generator (FID and class "
        "accuracy vs number of tokens), or train the small classifier both use as a judge.",
    )
    sub = p.add_subparsers(dest="mode", required=True, metavar="{tokenizer,generator,train-classifier}")

    t = sub.add_parser("tokenizer", help="reconstruction MSE/PSNR per k on a held-out corpus",
                       description="Tokenize held-out images, decode every prefix k = 1, 2, 4, ..., K, and report "
                       "MSE and PSNR per k (plus class agreement and reconstruction FID with --classifier or "
                       "--inception-weights). Writes metrics.json, report.md, psnr_vs_k.png and reconstructions.png "
                       "to --out.")
    t.add_argument("--tokenizer", default=None, metavar="CKPT",
                   help="tokenizer checkpoint (default: the bundled one; a preset name means random weights)")
    t.add_argument("--data", required=True, metavar="SRC", help="held-out corpus: WebDataset shards, image folder or "
                   "Parquet with image bytes, local or s3:// (what `flextok tokenize --input` takes)")
    t.add_argument("--out", required=True, type=Path, metavar="DIR", help="report folder (created)")
    t.add_argument("--max-images", type=positive_int, default=1000, help="images evaluated (default %(default)s)")
    t.add_argument("--ks", type=_int_list, default=None, metavar="K1,K2,...",
                   help="token counts (default 1, 2, 4, ..., K)")
    t.add_argument("--steps", type=positive_int, help="decoder Euler steps (default: the tokenizer's; 25 for ours, "
                   "20 for an official release)")
    t.add_argument("--guidance", type=finite_float, help="decoder guidance scale (default: the tokenizer's; 1.0 for "
                   "ours, 7.5 for an official release)")
    t.add_argument("--apg", action=argparse.BooleanOptionalAction, help="adaptive projected guidance (the FlexTok "
                   "release's decoder guidance: the guided update's part orthogonal to the conditional prediction, "
                   "norm-capped, with momentum) instead of plain CFG (default: on for an official release only)")
    t.add_argument("--classifier", default=None, metavar="CKPT",
                   help="classifier checkpoint (from train-classifier): also report how often it gives originals "
                   "and reconstructions their true label")
    t.add_argument("--inception-weights", default=None, metavar="FILE.safetensors",
                   help="reconstruction FID in Inception-v3 space (see `flextok evaluate generator --help`); "
                   "without it, rFID is computed in the --classifier's feature space when one is given")
    t.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="tokenize/decode precision; pass the tokenize job's --precision to measure the tokens "
                        "it writes (default %(default)s, the pipeline's default)")
    t.add_argument("--grid-images", type=positive_int, default=8, help="rows of the reconstruction grid (default %(default)s)")
    _common(t)

    g = sub.add_parser("generator", help="FID and class accuracy per k",
                       description="Sample --num-samples images at each k (conditions taken from the held-out "
                       "corpus: its labels or captions), and report FID against the held-out images and class "
                       "accuracy by the classifier. Writes metrics.json, report.md, fid_vs_k.png, samples.png.")
    g.add_argument("--generator", required=True, metavar="RUN_OR_CKPT", help="generator checkpoint or run folder")
    g.add_argument("--tokenizer", default=None, metavar="CKPT",
                   help="tokenizer (default: the one recorded in the generator; sha256 verified)")
    g.add_argument("--data", required=True, metavar="SRC", help="held-out corpus (reference images, labels, captions)")
    g.add_argument("--out", required=True, type=Path, metavar="DIR", help="report folder (created)")
    g.add_argument("--classifier", default=None, metavar="CKPT",
                   help="classifier checkpoint: judges class accuracy, and is the FID feature space without "
                   "--inception-weights")
    g.add_argument("--inception-weights", default=None, metavar="FILE.safetensors", help=INCEPTION_HELP)
    g.add_argument("--num-samples", type=positive_int, default=500, help="samples per k (default %(default)s)")
    g.add_argument("--max-images", type=positive_int, default=5000,
                   help="held-out images used as the FID reference (default %(default)s)")
    g.add_argument("--tokens-list", type=_int_list, default=None, metavar="K1,K2,...",
                   help="token counts (default 1, 2, 4, ..., K)")
    g.add_argument("--cfg-scale", type=finite_float, default=3.0, help="generator CFG; 1 = none (default %(default)s)")
    g.add_argument("--temperature", type=finite_float, default=1.0, help="sampling temperature (default %(default)s)")
    g.add_argument("--top-k", type=positive_int, default=None, help="top-k sampling")
    g.add_argument("--top-p", type=finite_float, default=None, help="nucleus sampling mass")
    g.add_argument("--decoder-steps", type=positive_int, default=25, help="decoder Euler steps (default %(default)s)")
    g.add_argument("--decoder-guidance", type=finite_float, default=1.0, help="decoder guidance (default %(default)s)")
    g.add_argument("--decoder-apg", action="store_true", help="adaptive projected guidance (the FlexTok release's decoder guidance: the guided update's part orthogonal to the conditional prediction, norm-capped, with momentum) instead of plain CFG")
    g.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                   help="generator and decoder precision; auto = bf16 on CUDA, fp32 on CPU (default %(default)s)")
    g.add_argument("--grid-conditions", type=positive_int, default=10, help="rows of the sample grid (default %(default)s)")
    g.add_argument("--baseline", default=None, metavar="METRICS.json",
                   help="an `evaluate generator` metrics.json of a fixed-length generator (same data and judge): "
                   "the report then says how many tokens per image this generator saves at equal quality")
    _common(g)

    c = sub.add_parser("train-classifier", help="train the judge classifier on a corpus's labels",
                       description="Train the project's small CNN classifier on a labelled corpus and report its "
                       "accuracy on held-out images (--val-data, else a seeded --val-fraction of --data).")
    c.add_argument("--data", required=True, metavar="SRC", help="labelled training corpus")
    c.add_argument("--out", required=True, type=Path, metavar="CKPT", help="classifier checkpoint to write (.safetensors)")
    c.add_argument("--val-data", default=None, metavar="SRC", help="held-out corpus (default: --val-fraction of --data)")
    c.add_argument("--val-fraction", type=finite_float, default=0.1, help="held-out share of --data without --val-data (default %(default)s)")
    c.add_argument("--max-images", type=positive_int, default=None, help="use at most this many training images")
    c.add_argument("--image-size", type=positive_int, default=32,
                   help="image side the classifier works at; match the tokenizer (default %(default)s)")
    c.add_argument("--epochs", type=finite_float, default=3.0, help="passes over the training images (default %(default)s)")
    c.add_argument("--lr", type=finite_float, default=3e-3, help="peak AdamW learning rate (default %(default)s)")
    c.add_argument("--widths", type=_int_list, default=[32, 64, 128], metavar="W1,W2,...",
                   help="channels per stage (default 32,64,128)")
    _common(c)
    c.set_defaults(batch_size=128)
    return p


def _device(arg: str | None) -> str:
    import torch

    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}"


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def _load_classifier(path: str | None, device: str):
    if path is None:
        return None
    from flextok.classifier import Classifier

    return Classifier.from_pretrained(path, device=device)


def _feature_net(inception_weights: str | None, classifier, device: str):
    """The FID feature network: Inception-v3 from local weights, else the judge classifier, else None."""
    if inception_weights is not None:
        from flextok.inception import InceptionV3Features

        return InceptionV3Features.from_safetensors(inception_weights, device=device)
    return classifier


def _space_description(feature_net) -> str | None:
    if feature_net is None:
        return None
    if feature_net.feature_space != "classifier":
        return "Inception-v3 pool3 (2048-d)"
    return f"the project classifier's features ({feature_net.feature_dim}-d); not comparable with Inception FIDs"


def _fid_label(feature_space: str | None) -> str:
    return "FID" if feature_space != "classifier" else "FID (classifier features)"


def _describe_model(model) -> dict:
    return {"checkpoint_id": str(model.checkpoint_id), "checkpoint_sha256": model.checkpoint_sha256}


# tokenizer ----------------------------------------------------------------------------------------
def _evaluate_tokenizer(args: argparse.Namespace) -> int:
    from flextok import viz
    from flextok.evaluation import pow2_ks, reconstruction_metrics
    from pipelines.model import load_model, resolve_model_spec
    from pipelines.storage import fetch_checkpoint

    start = time.perf_counter()
    device = _device(args.device)
    tok_arg = fetch_checkpoint(args.tokenizer, args.storage_options) if args.tokenizer else None
    tokenizer = load_model(resolve_model_spec(tok_arg), device=device)
    classifier = _load_classifier(args.classifier, device)
    feature_net = _feature_net(args.inception_weights, classifier, device)
    K = tokenizer.config.num_registers
    ks = sorted(set(args.ks)) if args.ks else pow2_ks(K)
    if ks[-1] > K:
        raise ValueError(f"--ks: {ks[-1]} exceeds the tokenizer's K = {K}")
    corpus = read_corpus(args.data, tokenizer.config.image_size, max_images=args.max_images,
                         storage_options=args.storage_options)
    if classifier is not None and not bool((corpus.labels >= 0).any()):
        raise ValueError(f"--classifier needs labels, and --data {args.data} has none")
    defaults = tokenizer.detokenize_defaults  # the release's recommended settings for an official one
    args.steps = defaults.steps if args.steps is None else args.steps
    args.guidance = defaults.guidance_scale if args.guidance is None else args.guidance
    args.apg = defaults.apg if args.apg is None else args.apg
    log.info("evaluating %s on %d images of %s at k = %s", tokenizer.checkpoint_id, len(corpus.keys), args.data, ks)
    result = reconstruction_metrics(
        tokenizer, corpus.images, ks, labels=corpus.labels, classifier=classifier, steps=args.steps,
        guidance_scale=args.guidance, apg=args.apg, batch_size=args.batch_size, seed=args.seed, grid_images=args.grid_images,
        feature_net=feature_net, progress=log.info, precision=args.precision,
    )
    seconds = time.perf_counter() - start
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    metrics = {
        "kind": "tokenizer",
        "tokenizer": {**_describe_model(tokenizer), "config": tokenizer.config.to_dict()},
        "data": args.data, "num_images": result.num_images, "skipped_images": corpus.num_errors,
        "steps": args.steps, "guidance": args.guidance, "apg": args.apg, "seed": args.seed,
        "precision": args.precision,
        "psnr_definition": "mean over images of 10*log10(4/MSE), images in [-1, 1]",
        "mean_image_psnr": result.mean_image_psnr,
        "per_k": result.per_k(),
        "classifier": _describe_model(classifier) if classifier is not None else None,
        "originals_classifier_accuracy": result.originals_accuracy,
        "fid_feature_space": result.feature_space,
        "fid_feature_space_description": _space_description(feature_net),
        "seconds": round(seconds, 1),
    }
    _write_json(out / "metrics.json", metrics)
    viz.plot_vs_k(out / "psnr_vs_k.png", result.ks, {"PSNR": result.psnr}, ylabel="PSNR (dB)",
                  title=f"{Path(str(tokenizer.checkpoint_id)).name}: reconstruction vs tokens ({result.num_images} images)",
                  baselines={"mean image": result.mean_image_psnr})
    pictures = ["psnr_vs_k.png"]
    if result.accuracy:
        baselines = {"originals": result.originals_accuracy} if result.originals_accuracy is not None else None
        viz.plot_vs_k(out / "accuracy_vs_k.png", result.ks, {"reconstructions": result.accuracy},
                      ylabel="classifier agrees with label", baselines=baselines, title="class kept vs tokens")
        pictures.append("accuracy_vs_k.png")
    if result.fid:
        viz.plot_vs_k(out / "rfid_vs_k.png", result.ks, {"rFID": result.fid}, ylabel=_fid_label(result.feature_space),
                      title="reconstruction FID vs tokens (lower is better)")
        pictures.append("rfid_vs_k.png")
    if result.grid is not None:
        viz.save_grid(out / "reconstructions.png", result.grid,
                      col_labels=["original"] + [f"k={k}" for k in result.ks])
        pictures.append("reconstructions.png")
    _write_tokenizer_report(out / "report.md", metrics, result, pictures)
    best = result.psnr[-1]
    print(f"evaluate tokenizer: PSNR {_fmt(result.psnr[0])} dB at k={result.ks[0]} -> {_fmt(best)} dB at "
          f"k={result.ks[-1]} on {result.num_images} images (mean-image baseline {_fmt(result.mean_image_psnr)} dB); "
          f"report {out / 'report.md'} ({seconds:.0f} s)")
    return 0


def _write_tokenizer_report(path: Path, metrics: dict, result, pictures: list[str]) -> None:
    tok = metrics["tokenizer"]
    lines = [
        "# Tokenizer evaluation", "",
        f"- tokenizer: `{tok['checkpoint_id']}` (sha256 `{tok['checkpoint_sha256'] or 'none: random weights'}`)",
        f"- data: `{metrics['data']}`, {metrics['num_images']} images ({metrics['skipped_images']} skipped)",
        f"- decoder: {metrics['steps']} Euler steps, guidance {metrics['guidance']}{' (APG)' if metrics['apg'] else ''}, "
        f"seed {metrics['seed']}",
        f"- PSNR: {metrics['psnr_definition']}; mean-image baseline {_fmt(result.mean_image_psnr)} dB",
    ]
    if metrics["classifier"]:
        lines.append(f"- classifier: `{metrics['classifier']['checkpoint_id']}`; agrees with the true label on "
                     f"{_fmt(result.originals_accuracy, 3)} of the originals")
    if result.fid:
        lines.append(f"- rFID (reconstructions at k vs the originals): {metrics['fid_feature_space_description']}")
    header = "| k | MSE | PSNR (dB) | PSNR std |" + (" class kept |" if result.accuracy else "")
    header += f" {_fid_label(result.feature_space)} |" if result.fid else ""
    lines += ["", header, "|---|---|---|---|" + ("---|" if result.accuracy else "") + ("---|" if result.fid else "")]
    for row in result.per_k():
        line = f"| {row['k']} | {row['mse']:.4f} | {row['psnr']:.2f} | {row['psnr_std']:.2f} |"
        if result.accuracy:
            line += f" {_fmt(row['classifier_accuracy'], 3)} |"
        if result.fid:
            line += f" {row['fid']:.2f} |"
        lines.append(line)
    lines += [""] + [f"![{p}]({p})" for p in pictures] + [""]
    path.write_text("\n".join(lines))


# generator ----------------------------------------------------------------------------------------
def _evaluate_generator(args: argparse.Namespace) -> int:
    import torch

    from flextok import viz
    from flextok.evaluation import (
        extract_features,
        generation_metrics,
        pow2_ks,
        predict,
        reference_floor_fid,
    )
    from flextok.generator import Generator
    from flextok.metrics import FeatureStats
    from flextok.sampling import find_generator_checkpoint, resolve_tokenizer
    from pipelines.model import load_model
    from pipelines.storage import fetch_checkpoint

    start = time.perf_counter()
    device = _device(args.device)
    precision = resolve_precision(args.precision, device)
    if args.inception_weights is None and args.classifier is None:
        raise ValueError("FID needs a feature network: pass --inception-weights FILE.safetensors or --classifier CKPT")
    gen_path = find_generator_checkpoint(fetch_checkpoint(args.generator, args.storage_options))
    generator = Generator.from_pretrained(gen_path, device=device)
    tok_arg = fetch_checkpoint(args.tokenizer, args.storage_options) if args.tokenizer else None
    tokenizer = load_model(resolve_tokenizer(generator, gen_path, tok_arg), device=device)
    generator.check_tokenizer(tokenizer.config)
    classifier = _load_classifier(args.classifier, device)
    feature_net = _feature_net(args.inception_weights, classifier, device)
    ks = sorted(set(args.tokens_list)) if args.tokens_list else pow2_ks(generator.max_tokens)
    if ks[-1] > generator.max_tokens:
        raise ValueError(f"--tokens-list: {ks[-1]} exceeds the generator's K = {generator.max_tokens}")

    corpus = read_corpus(args.data, tokenizer.config.image_size, max_images=args.max_images,
                         storage_options=args.storage_options)
    is_class = generator.config.cond == "class"
    n = args.num_samples
    index = torch.arange(n) % len(corpus.keys)  # held-out rows whose condition each sample takes
    if is_class:
        if bool((corpus.labels >= 0).all()):
            conditions: list = corpus.labels[index].tolist()
        else:
            log.warning("--data has unlabelled rows: sampling classes round-robin")
            conditions = (torch.arange(n) % generator.config.num_classes).tolist()
        if max(conditions) >= generator.config.num_classes:
            raise ValueError(f"--data has labels up to {max(conditions)}, the generator {generator.config.num_classes} classes")
        targets = torch.tensor(conditions)
    else:
        if any(corpus.captions[i] is None for i in index.tolist()):
            raise ValueError(f"a text-conditional generator needs captions, and --data {args.data} lacks some")
        conditions = [corpus.captions[i] for i in index.tolist()]
        targets = corpus.labels[index]  # the label of the image whose caption was the prompt
    seen, grid_rows = set(), []
    for i, c in enumerate(conditions):
        if c not in seen and len(grid_rows) < args.grid_conditions:
            seen.add(c)
            grid_rows.append(i)

    log.info("reference features of %d held-out images in %s space", len(corpus.keys), feature_net.feature_space)
    ref_features = extract_features(feature_net, corpus.images, batch_size=args.batch_size)
    reference = FeatureStats.of(ref_features)
    result = generation_metrics(
        generator, tokenizer, conditions, ks, reference=reference, feature_net=feature_net, targets=targets,
        classifier=classifier, grid_conditions=grid_rows, batch_size=args.batch_size, seed=args.seed,
        progress=log.info, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        cfg_scale=None if args.cfg_scale == 1.0 else args.cfg_scale, decoder_steps=args.decoder_steps,
        decoder_guidance=args.decoder_guidance, decoder_apg=args.decoder_apg, precision=precision,
    )
    result.reference_floor_fid = reference_floor_fid(ref_features, n, seed=args.seed)
    lengths = _length_report(generator, gen_path, tokenizer, corpus, result, args) if generator.config.use_eos else None
    real_accuracy = None
    if classifier is not None and bool((corpus.labels >= 0).any()):
        valid = corpus.labels >= 0
        real_accuracy = float((predict(classifier, corpus.images[valid]) == corpus.labels[valid]).double().mean())
    seconds = time.perf_counter() - start

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    space = _space_description(feature_net)
    names = corpus.class_names
    metrics = {
        "kind": "generator",
        "generator": {"checkpoint_id": str(gen_path), "config": generator.config.to_dict()},
        "tokenizer": _describe_model(tokenizer),
        "data": args.data, "reference_images": len(corpus.keys), "num_samples": n,
        "fid_feature_space": result.feature_space, "fid_feature_space_description": space,
        "feature_network": _describe_model(feature_net),
        "classifier": _describe_model(classifier) if classifier is not None else None,
        "classifier_accuracy_on_reference": real_accuracy,
        "reference_floor_fid": result.reference_floor_fid,
        "sampling": {"cfg_scale": args.cfg_scale, "temperature": args.temperature, "top_k": args.top_k,
                     "top_p": args.top_p, "decoder_steps": args.decoder_steps,
                     "decoder_guidance": args.decoder_guidance, "decoder_apg": args.decoder_apg, "seed": args.seed,
                     "precision": precision},
        "per_k": result.per_k(),
        "seconds": round(seconds, 1),
    }
    pictures = []
    if lengths is not None:
        metrics["lengths"] = lengths
        hist = {"samples": lengths["samples"]["histogram"]}
        if lengths.get("data"):
            hist["held-out images (adaptive tokenizer)"] = lengths["data"]["histogram"]
        _plot_lengths(out / "lengths.png", hist, generator.max_tokens)
        pictures.append("lengths.png")
    _write_json(out / "metrics.json", metrics)
    label = _fid_label(result.feature_space)
    viz.plot_vs_k(out / "fid_vs_k.png", result.ks, {label: result.fid}, ylabel=label,
                  baselines={"real held-out images": result.reference_floor_fid} if result.reference_floor_fid else None,
                  title=f"{gen_path.name}: {n} samples per k")
    pictures.append("fid_vs_k.png")
    if any(a is not None for a in result.accuracy):
        viz.plot_vs_k(out / "accuracy_vs_k.png", result.ks, {"samples": [a or 0.0 for a in result.accuracy]},
                      ylabel="classified as the asked class",
                      baselines={"real held-out": real_accuracy} if real_accuracy is not None else None)
        pictures.append("accuracy_vs_k.png")
    if result.grid is not None:
        def row_label(i: int) -> str:
            c = conditions[i]
            if is_class:
                return f"{c}: {names[c]}" if names and c < len(names) else f"class {c}"
            return str(c)

        viz.save_grid(out / "samples.png", result.grid, row_labels=[row_label(i) for i in grid_rows],
                      col_labels=[f"k={k}" for k in result.ks])
        pictures.append("samples.png")
    _write_generator_report(out / "report.md", metrics, pictures)
    acc = result.accuracy[-1]
    print(f"evaluate generator: FID {_fmt(result.fid[-1])} at k={result.ks[-1]} in {result.feature_space} space"
          + (f", class accuracy {_fmt(acc, 3)}" if acc is not None else "")
          + f" ({n} samples per k); report {out / 'report.md'} ({seconds:.0f} s)")
    return 0


def _write_generator_report(path: Path, metrics: dict, pictures: list[str]) -> None:
    s = metrics["sampling"]
    lines = [
        "# Generator evaluation", "",
        f"- generator: `{metrics['generator']['checkpoint_id']}` ({metrics['generator']['config']['cond']}-conditional)",
        f"- tokenizer: `{metrics['tokenizer']['checkpoint_id']}`",
        f"- reference: `{metrics['data']}`, {metrics['reference_images']} held-out images; "
        f"{metrics['num_samples']} samples per k with the held-out conditions",
        f"- **FID feature space: {metrics['fid_feature_space_description']}**",
        f"- floor: FID of held-out images themselves (up to {metrics['num_samples']} of them against the "
        f"others): {_fmt(metrics['reference_floor_fid'])}",
        f"- sampling: CFG {s['cfg_scale']}, temperature {s['temperature']}, top-k {s['top_k']}, top-p {s['top_p']}, "
        f"decoder {s['decoder_steps']} steps / guidance {s['decoder_guidance']}"
        f"{' (APG)' if s.get('decoder_apg') else ''}, seed {s['seed']}",
    ]
    if metrics["classifier"]:
        lines.append(f"- judge: `{metrics['classifier']['checkpoint_id']}`, accuracy on the real held-out images "
                     f"{_fmt(metrics['classifier_accuracy_on_reference'], 3)}")
    lengths = metrics.get("lengths")
    if lengths is None:
        lines += ["", "| k | FID | class accuracy |", "|---|---|---|"]
        lines += [f"| {r['k']} | {r['fid']:.2f} | {_fmt(r['class_accuracy'], 3)} |" for r in metrics["per_k"]]
    else:
        lines += ["", "The generator ends each sample with its end-of-sequence token; k is the cap.", "",
                  "| cap k | tokens per sample | FID | class accuracy |", "|---|---|---|---|"]
        lines += [f"| {r['k']} | {r['mean_tokens']:.2f} | {r['fid']:.2f} | {_fmt(r['class_accuracy'], 3)} |"
                  for r in metrics["per_k"]]
        lines += ["", f"- samples at cap {lengths['cap']}: {lengths['samples']['mean']:.2f} tokens on average"]
        if lengths.get("data"):
            d = lengths["data"]
            lines.append(f"- held-out images, adaptive lengths of the tokenizer ({d['target']}): {d['mean']:.2f} "
                         f"tokens on average; samples / data = {lengths['samples']['mean'] / d['mean']:.3f}")
        if lengths.get("baseline"):
            b = lengths["baseline"]
            lines.append(f"- equal quality vs the fixed-length generator `{b['generator']}`: {b['summary']}")
    lines += [""] + [f"![{p}]({p})" for p in pictures] + [""]
    path.write_text("\n".join(lines))


def _length_report(generator, gen_path, tokenizer, corpus, result, args) -> dict:
    """An EOS generator's lengths: samples at the largest cap, the held-out images' adaptive lengths
    under the target its training tokens were chosen with (recorded in the checkpoint), and with
    --baseline the tokens a fixed-length generator needs for the same quality."""
    import torch

    from flextok.adaptive import LengthTarget
    from flextok.checkpoint import read_metadata

    cap = result.ks[-1]
    hist = result.length_histograms[-1]
    out: dict = {"cap": cap, "samples": {"mean": result.mean_tokens[-1], "histogram": hist}}
    recorded = read_metadata(gen_path).get("length_target")
    if recorded:
        target_fields = json.loads(recorded)
        target = LengthTarget(max_relative_error=target_fields.get("max_relative_error"),
                              max_error=target_fields.get("max_error"), candidates=_candidates(target_fields),
                              noise_seed=target_fields.get("noise_seed", 0))
        images = corpus.images[: args.num_samples].float() / 127.5 - 1
        chosen = torch.cat([tokenizer.tokenize_adaptive(images[i : i + args.batch_size].to(tokenizer.device),
                                                        target).num_tokens.cpu()
                            for i in range(0, len(images), args.batch_size)])
        described = (f"within {100 * target.max_relative_error:g}% of all K's error" if target.max_error is None
                     else f"MSE <= {target.max_error:g}")
        out["data"] = {"mean": float(chosen.float().mean()), "target": described, "images": len(images),
                       "histogram": {int(n): int(c) for n, c in zip(*chosen.unique(return_counts=True))}}
    if args.baseline:
        out["baseline"] = _equal_quality(json.loads(Path(args.baseline).read_text()), result)
    return out


def _candidates(fields: dict):
    c = fields.get("candidates")
    return tuple(c) if isinstance(c, list) else c


def _equal_quality(baseline: dict, result) -> dict:
    """The fewest tokens a fixed-length generator (its metrics.json) needs to match this generator's
    class accuracy (and, separately, its FID) at the largest cap."""
    rows = sorted(baseline["per_k"], key=lambda r: r["k"])
    acc, fid, mean = result.accuracy[-1], result.fid[-1], result.mean_tokens[-1]
    k_acc = next((r["k"] for r in rows if acc is not None and r["class_accuracy"] is not None
                  and r["class_accuracy"] >= acc), None)
    k_fid = next((r["k"] for r in rows if r["fid"] <= fid), None)
    parts = []
    for what, k in (("class accuracy", k_acc), ("FID", k_fid)):
        if k is None:
            parts.append(f"no k reaches this generator's {what}")
            continue
        change = f"{100 * (1 - mean / k):.0f}% fewer" if mean <= k else f"{100 * (mean / k - 1):.0f}% more"
        parts.append(f"its {what} needs k = {k} tokens per image (this generator: {mean:.2f}, {change})")
    return {"generator": baseline["generator"]["checkpoint_id"], "k_for_accuracy": k_acc, "k_for_fid": k_fid,
            "mean_tokens": mean, "summary": "; ".join(parts)}


def _plot_lengths(path: Path, histograms: dict, max_tokens: int) -> None:
    """Share of samples per length, one series per histogram."""
    from flextok import viz

    lengths = sorted({int(k) for h in histograms.values() for k in h} | {1, max_tokens})
    series = {name: [h.get(k, h.get(str(k), 0)) / max(1, sum(h.values())) for k in lengths]
              for name, h in histograms.items()}
    viz.plot_vs_k(path, lengths, series, ylabel="share of images", title="tokens per image")


# train-classifier ---------------------------------------------------------------------------------
def _train_classifier(args: argparse.Namespace) -> int:
    import torch

    from flextok.classifier import (
        Classifier,
        ClassifierConfig,
        evaluate_classifier,
        train_classifier,
    )

    start = time.perf_counter()
    device = _device(args.device)
    if args.out.suffix != ".safetensors":
        raise ValueError(f"--out {args.out} must be a .safetensors file")
    if args.val_data is None and not 0 < args.val_fraction < 1:
        raise ValueError("--val-fraction must be in (0, 1)")
    corpus = read_corpus(args.data, args.image_size, max_images=args.max_images, storage_options=args.storage_options)
    labelled = corpus.labels >= 0
    if not bool(labelled.any()):
        raise ValueError(f"--data {args.data} has no labels to learn")
    images, labels = corpus.images[labelled], corpus.labels[labelled]
    if args.val_data is not None:
        val = read_corpus(args.val_data, args.image_size, storage_options=args.storage_options)
        keep = val.labels >= 0
        val_images, val_labels = val.images[keep], val.labels[keep]
        held_out = args.val_data
    else:
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(args.seed))
        num_val = max(1, int(round(args.val_fraction * images.shape[0])))
        val_images, val_labels = images[order[:num_val]], labels[order[:num_val]]
        images, labels = images[order[num_val:]], labels[order[num_val:]]
        held_out = f"{args.val_fraction:g} of --data (seed {args.seed})"
    names = corpus.class_names
    num_classes = max(int(labels.max()), int(val_labels.max())) + 1
    if names is not None and len(names) >= num_classes:
        num_classes = len(names)
    else:
        names = None
    if num_classes < 2:
        raise ValueError(f"--data {args.data} has a single class; nothing to learn")
    config = ClassifierConfig(num_classes=num_classes, image_size=args.image_size, widths=tuple(args.widths))
    torch.manual_seed(args.seed)
    model = Classifier.from_config(config, class_names=names).to(device)
    log.info("training a %d-class classifier on %d images (%s held out: %d images), %g epochs",
             num_classes, images.shape[0], held_out, val_images.shape[0], args.epochs)
    every = max(1, int(images.shape[0] * args.epochs / args.batch_size) // 20)

    def on_step(step: int, total: int, loss: float) -> None:
        if step % every == 0 or step == total:
            log.info("step %d/%d loss %.4f (%.0f s)", step, total, loss, time.perf_counter() - start)

    result = train_classifier(model, images, labels, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              generator=torch.Generator().manual_seed(args.seed), on_step=on_step)
    accuracy = evaluate_classifier(model, val_images, val_labels)
    seconds = time.perf_counter() - start
    model.save_pretrained(args.out, extra={
        "data": args.data, "held_out": held_out, "held_out_accuracy": round(accuracy, 4),
        "train_images": int(images.shape[0]), "held_out_images": int(val_images.shape[0]), "epochs": args.epochs,
        "steps": result.steps, "seed": args.seed, "seconds": round(seconds, 1),
    })
    print(f"train-classifier: held-out accuracy {accuracy:.4f} on {val_images.shape[0]} images ({held_out}); "
          f"train accuracy {result.train_accuracy:.4f} on {images.shape[0]} images, {result.steps} steps; "
          f"wrote {args.out} ({seconds:.0f} s)")
    return 0


def _run(args: argparse.Namespace) -> int:
    modes = {"tokenizer": _evaluate_tokenizer, "generator": _evaluate_generator, "train-classifier": _train_classifier}
    return modes[args.mode](args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("flextok evaluate", _run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
