"""The models shipped under flextok/assets/: present, small, loadable, self-consistent and not untrained.

Each checkpoint must load through the public API, carry the config it was trained with, sit beside a
model card that names its exact sha256, and (generators) name the sha256 of the tokenizer beside it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import flextok
from flextok import FlexTok, Generator
from flextok.checkpoint import file_sha256, load_checkpoint, read_metadata, same_tokens_shas
from flextok.classifier import Classifier
from flextok.sampling import resolve_tokenizer

ASSETS = Path(flextok.__file__).parent / "assets"
SHIPPED = {
    "fashion-mnist/tokenizer.safetensors": "FlexTok",
    "fashion-mnist/generator.safetensors": "Generator",
    "fashion-mnist/generator-eos.safetensors": "Generator",
    "fashion-mnist/judge.safetensors": "Classifier",
    "emoji/tokenizer.safetensors": "FlexTok",
    "emoji/generator.safetensors": "Generator",
}
MAX_TOTAL_BYTES = 32_000_000  # 22.5 MB of the first four models and the judge, 7.5 MB of the EOS generator


def _load(path: Path):
    kind = read_metadata(path)["kind"]
    if kind == "FlexTok":
        return FlexTok.from_pretrained(path)
    if kind == "Generator":
        return Generator.from_pretrained(path)
    return Classifier.from_pretrained(path)


def test_every_shipped_model_is_there_and_small():
    found = {str(p.relative_to(ASSETS)) for p in ASSETS.rglob("*.safetensors")}
    assert found == set(SHIPPED)
    total = sum((ASSETS / name).stat().st_size for name in found)
    assert total <= MAX_TOTAL_BYTES, f"{total / 1e6:.1f} MB of checkpoints"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_checkpoint_loads_with_its_recorded_config_and_card(name):
    path = ASSETS / name
    md = read_metadata(path)
    assert md["kind"] == SHIPPED[name]
    model = _load(path)
    recorded, loaded = json.loads(md["config"]), json.loads(json.dumps(model.config.to_dict()))  # tuples vs lists
    if SHIPPED[name] == "FlexTok":
        # written when the training objective lived in the architecture config: it is read back as the
        # objective the model was trained with, and the architecture is the rest
        from flextok.config import OBJECTIVE_FIELDS

        objective = FlexTok.objective_of(path).to_dict()
        assert {k: objective[k] for k in recorded if k in OBJECTIVE_FIELDS} == {
            k: v for k, v in recorded.items() if k in OBJECTIVE_FIELDS}
        recorded = {k: v for k, v in recorded.items() if k not in OBJECTIVE_FIELDS}
    if SHIPPED[name] == "FlexTok" and "norm_eps" not in recorded:
        # written before the numerical conventions were recorded: loads with those it was trained with
        # (LayerNorm eps 1e-6, time features of period 10^4, FSQ half-width (L - 1)(1 - 1e-3)/2), not
        # with today's defaults (the official release's)
        conventions = (loaded.pop("norm_eps"), loaded.pop("time_max_period"), loaded.pop("max_timestep"),
                       loaded["fsq"].pop("bound_eps"))
        assert conventions == (1e-6, 1e4, 1.0, -1e-3)
    assert {key: loaded[key] for key in recorded} == recorded
    # fields added to the config after the checkpoint was written load with their defaults
    defaults = {f.name: f.default for f in dataclasses.fields(model.config)}
    assert {key: loaded[key] for key in set(loaded) - set(recorded)} == {
        key: defaults[key] for key in set(loaded) - set(recorded)}
    stored, _ = load_checkpoint(path, dtype=None)
    floats = {v.dtype for v in stored.values() if v.is_floating_point()}
    assert floats == {torch.float16}, f"{name} ships {floats}"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # computes in fp32
    if SHIPPED[name] != "Classifier":  # the judge's card is the Fashion-MNIST tokenizer's evaluation
        card = path.with_suffix(".md")
        assert card.is_file(), f"{name} has no model card"
        assert file_sha256(path) in card.read_text(), f"{card.name} does not describe this file (sha256)"


@pytest.mark.parametrize("folder", ["fashion-mnist", "emoji"])
def test_generator_records_the_tokenizer_beside_it(folder):
    tokenizer = FlexTok.from_pretrained(ASSETS / folder / "tokenizer.safetensors")
    generator = Generator.from_pretrained(ASSETS / folder / "generator.safetensors")
    # that very file, or one it keeps the tokens of (a decoder-only fine-tune)
    assert generator.tokenizer_sha256 in same_tokens_shas(ASSETS / folder / "tokenizer.safetensors")
    generator.check_tokenizer(tokenizer.config)
    assert resolve_tokenizer(generator, ASSETS / folder / "generator.safetensors") == str(
        ASSETS / folder / "tokenizer.safetensors")


def test_the_eos_generator_speaks_the_tokenizer_beside_it_and_stops_near_the_data_length():
    """Plain conditional sampling follows the length distribution the generator learned: its mean
    length must be within 10% of its training data's (11.70 tokens per image, the adaptive-length
    manifest of the 6,000 training images; the card's notes)."""
    from flextok.generator import token_lengths

    path = ASSETS / "fashion-mnist/generator-eos.safetensors"
    generator = Generator.from_pretrained(path)
    assert generator.config.use_eos and generator.config.vocab_size == 1001
    assert resolve_tokenizer(generator, path) == str(ASSETS / "fashion-mnist/tokenizer.safetensors")
    assert json.loads(read_metadata(path)["length_target"])["max_relative_error"] == 0.2
    tokens = generator.generate(torch.arange(10).repeat(40), generator=torch.Generator().manual_seed(0))
    lengths = token_lengths(tokens).float()
    assert abs(lengths.mean().item() - 11.70) <= 0.1 * 11.70, lengths.mean()
    assert lengths.min() >= 1 and len(lengths.unique()) > 1


def test_class_generator_names_its_classes():
    md = read_metadata(ASSETS / "fashion-mnist/generator.safetensors")
    generator = Generator.from_pretrained(ASSETS / "fashion-mnist/generator.safetensors")
    assert generator.config.cond == "class"
    assert json.loads(md["class_names"])[:2] == ["T-shirt/top", "Trouser"]
    assert len(json.loads(md["class_names"])) == generator.config.num_classes == 10
    assert Generator.from_pretrained(ASSETS / "emoji/generator.safetensors").config.cond == "text"


def test_the_fashion_mnist_tokenizer_is_trained(tmp_path):
    """On real held-out images: more tokens reconstruct better, far above the ~11 dB of predicting the
    mean image (an untrained tokenizer does no better than that, and gains nothing from more tokens)."""
    from pipelines.corpus import build_corpus

    build_corpus("fashion-mnist", tmp_path / "test", split="test", limit=32, samples_per_shard=32)
    from pipelines.images import read_corpus

    tokenizer = FlexTok.from_pretrained(ASSETS / "fashion-mnist/tokenizer.safetensors").eval()
    corpus = read_corpus(str(tmp_path / "test"), tokenizer.config.image_size)
    images = corpus.images.float() / 127.5 - 1
    with torch.no_grad():
        ids = tokenizer.tokenize(images)
        psnr = {}
        for k in (1, 32):
            rec = tokenizer.detokenize(ids[:, :k], steps=1, generator=torch.Generator().manual_seed(0))
            psnr[k] = (10 * torch.log10(4 / (rec - images).pow(2).mean(dim=(1, 2, 3)))).mean().item()
    # issue 6's bar at K is 17 dB (aim 20); on these 32 images the shipped (stage-5) file gives 20.72 dB at
    # K, 4.75 dB above k = 1 (stage 4 before it: 20.35 and +4.4; stage 3: 19.54 and +3.7; stage 2: 17.9 and
    # +1.6), so a regression to an earlier stage fails here
    assert psnr[32] > psnr[1] + 4.5 and psnr[32] > 20.5, psnr


# The cards quote the reproduce script's `# [card NAME]` blocks: one source for both.
REPO = Path(__file__).resolve().parents[1]
CARDS = {"fashion-mnist/tokenizer.md": "fm-tokenizer", "fashion-mnist/generator.md": "fm-generator",
         "fashion-mnist/generator-eos.md": "fm-generator-eos",
         "emoji/tokenizer.md": "emoji-tokenizer", "emoji/generator.md": "emoji-generator"}


def _card_commands(name: str) -> str:
    import importlib.util

    spec = importlib.util.spec_from_file_location("model_card", REPO / "scripts" / "model_card.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.card_commands((REPO / "scripts" / "train_shipped_models.sh").read_text(), name)


@pytest.mark.parametrize("card", sorted(CARDS))
def test_cards_quote_the_reproduce_script(card):
    text = (ASSETS / card).read_text()
    block = text.split("## Commands", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert block == _card_commands(CARDS[card])


@pytest.mark.parametrize("name", sorted(set(CARDS.values())))
def test_every_reproduce_command_is_accepted_by_the_cli(name):
    """Each `flextok ...` command of a card parses with its job's own parser (no flag renamed or dropped)."""
    import importlib
    import shlex

    from jobs.cli import COMMANDS

    joined = _card_commands(name).replace("\\\n", " ")
    commands = [shlex.split(line.replace("$cfg", "3")) for line in joined.splitlines()
                if line.strip().startswith("flextok ")]
    assert len(commands) >= 4
    for words in commands:
        assert words[1] in COMMANDS, words
        parser = importlib.import_module(COMMANDS[words[1]][0]).build_parser()
        parser.parse_args(words[2:])  # argparse exits (SystemExit fails the test) on an unknown flag
