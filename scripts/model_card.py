"""Write the model card (Markdown) of a shipped checkpoint from the files its jobs left behind.

    python scripts/model_card.py ASSET.safetensors --run RUN [--run RUN2 ...] --eval EVAL_DIR [--eval EVAL_DIR ...]
        --data "..." --commands NAME [--script SCRIPT] [--notes-file NOTES.md] [--note "..."]

Reads ASSET's metadata (kind, config, provenance), RUN/train_summary.json and RUN/job.json (steps,
images or tokens seen, wall time, training settings) and each EVAL_DIR/metrics.json written by
`flextok evaluate`, and writes ASSET with the suffix .md beside it. The card's commands are the blocks
of SCRIPT (`scripts/train_shipped_models.sh`) marked `# [card NAME]` ... `# [/card]`, written as a user
types them (`flextok ...`, default paths, no log redirection), so the card cannot drift from the script. The card carries ASSET's sha256,
so `tests/flextok/test_shipped_models.py` notices a card that no longer matches its file.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from flextok.checkpoint import file_sha256, read_metadata


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def tokenizer_section(metrics: dict) -> list[str]:
    lines = [
        f"Decoder: {metrics['steps']} Euler step(s), guidance {metrics['guidance']}"
        f"{' (APG)' if metrics.get('apg') else ''}, seed {metrics['seed']}; "
        f"{metrics['num_images']} held-out images of `{Path(metrics['data']).name}`; mean-image PSNR baseline "
        f"{_fmt(metrics['mean_image_psnr'])} dB.",
    ]
    if metrics.get("originals_classifier_accuracy") is not None:
        lines.append(f"The judge classifier gives the originals their true label "
                     f"{100 * metrics['originals_classifier_accuracy']:.1f}% of the time.")
    if metrics.get("fid_feature_space_description"):
        lines.append(f"rFID: reconstructions at k against the originals, in {metrics['fid_feature_space_description']}.")
    rows = metrics["per_k"]
    has_acc = any(r.get("classifier_accuracy") is not None for r in rows)
    has_fid = any("fid" in r for r in rows)
    header = "| k | PSNR (dB) | MSE |" + (" class kept |" if has_acc else "") + (" rFID |" if has_fid else "")
    lines += ["", header, "|---|---|---|" + ("---|" if has_acc else "") + ("---|" if has_fid else "")]
    for r in rows:
        line = f"| {r['k']} | {r['psnr']:.2f} | {r['mse']:.4f} |"
        if has_acc:
            line += f" {100 * r['classifier_accuracy']:.1f}% |"
        if has_fid:
            line += f" {r['fid']:.2f} |"
        lines.append(line)
    return lines


def generator_section(metrics: dict) -> list[str]:
    s = metrics.get("sampling", {})
    lines = [
        f"Sampling: {json.dumps(s, sort_keys=True)}; {metrics.get('num_samples')} samples per k against "
        f"`{Path(metrics['data']).name}`. FID feature space: {metrics.get('fid_feature_space_description')}.",
    ]
    if metrics.get("reference_floor_fid") is not None:
        lines.append(f"FID floor (held-out images against other held-out images, same count): "
                     f"{metrics['reference_floor_fid']:.2f}.")
    if metrics.get("classifier_accuracy_on_reference") is not None:
        lines.append(f"The judge classifier labels the real held-out images correctly "
                     f"{100 * metrics['classifier_accuracy_on_reference']:.1f}% of the time.")
    rows = metrics["per_k"]
    has_acc = any(r.get("class_accuracy") is not None for r in rows)
    lengths = metrics.get("lengths")  # a generator with an end-of-sequence token: k is a cap
    lines += ["", ("| cap k | tokens per sample |" if lengths else "| k |") + " FID |"
              + (" samples of the asked class |" if has_acc else ""),
              "|---|---|" + ("---|" if lengths else "") + ("---|" if has_acc else "")]
    for r in rows:
        line = f"| {r['k']} |" + (f" {r['mean_tokens']:.2f} |" if lengths else "") + f" {r['fid']:.2f} |"
        if has_acc:
            line += f" {100 * r['class_accuracy']:.1f}% |"
        lines.append(line)
    if lengths:
        lines.append("")
        if lengths.get("data"):
            d = lengths["data"]
            lines.append(f"Tokens per image: samples {lengths['samples']['mean']:.2f} on average, held-out images "
                         f"{d['mean']:.2f} under the tokenizer's adaptive target ({d['target']}, {d['images']} images).")
        if lengths.get("baseline"):
            lines.append(f"At equal quality, against `{Path(lengths['baseline']['generator']).name}`: "
                         f"{lengths['baseline']['summary']}.")
    return lines


def _stage(run: Path, asset: Path) -> tuple[dict, dict]:
    """(summary, job) of a finished run folder, or of one checkpoint of a run stopped early
    (RUN/checkpoint_N: its train state stands in for the summary the run never wrote)."""
    if (run / "train_summary.json").is_file():
        return json.loads((run / "train_summary.json").read_text()), json.loads((run / "job.json").read_text())
    job = json.loads((run.parent / "job.json").read_text())
    state = json.loads(read_metadata(run / "train_state.safetensors")["train_state"])
    from flextok import FlexTok, Generator

    model = (FlexTok if job["job"] == "train-tokenizer" else Generator).from_pretrained(asset)
    res = job["resources"]
    summary = {**state, "num_parameters": sum(p.numel() for p in model.parameters()),
               "item_name": "images" if job["job"] == "train-tokenizer" else "tokens",
               "world_size": res["num_workers"], "device": "cuda" if res["use_gpu"] else "cpu",
               "wall_seconds_this_run": state["train_seconds"],
               "stopped_early": f"stopped at step {state['step']} of a {job['train']['max_steps']}-step schedule "
                                f"(the checkpoint `{run.name}`)"}
    return summary, job


SCRIPT = Path(__file__).with_name("train_shipped_models.sh")
_ASSIGNMENT = re.compile(r"^([A-Z_]+)=(?:\$\{\1:-(.*)\}|(\S+))$")  # NAME=value or NAME=${NAME:-default}
_VARIABLE = re.compile(r"\$\{?([A-Z_]+)\}?")
_JOB_CONTROL = re.compile(r"^(\w+=\$!|wait\b.*)$")  # `pid=$!`, `wait $pid`: how the script overlaps runs
_LOG_REDIRECT = re.compile(r"\s*>\s*\S+\s+2>&1")


def card_commands(script: str, name: str) -> str:
    """The commands of the blocks marked `# [card NAME]` ... `# [/card]` in `script`, as a user types them."""
    values = {"FLEXTOK": "flextok"}  # the console script, not the venv path the shell script defaults to

    def expand(text: str) -> str:
        return _VARIABLE.sub(lambda m: values.get(m.group(1), m.group(0)), text)

    out, inside = [], False
    for line in script.splitlines():
        stripped = line.strip()
        if not inside and (m := _ASSIGNMENT.match(stripped)) and m.group(1) not in values:
            values[m.group(1)] = expand(m.group(2) if m.group(2) is not None else m.group(3))
        if stripped == f"# [card {name}]":
            inside = True
        elif stripped == "# [/card]":
            inside = False
        elif inside and stripped and not _JOB_CONTROL.match(stripped):
            line = re.sub(r'"([^" $]*/[^" $]*)"', r"\1", _LOG_REDIRECT.sub("", expand(line)))  # unquote plain paths
            line = line.rstrip().removesuffix("&").rstrip()
            if line:
                out.append(line)
            elif out and out[-1].endswith("\\"):  # the redirection had a continuation line of its own
                out[-1] = out[-1].removesuffix("\\").rstrip()
    if not out:
        raise ValueError(f"no '# [card {name}]' block in the script")
    return "\n".join(out)


def read_notes(path: Path) -> list[str]:
    """The paragraphs of a notes file, each joined into one line (a leading "- " is dropped)."""
    paragraphs = [" ".join(block.split()) for block in path.read_text().split("\n\n")]
    return [p.removeprefix("- ") for p in paragraphs if p]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("asset", type=Path)
    p.add_argument("--run", type=Path, action="append", required=True,
                   help="the training run folder; repeat for the stages of a multi-stage model, in order")
    p.add_argument("--eval", type=Path, action="append", default=[], help="a `flextok evaluate` report folder")
    p.add_argument("--data", required=True, help="training data and split, in words")
    p.add_argument("--commands", required=True, metavar="NAME", help="the script's `# [card NAME]` blocks")
    p.add_argument("--script", type=Path, default=SCRIPT, help="the reproduce script (default %(default)s)")
    p.add_argument("--notes-file", type=Path, action="append", default=[],
                   help="notes written by hand (measured figures, reasons), one per paragraph; blank lines separate them")
    p.add_argument("--note", action="append", default=[], help="a sentence for the notes section")
    args = p.parse_args()
    notes = [n for f in args.notes_file for n in read_notes(f)] + args.note

    md = read_metadata(args.asset)
    kind, config = md["kind"], json.loads(md["config"])
    stages = [_stage(run, args.asset) for run in args.run]
    name = f"{args.asset.parent.name}/{args.asset.stem}"
    lines = [
        f"# {name} ({kind})", "",
        f"- file: `{args.asset.name}`, {args.asset.stat().st_size / 1e6:.1f} MB, sha256 `{file_sha256(args.asset)}`",
        f"- weights: {stages[-1][0]['num_parameters']:,} parameters, stored in fp16 (loaded as fp32)",
        f"- data: {args.data}",
    ]
    for i, (summary, job) in enumerate(stages, 1):
        staged = len(stages) > 1
        label = f"stage {i} ({'decoder only, encoder frozen' if job['model'].get('frozen') else 'all weights'}): " \
            if staged else ""
        lines += [
            f"- training: {label}{summary['step']} steps of batch {job['train']['batch_size']} "
            f"({summary['items_seen']:,} {summary['item_name']}), {_duration(summary['train_seconds'])} of training "
            f"on {summary['world_size']} {summary['device']} worker(s) (wall {_duration(summary['wall_seconds_this_run'])}), "
            f"final loss {summary['loss']:.4f}" + (f"; {summary['stopped_early']}" if summary.get("stopped_early") else ""),
            f"- optimiser{f' (stage {i})' if staged else ''}: AdamW lr {job['train']['lr']}, warm-up "
            f"{job['train']['warmup_steps']}, cosine to {job['train']['min_lr_ratio']}x over {job['train']['max_steps']} "
            f"steps, weight decay {job['train']['weight_decay']}, EMA {job['train']['ema_decay']}, seed {job['train']['seed']}",
        ]
    if kind == "Generator":
        lines.append(f"- tokenizer: sha256 `{md.get('tokenizer_sha256')}` (`tokenizer.safetensors` beside this file)")
        if md.get("class_names"):
            lines.append(f"- classes: {', '.join(json.loads(md['class_names']))}")
        if md.get("text_encoder"):
            lines.append(f"- text encoder (frozen, not in this file): `{md['text_encoder']}`")
    lines += ["", "## Config", "", "```json", json.dumps(config, indent=1, sort_keys=True), "```", "",
              "## Commands (from the repository root; `scripts/train_shipped_models.sh` runs them all)", "", "```bash",
              card_commands(args.script.read_text(), args.commands), "```"]
    for folder in args.eval:
        if (folder / "metrics.json").is_file():
            metrics = json.loads((folder / "metrics.json").read_text())
            lines += ["", f"## Evaluation: `{folder.name}` (`flextok evaluate {metrics['kind']}`)", ""]
            lines += tokenizer_section(metrics) if metrics["kind"] == "tokenizer" else generator_section(metrics)
        else:
            lines += ["", f"## Pictures: `{folder.name}` (`flextok sample`)"]
        pictures = sorted(q.name for q in folder.glob("*.png"))
        rel = Path("reports") / folder.name
        lines += [""] + [f"![{q}]({rel / q})" for q in pictures]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    out = args.asset.with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    print(f"model card {out}")


if __name__ == "__main__":
    main()
