"""`flextok quickstart`: the whole system on one machine in minutes.

Shows what the shipped models do, then runs the pipeline a user would run on their own data:
- Fashion-MNIST (the shipped tokenizer and class-conditional generator): held-out test images
  reconstructed from their first k = 1, 2, 4, ..., 32 tokens, and samples of every class.
- Emoji: builds the emoji corpus from the OS fonts, gets a tokenizer (the bundled one, else a brief
  training run), tokenizes the corpus with the Ray Data pipeline, gets a text-conditional generator
  (the bundled one, fine-tuned briefly on these tokens with Ray Train when it was trained on that
  tokenizer; else a brief Ray Train run from scratch), samples 8 prompts and reconstructs held-out
  emoji over k.
All of it lands in one Markdown report, OUT/report.md.

Every stage is the real job run as a user would run it (`python -m jobs.<name>`), as a child process
whose command is printed as a shell line that can be pasted back (`shlex.join`). Its log goes to
OUT/logs/<stage>.log; the console gets the job's own summary (its stdout), any warning or error line
of its log, and on a terminal one status line per stage (the log's latest line). A failed stage
prints the end of its log. Each Ray stage starts its own local Ray (or joins RAY_ADDRESS): sharing
one local instance between processes would need Ray 2.60's cluster auth token handed around, for a
saving of seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from jobs.cli_util import non_negative_int, positive_int, run_cli

PROMPTS = (
    "grinning face", "red heart", "thumbs up", "fire",
    "cat face", "rocket", "slice of pizza", "sun with face",
)
ASSETS_ROOT = Path(__file__).resolve().parents[1] / "flextok" / "assets"
ASSETS = ASSETS_ROOT / "emoji"
FASHION_ASSETS = ASSETS_ROOT / "fashion-mnist"
FASHION_IMAGES = 200  # held-out test images reconstructed (a 64-image grid and the PSNR / class-kept table)
FASHION_CFG = 5.0  # the class generator's shipped setting (its model card: the asked class 97% of the time)
EOS_GENERATOR = "generator-eos.safetensors"  # trained with an end-of-sequence token on adaptive-length tokens
EMOJI_CFG = 3.0
DEFAULT_OUT = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flextok" / "quickstart"

# Log lines a stage must show even when its log is not: warnings, errors, tracebacks, glog W/E/F lines.
_ALARM = re.compile(r"\b(WARNING|ERROR|CRITICAL|FATAL)\b|Traceback|\w+(Error|Warning):|^\[[^\]]* [WEF] \d+ \d+\]")
# Ray core's one known-harmless C++ line per Ray Data actor pool (see pipelines/ray_logging.py).
_HARMLESS = ("has constructor arguments in the object store and max_restarts > 0",)
_FAILED_TAIL = 40  # log lines shown when a stage fails
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # Ray colours its worker prefixes


class StageFailed(RuntimeError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flextok quickstart",
        description="Show the shipped models (Fashion-MNIST reconstructions over k and class samples; "
        "emoji text samples), and run the pipeline on the emoji corpus: tokenize it with Ray Data, "
        "fine-tune (or train) a text-conditional generator with Ray Train, sample 8 prompts, reconstruct "
        "over k. Writes OUT/report.md.",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="output folder, outside the checkout by default (default: %(default)s)")
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
    p.add_argument("--limit", type=positive_int, help="use at most this many emoji (default: all 3,264 of the train split)")
    p.add_argument("--no-fashion-mnist", action="store_true",
                   help="skip the Fashion-MNIST part (it needs the OS package dataset-fashion-mnist)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print every stage's full log as it runs")
    p.add_argument("--quiet", action="store_true", help="the stages log warnings only")
    return p


def _bundled(name: str) -> Path | None:
    path = ASSETS / name
    return path if path.is_file() else None


def _sha256_recorded(generator: Path) -> str | None:
    from flextok.checkpoint import read_metadata

    return read_metadata(generator).get("tokenizer_sha256")


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:48]


class Stages:
    """Runs numbered stages as child processes, each echoed as a shell line, and times them.

    The child's stdout (a job's summary) is printed; its stderr (log lines, Ray's worker output) goes
    to `logs/<n>-<stage>.log`, and to the console only for lines that look like a warning or an
    error (all of it with `verbose`). On a terminal the latest log line is a status line, rewritten
    in place; a failed stage prints the end of its log."""

    def __init__(self, total: int, env: dict[str, str], logs: Path, *, verbose: bool = False,
                 console: TextIO | None = None) -> None:
        self.total, self.env, self.logs, self.verbose = total, env, logs, verbose
        self.console = console or sys.stdout
        self.live = self.console.isatty()
        self.done = 0
        self.timings: list[tuple[str, float]] = []

    def _say(self, text: str) -> None:
        self.console.write(text + "\n")
        self.console.flush()

    def _status(self, text: str) -> None:
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.console.write("\r\033[K" + text[:width])
        self.console.flush()

    def _clear_status(self) -> None:
        if self.live:
            self.console.write("\r\033[K")

    def run(self, title: str, module: str, *args: object) -> None:
        self.done += 1
        argv = [sys.executable, "-m", module, *map(str, args)]
        self._say(f"\n[{self.done}/{self.total}] {title}")
        self._say("    $ " + shlex.join(argv))
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{self.done:02d}-{_slug(title)}.log"
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            code, tail, alarms = self._follow(argv, log, t0)
        if alarms and code == 0 and not self.verbose:
            self._say(f"    (the lines above are from {log_path})")
        if code != 0:
            self._say(f"    --- last lines of {log_path} ---")
            for line in tail[-_FAILED_TAIL:]:
                self._say("    " + line)
            raise StageFailed(f"stage {self.done}/{self.total} ({title}) failed with exit status {code}; "
                              f"its log: {log_path}")
        self.timings.append((title, time.perf_counter() - t0))

    def _follow(self, argv: list[str], log: TextIO, t0: float) -> tuple[int, list[str], int]:
        proc = subprocess.Popen(argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1)
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
        tail: list[str] = []
        alarms, open_streams = 0, 2
        while open_streams:
            for key, _ in sel.select(timeout=1.0):
                line = key.fileobj.readline()
                if not line:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                line = _ANSI.sub("", line.rstrip("\n"))
                log.write(line + "\n")
                tail = (tail + [line])[-_FAILED_TAIL:]
                alarm = key.data == "err" and _ALARM.search(line) and not any(h in line for h in _HARMLESS)
                alarms += bool(alarm)
                if key.data == "out" or alarm or self.verbose:
                    self._clear_status()
                    self._say("    " + line)
                elif self.live and line.strip():
                    self._status(f"    {time.perf_counter() - t0:4.0f} s  {line.strip()}")
            log.flush()
        self._clear_status()
        return proc.wait(), tail, alarms

    def skip(self, title: str, why: str) -> None:
        self.done += 1
        self._say(f"\n[{self.done}/{self.total}] {title}: {why}")
        self.timings.append((f"{title} ({why})", 0.0))


def _psnr_table(per_k: list[dict], accuracy_label: str | None = None) -> list[str]:
    ks = [str(r["k"]) for r in per_k]
    lines = ["| k | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks),
             "| PSNR (dB) | " + " | ".join(f"{r['psnr']:.2f}" for r in per_k) + " |"]
    if accuracy_label and all(r.get("classifier_accuracy") is not None for r in per_k):
        lines.append(f"| {accuracy_label} | " + " | ".join(f"{100 * r['classifier_accuracy']:.0f}%" for r in per_k) + " |")
    return lines + [""]


def _read_metrics(eval_dir: Path) -> dict:
    path = eval_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _report(out: Path, facts: dict, timings: list[tuple[str, float]]) -> Path:
    lines = ["# FlexTok quickstart", ""]
    fm = facts.get("fashion")
    if fm:
        metrics = _read_metrics(out / "fashion-mnist" / "eval")
        lines += [
            "## Fashion-MNIST: the shipped tokenizer and class-conditional generator", "",
            f"Tokenizer: {fm['tokenizer']}; generator: {fm['generator']} (see their model cards).", "",
            "### Reconstructions over k", "",
            f"Each row is one held-out test image (never seen in training), then its reconstruction from the "
            f"first k tokens: the first token sets the garment's kind and rough shape, later ones add detail. "
            f"{metrics.get('num_images', '?')} test images, {fm['decoder_steps']} decoder step(s).", "",
            "![Fashion-MNIST reconstructions](fashion-mnist/eval/reconstructions.png)", "",
        ]
        if metrics.get("per_k"):
            kept = metrics.get("originals_classifier_accuracy")
            label = "class kept" + (f" (originals {100 * kept:.0f}%)" if kept is not None else "")
            lines += _psnr_table(metrics["per_k"], label)
            if kept is not None:
                lines += ["Class kept: how often the project's small judge classifier (shipped beside the "
                          "tokenizer) gives the reconstruction the image's true label.", ""]
        lines += [
            "### Samples of every class", "",
            f"![Fashion-MNIST class samples](fashion-mnist/classes.png)\n\nOne row per class, "
            f"{fm['per_class']} samples each: {fm['num_tokens']} tokens sampled by the class-conditional "
            f"generator at CFG {fm['cfg']:g}, decoded in {fm['decoder_steps']} step(s).", "",
        ]
        if fm.get("eos"):
            e = fm["eos"]
            lines += [
                "### Each image gets the tokens it needs", "",
                "![Fashion-MNIST class samples, lengths chosen by the generator](fashion-mnist/classes-eos.png)", "",
                f"The same classes from {e['generator']}, trained on adaptive-length tokens (per image the shortest "
                f"prefix whose reconstruction is within 20% of all 32 tokens') with an end-of-sequence token: it "
                f"stops each image where it chooses, here after {e['mean_tokens']:.1f} tokens on average "
                f"({e['min']} to {e['max']}) instead of 32.", "",
            ]
    elif facts.get("fashion_skipped"):
        lines += [f"Fashion-MNIST part skipped: {facts['fashion_skipped']}.", ""]
    em = facts["emoji"]
    metrics = _read_metrics(out / "eval")
    lines += [
        "## Emoji: the pipeline on a corpus built here", "",
        f"Corpus: {em['images']} emoji rendered from the Noto Color Emoji font (captions = emoji names), "
        "tokenized with the Ray Data pipeline.",
        f"Tokenizer: {em['tokenizer']} ({em['tokenizer_source']}).",
        f"Generator: {em['generator']} ({em['generator_source']}).", "",
        "### Samples for 8 prompts", "",
        f"![emoji samples](samples.png)\n\n{em['num_tokens']} tokens per image, CFG {em['cfg']:g}, "
        f"{em['decoder_steps']} decoder step(s). The emoji models are tiny and briefly trained on 3,264 "
        "images: expect the colours and rough layout of the prompt, not a crisp emoji.", "",
        "### Reconstructions over k", "",
        "Each row is one held-out emoji decoded from its first k tokens (k = 1, 2, 4, ...).", "",
        "![emoji reconstructions](eval/reconstructions.png)", "",
        "![PSNR vs k](eval/psnr_vs_k.png)", "",
    ]
    if metrics.get("per_k"):
        lines += _psnr_table(metrics["per_k"])
    lines += ["## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {title} | {secs:.0f} |" for title, secs in timings]
    lines += ["", f"Total: {sum(s for _, s in timings):.0f} s. Logs: `logs/`."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _fashion_missing() -> str | None:
    from pipelines.corpus import FASHION_MNIST_DIR

    for name in ("tokenizer.safetensors", "generator.safetensors"):
        if not (FASHION_ASSETS / name).is_file():
            return f"{FASHION_ASSETS / name} is not in this checkout"
    if not FASHION_MNIST_DIR.is_dir():
        return f"{FASHION_MNIST_DIR} is missing (install the OS package dataset-fashion-mnist)"
    return None


def run(args: argparse.Namespace) -> int:
    for flag, value in (("--tokenizer", args.tokenizer), ("--generator", args.generator)):
        if value and not Path(value).exists():
            raise FileNotFoundError(f"{flag} {value} does not exist")
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    quiet = ["--quiet"] if args.quiet else []
    fashion_skipped = "--no-fashion-mnist" if args.no_fashion_mnist else _fashion_missing()
    fashion_stages = 4 if (FASHION_ASSETS / EOS_GENERATOR).is_file() else 3
    stages = Stages(7 + (0 if fashion_skipped else fashion_stages), dict(os.environ), out / "logs", verbose=args.verbose)
    print(f"flextok quickstart -> {out}", flush=True)
    facts: dict = {"fashion_skipped": fashion_skipped}
    if not fashion_skipped:
        facts["fashion"] = _fashion(stages, out / "fashion-mnist", args, quiet)
    facts["emoji"] = _emoji(stages, out, args, quiet)
    report = _report(out, facts, stages.timings)
    print(f"\nDone in {time.perf_counter() - t0:.0f} s. Report: {report}")
    return 0


def _fashion(stages: Stages, out: Path, args: argparse.Namespace, quiet: list[str]) -> dict:
    tokenizer, generator = FASHION_ASSETS / "tokenizer.safetensors", FASHION_ASSETS / "generator.safetensors"
    judge = FASHION_ASSETS / "judge.safetensors"
    stages.run(f"Fashion-MNIST test split ({FASHION_IMAGES} images, never seen in training)", "jobs.corpus",
               "fashion-mnist", "--out", out / "test", "--split", "test", "--limit", FASHION_IMAGES, *quiet)
    stages.run("reconstruct Fashion-MNIST test images over k (shipped tokenizer)", "jobs.evaluate", "tokenizer",
               "--tokenizer", tokenizer, "--data", out / "test", "--out", out / "eval",
               "--max-images", FASHION_IMAGES, "--steps", args.decoder_steps,
               *(["--classifier", judge] if judge.is_file() else []), "--seed", args.seed, *quiet)
    per_class = 6
    stages.run("sample every Fashion-MNIST class (shipped class-conditional generator)", "jobs.sample",
               "--generator", generator, "--tokenizer", tokenizer, "--labels", *range(10), "--num-tokens", 32,
               "--per-condition", per_class, "--cfg-scale", FASHION_CFG, "--decoder-steps", args.decoder_steps,
               "--seed", args.seed, "--out", out / "classes.png", *quiet)
    facts = {"tokenizer": tokenizer.relative_to(ASSETS_ROOT.parents[1]),
             "generator": generator.relative_to(ASSETS_ROOT.parents[1]), "per_class": per_class,
             "num_tokens": 32, "cfg": FASHION_CFG, "decoder_steps": args.decoder_steps}
    eos = FASHION_ASSETS / EOS_GENERATOR
    if eos.is_file():
        stages.run("sample every class with the generator that chooses each image's length (end-of-sequence token)",
                   "jobs.sample", "--generator", eos, "--tokenizer", tokenizer, "--labels", *range(10),
                   "--per-condition", per_class, "--cfg-scale", FASHION_CFG, "--decoder-steps", args.decoder_steps,
                   "--seed", args.seed, "--save-tokens", out / "classes-eos.parquet", "--out", out / "classes-eos.png",
                   *quiet)
        import pyarrow.parquet as pq

        lengths = pq.read_table(out / "classes-eos.parquet", columns=["num_tokens"]).column("num_tokens").to_pylist()
        facts["eos"] = {"generator": eos.relative_to(ASSETS_ROOT.parents[1]),
                        "mean_tokens": sum(lengths) / len(lengths), "min": min(lengths), "max": max(lengths)}
    return facts


def _emoji(stages: Stages, out: Path, args: argparse.Namespace, quiet: list[str]) -> dict:
    limit = ["--limit", str(args.limit)] if args.limit else []
    corpus = out / "corpus"
    stages.run("emoji corpus from the OS fonts (train split)", "jobs.corpus", "emoji",
               "--out", corpus / "train", "--size", "32", "--split", "train", *limit, *quiet)
    stages.run("emoji corpus (64 held-out emoji of the test split)", "jobs.corpus", "emoji",
               "--out", corpus / "test", "--size", "32", "--split", "test", "--limit", "64", *quiet)

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

    stages.run("tokenize the emoji corpus with the Ray Data pipeline", "jobs.tokenize",
               "--input", corpus / "train", "--output", out / "tokens", "--model", tokenizer, *quiet)

    from flextok.checkpoint import read_metadata
    from flextok.runs import speaks_tokens_of

    generator = Path(args.generator) if args.generator else _bundled("generator.safetensors")
    if generator is not None and not args.generator and not speaks_tokens_of(tokenizer, _sha256_recorded(generator)):
        generator = None  # the bundled generator speaks another tokenizer's tokens
    if generator is not None and not args.generator and args.finetune_steps:
        stages.run(f"fine-tune the bundled text-conditional generator on these tokens with Ray Train "
                   f"({args.finetune_steps} steps)",
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
        stages.run(f"train a text-conditional generator briefly with Ray Train ({args.generator_steps} steps)",
                   "jobs.train_generator", "--tokens", out / "tokens", "--output", out / "generator",
                   "--cond", "text", "--tokenizer", tokenizer, "--max-steps", args.generator_steps,
                   "--seed", args.seed, *quiet)
        generator = out / "generator"
        generator_source = f"trained here for {args.generator_steps} steps"

    num_tokens = json.loads(read_metadata(tokenizer)["config"])["num_registers"]
    stages.run("sample 8 prompts", "jobs.sample", "--generator", generator, "--tokenizer", tokenizer,
               "--prompts", *PROMPTS, "--num-tokens", num_tokens, "--cfg-scale", EMOJI_CFG,
               "--decoder-steps", args.decoder_steps, "--seed", args.seed, "--out", out / "samples.png", *quiet)
    stages.run("reconstruct held-out emoji over k", "jobs.evaluate", "tokenizer", "--tokenizer", tokenizer,
               "--data", corpus / "test", "--out", out / "eval", "--max-images", "64", "--steps", args.decoder_steps,
               "--seed", args.seed, *quiet)
    return {
        "images": json.loads((corpus / "train" / "dataset.json").read_text()).get("num_samples", "?"),
        "tokenizer": tokenizer, "tokenizer_source": tokenizer_source,
        "generator": generator, "generator_source": generator_source,
        "num_tokens": num_tokens, "cfg": EMOJI_CFG, "decoder_steps": args.decoder_steps,
    }


def main(argv: Sequence[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except StageFailed as e:
            raise ValueError(str(e)) from None

    return run_cli("flextok quickstart", body, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
