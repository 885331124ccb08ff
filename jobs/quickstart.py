"""`flextok quickstart`: the whole system on one machine in minutes.

Builds the emoji corpus from the OS packages, gets a tokenizer (the bundled one, else a brief
training run), tokenizes the corpus with the Ray Data pipeline, gets a text-conditional generator
(the bundled one, fine-tuned briefly on these tokens with Ray Train when it was trained on that
tokenizer; else a brief Ray Train run from scratch), samples a grid for 8 prompts, makes a
reconstruction grid over k, and writes a Markdown report.

Every stage is the real job run as a user would run it (`python -m jobs.<name>`), as a child process.
Each Ray stage starts its own local Ray (or joins RAY_ADDRESS): sharing one local instance between
processes would need Ray 2.60's cluster auth token handed around, for a saving of seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from jobs.cli_util import non_negative_int, positive_int, run_cli

PROMPTS = (
    "grinning face", "red heart", "thumbs up", "fire",
    "cat face", "rocket", "slice of pizza", "sun with face",
)
ASSETS = Path(__file__).resolve().parents[1] / "flextok" / "assets" / "emoji"


class StageFailed(RuntimeError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flextok quickstart",
        description="Build the emoji corpus, tokenize it with Ray Data, train (or use the bundled) "
        "tokenizer and text-conditional generator, sample 8 prompts, reconstruct over k, and "
        "write OUT/report.md.",
    )
    p.add_argument("--out", default="flextok-quickstart", help="output folder (default: %(default)s)")
    p.add_argument("--tokenizer", help="tokenizer checkpoint (default: the bundled emoji tokenizer, "
                   "else one trained briefly here)")
    p.add_argument("--generator", help="generator checkpoint or run folder (default: the bundled emoji "
                   "generator when it matches the tokenizer, else one trained briefly here)")
    p.add_argument("--tokenizer-steps", type=positive_int, default=300,
                   help="training steps when no tokenizer is bundled (default: %(default)s)")
    p.add_argument("--generator-steps", type=positive_int, default=300,
                   help="training steps when no generator is bundled (default: %(default)s)")
    p.add_argument("--finetune-steps", type=non_negative_int, default=30,
                   help="Ray Train fine-tuning steps of the bundled generator on the quickstart's tokens; 0 uses "
                   "it as shipped (default: %(default)s)")
    p.add_argument("--decoder-steps", type=positive_int, default=1,
                   help="Euler steps of the tokenizer's flow decoder for samples and reconstructions (default "
                   "%(default)s: the tiny shipped tokenizers give their sharpest, highest-PSNR pictures in one step, "
                   "see their model cards; paper-scale tokenizers want ~25)")
    p.add_argument("--limit", type=positive_int, help="use at most this many emoji (default: all 3,655)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="log warnings only")
    return p


def _bundled(name: str) -> Path | None:
    path = ASSETS / name
    return path if path.is_file() else None


def _sha256_recorded(generator: Path) -> str | None:
    from flextok.checkpoint import read_metadata

    return read_metadata(generator).get("tokenizer_sha256")


class Stages:
    """Runs numbered stages as child processes and times them."""

    def __init__(self, total: int, env: dict[str, str]) -> None:
        self.total, self.env, self.done = total, env, 0
        self.timings: list[tuple[str, float]] = []

    def run(self, title: str, module: str, *args: str) -> None:
        self.done += 1
        print(f"\n[{self.done}/{self.total}] {title}", flush=True)
        cmd = [sys.executable, "-m", module, *map(str, args)]
        print("    $ " + " ".join(cmd[1:]), flush=True)
        t0 = time.perf_counter()
        code = subprocess.call(cmd, env=self.env)
        if code != 0:
            raise StageFailed(f"stage {self.done}/{self.total} ({title}) failed with exit status {code}; its error is above")
        self.timings.append((title, time.perf_counter() - t0))

    def skip(self, title: str, why: str) -> None:
        self.done += 1
        print(f"\n[{self.done}/{self.total}] {title}: {why}", flush=True)
        self.timings.append((f"{title} ({why})", 0.0))


def _report(out: Path, facts: dict, timings: list[tuple[str, float]], metrics: dict) -> Path:
    psnr = metrics.get("psnr", {})
    lines = [
        "# FlexTok quickstart",
        "",
        f"Corpus: {facts['images']} emoji rendered from the Noto Color Emoji font (captions = emoji names).",
        f"Tokenizer: {facts['tokenizer']} ({facts['tokenizer_source']}).",
        f"Generator: {facts['generator']} ({facts['generator_source']}).",
        "",
        "## Samples for 8 prompts",
        "",
        f"![samples](samples.png)\n\n{facts['num_tokens']} tokens per image, CFG {facts['cfg']}, "
        f"{facts['decoder_steps']} decoder step(s).",
        "",
        "## Reconstructions over k",
        "",
        "Each row is one held-out emoji decoded from its first k tokens (k = 1, 2, 4, ...).",
        "",
        "![reconstructions](eval/reconstructions.png)",
        "",
        "![PSNR vs k](eval/psnr_vs_k.png)",
        "",
    ]
    if psnr:
        lines += ["| k | " + " | ".join(str(k) for k in psnr) + " |",
                  "|---|" + "---|" * len(psnr),
                  "| PSNR (dB) | " + " | ".join(f"{v:.2f}" for v in psnr.values()) + " |", ""]
    lines += ["## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {title} | {secs:.0f} |" for title, secs in timings]
    lines += ["", f"Total: {sum(s for _, s in timings):.0f} s."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _read_psnr(eval_dir: Path) -> dict:
    for name in ("metrics.json", "results.json"):
        path = eval_dir / name
        if path.is_file():
            data = json.loads(path.read_text())
            per_k = data.get("per_k") or data.get("psnr_per_k") or {}
            if isinstance(per_k, list):
                return {"psnr": {str(r["k"]): r["psnr"] for r in per_k if "psnr" in r}}
            if isinstance(per_k, dict):
                return {"psnr": {str(k): (v["psnr"] if isinstance(v, dict) else v) for k, v in per_k.items()}}
    return {}


def run(args: argparse.Namespace) -> int:
    for flag, value in (("--tokenizer", args.tokenizer), ("--generator", args.generator)):
        if value and not Path(value).exists():
            raise FileNotFoundError(f"{flag} {value} does not exist")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    env = dict(os.environ)
    quiet = ["--quiet"] if args.quiet else []
    stages = Stages(6, env)
    limit = ["--limit", str(args.limit)] if args.limit else []

    corpus = out / "corpus"
    stages.run("emoji corpus from the OS fonts (train and test splits)", "jobs.corpus", "emoji",
               "--out", corpus / "train", "--size", "32", "--split", "train", *limit, *quiet)
    subprocess.check_call([sys.executable, "-m", "jobs.corpus", "emoji", "--out", str(corpus / "test"),
                           "--size", "32", "--split", "test", "--limit", "64", "--quiet"], env=env)

    tokenizer = Path(args.tokenizer) if args.tokenizer else _bundled("tokenizer.safetensors")
    if tokenizer is not None:
        stages.skip("tokenizer", f"using {tokenizer}")
        tokenizer_source = "given" if args.tokenizer else "bundled, see its model card"
    else:
        stages.run(f"train a tiny tokenizer briefly ({args.tokenizer_steps} steps; the bundled one is better)",
                   "jobs.train_tokenizer", "--data", corpus / "train", "--output", out / "tokenizer",
                   "--preset", "tiny", "--max-steps", args.tokenizer_steps, "--seed", args.seed, *quiet)
        tokenizer = out / "tokenizer" / "model.safetensors"
        tokenizer_source = f"trained here for {args.tokenizer_steps} steps"

    stages.run("tokenize the corpus with the Ray Data pipeline", "jobs.tokenize",
               "--input", corpus / "train", "--output", out / "tokens", "--model", tokenizer, *quiet)

    from flextok.checkpoint import same_tokens_shas

    generator = Path(args.generator) if args.generator else _bundled("generator.safetensors")
    if generator is not None and not args.generator and _sha256_recorded(generator) not in same_tokens_shas(tokenizer):
        generator = None  # the bundled generator speaks another tokenizer's tokens
    if generator is not None and not args.generator and args.finetune_steps:
        stages.run(f"fine-tune the bundled text-conditional generator on these tokens ({args.finetune_steps} steps)",
                   "jobs.train_generator", "--tokens", out / "tokens", "--output", out / "generator",
                   "--cond", "text", "--init", generator, "--tokenizer", tokenizer, "--max-steps",
                   args.finetune_steps, "--lr", "1e-4", "--warmup-steps", "0", "--grid-every", "0",
                   "--seed", args.seed, *quiet)
        generator_source = f"bundled, see its model card; fine-tuned here for {args.finetune_steps} steps"
        generator = out / "generator"
    elif generator is not None:
        stages.skip("generator", f"using {generator}")
        generator_source = "given" if args.generator else "bundled, see its model card"
    else:
        stages.run(f"train a text-conditional generator briefly ({args.generator_steps} steps)",
                   "jobs.train_generator", "--tokens", out / "tokens", "--output", out / "generator",
                   "--cond", "text", "--tokenizer", tokenizer, "--max-steps", args.generator_steps,
                   "--seed", args.seed, *quiet)
        generator = out / "generator"
        generator_source = f"trained here for {args.generator_steps} steps"

    from flextok.checkpoint import read_metadata

    num_tokens = json.loads(read_metadata(tokenizer)["config"])["num_registers"]
    cfg = 3.0
    stages.run("sample 8 prompts", "jobs.sample", "--generator", generator, "--tokenizer", tokenizer,
               "--prompts", *PROMPTS, "--num-tokens", num_tokens, "--cfg-scale", cfg,
               "--decoder-steps", args.decoder_steps, "--seed", args.seed, "--out", out / "samples.png", *quiet)
    stages.run("reconstruct held-out emoji over k", "jobs.evaluate", "tokenizer", "--tokenizer", tokenizer,
               "--data", corpus / "test", "--out", out / "eval", "--max-images", "64", "--steps", args.decoder_steps,
               *quiet)

    facts = {
        "images": json.loads((corpus / "train" / "dataset.json").read_text()).get("num_samples", "?"),
        "tokenizer": tokenizer, "tokenizer_source": tokenizer_source,
        "generator": generator, "generator_source": generator_source,
        "num_tokens": num_tokens, "cfg": cfg, "decoder_steps": args.decoder_steps,
    }
    report = _report(out, facts, stages.timings, _read_psnr(out / "eval"))
    print(f"\nDone in {time.perf_counter() - t0:.0f} s. Report: {report}")
    print(f"Samples: {out / 'samples.png'}   Reconstructions: {out / 'eval'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except StageFailed as e:
            raise ValueError(str(e)) from None

    return run_cli("flextok quickstart", body, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
