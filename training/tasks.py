"""Tasks: what is trained and how its loss, batches, checkpoints and grids look, as picklable hooks.

`TokenizerTask` trains FlexTok on images; `GeneratorTask` an AR generator on token rows (class
labels, or captions through a frozen text encoder cached per worker). Pure PyTorch hooks: the loop
(`training.loop`) and the `Trainer` call them and know nothing of either model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from ray.data.collate_fn import ArrowBatchCollateFn
from torch import nn

from training.data import PixelCollate, TokenCollate, batch_to_device

MAX_CACHED_CAPTIONS = 200_000  # per worker; beyond that captions are encoded batch by batch
_TEXT_ENCODERS: dict[tuple[str, int, str], Any] = {}  # per process: (name, max_length, device) -> encoder
_CAPTION_CACHE: dict[tuple[str, str], Any] = {}  # (encoder name, caption) -> states (n, E) on device
_TOKENIZERS: dict[tuple[str, str], Any] = {}  # (path, device) -> FlexTok for grids


class TrainTask(Protocol):
    """What a job supplies: pure PyTorch hooks, picklable (it is shipped to every worker)."""

    name: str  # "tokenizer" / "generator", for logs
    item_name: str  # throughput unit: "images" or "tokens"
    find_unused_parameters: bool

    def build_model(self, device: torch.device) -> nn.Module: ...
    def blocks(self, model: nn.Module) -> list[nn.Module]: ...
    def example_batch(self, batch_size: int, device: torch.device) -> Any: ...
    def train_flops_per_item(self) -> float: ...
    def collate_fn(self) -> ArrowBatchCollateFn: ...
    def prepare_batch(self, batch: Any, device: torch.device) -> Any: ...
    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor: ...
    def num_items(self, batch: Any) -> int: ...
    def loss_weight(self, batch: Any) -> int | None: ...  # targets the loss averages (None: batches weigh alike)
    def positions(self, batch: Any) -> tuple[int, int] | None: ...  # (computed, real) positions: padding
    def save_pretrained(self, model: nn.Module, path: Path, *, step: int) -> None: ...
    def grid(self, model: nn.Module, reference: Any) -> tuple[torch.Tensor, list[str], list[str]] | None: ...
    def describe(self) -> dict[str, Any]: ...


# The tokenizer ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizerTask:
    """The tokenizer's hooks for the training loop (shipped to every worker)."""

    config: Any  # FlexTokConfig: the architecture
    preset: str | None
    objective: Any = None  # TokenizerObjective: how it trains (None: the defaults)
    grid_images: int = 8
    grid_steps: int = 25
    name: str = "tokenizer"
    item_name: str = "images"
    find_unused_parameters: bool = False  # mask and null tokens enter the graph through torch.where
    init_path: str | None = None  # fine-tuning: the weights to start from (a path or a URL: `resolve_init`)
    init_sha256: str | None = None
    init_storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)  # may hold secrets
    same_tokens_as: tuple[str, ...] = ()  # --freeze-encoder: the checkpoints whose tokens this run keeps

    def build_model(self, device):
        from flextok import FlexTok

        model = FlexTok.from_config(self.config, device)
        if self.init_path is not None:
            from training.runs import init_file

            init = FlexTok.from_pretrained(init_file(self.init_path, self.init_sha256, self.init_storage_options),
                                           device=device)
            if init.config.decoder_depth < self.config.decoder_depth:  # --decoder-depth grows the decoder
                model.load_with_fewer_decoder_blocks(init.state_dict())
            else:
                model.load_state_dict_strict(init.state_dict())
            model.checkpoint_id = f"init:{self.init_path}"
        else:
            model.checkpoint_id = f"preset:{self.preset}"
        return model.freeze_tokens() if self.same_tokens_as else model

    def blocks(self, model) -> list[nn.Module]:
        """The transformer blocks: units of FSDP sharding, activation checkpointing and compilation."""
        return [*model.encoder.blocks, *model.decoder.blocks]

    def train_flops_per_item(self) -> float:
        """Matmul FLOPs of one training image: 3x the forward (backward = 2x), encoder + one decoder pass."""
        from flextok.flops import decoder_flops, encoder_flops

        return 3.0 * (encoder_flops(self.config) + decoder_flops(self.config))

    def example_batch(self, batch_size: int, device) -> torch.Tensor:
        """A prepared batch of this shape (the memory plan runs it on the meta device)."""
        size = self.config.image_size
        return torch.zeros(batch_size, 3, size, size, device=device)

    def collate_fn(self):
        return PixelCollate(self.config.image_size)

    def prepare_batch(self, batch, device):
        """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], converted on the device."""
        pixels = batch["pixels"].to(device, non_blocking=True)
        return pixels.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (B, 3, H, W)

    def loss(self, model, images, generator):
        return model(images, generator=generator, objective=self.objective)["loss"]

    def num_items(self, images) -> int:
        return int(images.shape[0])

    def loss_weight(self, images) -> None:
        return None  # every image weighs alike: micro-batches of equal size weigh alike

    def positions(self, images) -> None:
        return None  # images are never padded

    def save_pretrained(self, model, path, *, step: int) -> None:
        from flextok.checkpoint import SAME_TOKENS_KEY
        from flextok.tokenizer import OBJECTIVE_KEY

        extra: dict[str, Any] = {"step": step, OBJECTIVE_KEY: self._objective().to_dict()}
        if self.same_tokens_as:
            extra[SAME_TOKENS_KEY] = list(self.same_tokens_as)
        model.save_pretrained(path, extra=extra)

    def grid(self, model, images):
        """Rows: training images; columns: the input, then reconstructions from k = 1, 2, 4, .., K tokens."""
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

    def _objective(self):
        from flextok.config import TokenizerObjective

        return self.objective if self.objective is not None else TokenizerObjective()

    def describe(self) -> dict[str, Any]:
        described = {"kind": "FlexTok", "preset": self.preset, "config": self.config.to_dict(),
                     "objective": self._objective().to_dict()}
        if self.init_path is not None:
            described.update(init=self.init_path, init_sha256=self.init_sha256)
        if self.same_tokens_as:
            described.update(frozen="encoder (tokens kept)", same_tokens_as_sha256=list(self.same_tokens_as))
        return described


# The generators --------------------------------------------------------------------------------
def text_encoder(name: str, max_length: int, device) -> Any:
    """The frozen text encoder, loaded once per worker process."""
    from flextok.text_encoder import load_text_encoder

    key = (name, max_length, str(device))
    if key not in _TEXT_ENCODERS:
        _TEXT_ENCODERS[key] = load_text_encoder(name, max_length=max_length, device=device)
    return _TEXT_ENCODERS[key]


def encode_captions(encoder: Any, captions: list[str]) -> tuple[Any, Any]:
    """Captions -> (states (B, T, E), mask (B, T)) as `TextEncoder.encode` gives, from a cache."""
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
    """The generator's hooks for the training loop (shipped to every worker)."""

    config: Any  # GPTConfig
    tokenizer_id: str | None
    tokenizer_sha256: str | None
    tokenizer_path: str | None = None  # decodes grids; None = no grids
    class_names: tuple[str, ...] = ()  # names of the labels, recorded in the checkpoint for `flextok sample`
    init_path: str | None = None  # fine-tuning: the weights to start from (a path or a URL: `resolve_init`)
    init_sha256: str | None = None
    init_storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)  # may hold secrets
    length_target: str | None = None  # JSON: the adaptive-length target of the training tokens, if any
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
        from flextok.generator import Generator

        encoder = self._encoder(device) if self.config.cond == "text" else None
        with torch.device(device):
            model = Generator(self.config, text_encoder=encoder, tokenizer_id=self.tokenizer_id,
                              tokenizer_sha256=self.tokenizer_sha256)
        if self.init_path is not None:
            from training.runs import init_file

            init = init_file(self.init_path, self.init_sha256, self.init_storage_options)
            model.load_state_dict(Generator.from_pretrained(init, device=device).state_dict(), strict=True)
        return model

    def blocks(self, model) -> list[nn.Module]:
        """The transformer blocks: units of FSDP sharding, activation checkpointing and compilation."""
        return list(model.gpt.blocks)

    def train_flops_per_item(self) -> float:
        """Matmul FLOPs of one training token: 3x the forward (backward = 2x). Per token and block:
        q, k, v, out (4 D^2) and SwiGLU (3 D H) as multiply-adds, causal attention over on average half
        of the T positions (scores and weighted sum); then the output head (D V)."""
        c = self.config
        D, T = c.dim, c.max_seq_len
        block = 2 * (4 * D * D + 3 * D * c.mlp_hidden_dim) + 2 * 2 * (T / 2) * D
        return 3.0 * (c.depth * block + 2 * D * c.vocab_size)

    @property
    def row_length(self) -> int:
        """Positions of the longest sequence: condition + K tokens (a packed row's length)."""
        return self.config.max_seq_len

    def sequence_costs(self, lengths):
        """Tokens per row (n,) -> positions per sequence (`training.batching.sequence_cost`, vectorised)."""
        from training.batching import sequence_cost

        c = self.config
        return sequence_cost(lengths, prefix_len=c.num_prefix_tokens, max_tokens=c.max_tokens, use_eos=c.use_eos)

    def example_batch(self, batch_size: int, device) -> dict[str, Any]:
        """A prepared batch of full-length rows (the memory plan runs it on the meta device)."""
        if self.config.cond != "class":
            raise ValueError("the memory plan covers class-conditional generators")
        tokens = torch.zeros(batch_size, self.config.max_tokens, dtype=torch.long, device=device)
        labels = torch.zeros(batch_size, dtype=torch.long, device=device)
        return {"tokens": tokens, "cond": labels, "label": labels, "num_tokens": tokens.numel()}

    def collate_fn(self):
        return TokenCollate(labels=self.config.cond == "class", captions=self.config.cond == "text")

    def prepare_batch(self, batch, device) -> dict[str, Any]:
        """Collated rows -> tensors on the device, with host-side counts: tokens, loss targets, and the
        positions computed vs the positions sequences fill (packed or padded: the padding)."""
        c = self.config
        lengths = batch["lengths"]  # (B,) on the host
        eos = (lengths < c.max_tokens) if c.use_eos else torch.zeros_like(lengths, dtype=torch.bool)
        targets = int(lengths.sum()) + int(eos.sum())
        budget = batch.get("budget_batch")
        if budget is not None and budget.plan is not None:
            computed = budget.positions  # packed rows (R, S)
        else:  # padded to the longest row (`Generator.forward`)
            longest = int(lengths.max())
            computed = len(lengths) * (c.num_prefix_tokens - 1 + longest + int(c.use_eos and longest < c.max_tokens))
        out = {"num_tokens": int(lengths.sum()), "num_targets": targets,
               "positions": (computed, targets + len(lengths) * (c.num_prefix_tokens - 1)),
               **batch_to_device(batch, device)}
        if c.cond == "class":
            out["cond"] = out["label"]
        else:
            out["cond"] = encode_captions(self._encoder(device), batch["caption"])
        return out

    def loss(self, model, batch, generator):
        budget = batch.get("budget_batch")
        plan = budget.plan if budget is not None else None
        return model(batch["tokens"], batch["cond"], generator=generator, plan=plan)

    def num_items(self, batch) -> int:
        return batch["num_tokens"]

    def loss_weight(self, batch) -> int | None:
        return batch.get("num_targets")  # None for a batch not made by `prepare_batch` (tests, memory plan)

    def positions(self, batch) -> tuple[int, int]:
        return batch["positions"]

    def save_pretrained(self, model, path, *, step: int) -> None:
        extra: dict[str, Any] = {"step": step}
        if self.class_names:
            extra["class_names"] = list(self.class_names)
        if self.length_target:  # `evaluate generator` compares the lengths it samples with the data's
            extra["length_target"] = self.length_target
        model.save_pretrained(path, extra=extra)

    def _tokenizer(self, device):
        from flextok import FlexTok

        key = (self.tokenizer_path, str(device))
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = FlexTok.from_pretrained(self.tokenizer_path, device=device).eval()
        return _TOKENIZERS[key]

    def grid(self, model, batch):
        """Rows: classes 0.. (or captions seen in training), `grid_per_condition` samples each."""
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
        tokens = model.generate(cond, cfg_scale=self.grid_cfg, generator=g)  # (R * n, K); -1 after an EOS
        images = self._tokenizer(device).detokenize(tokens, steps=self.grid_steps, generator=g)
        return images.view(len(conditions), n, *images.shape[1:]), labels, None  # (R, n, 3, H, W)

    def describe(self) -> dict[str, Any]:
        described = {"kind": "Generator", "config": self.config.to_dict(), "tokenizer_id": self.tokenizer_id,
                     "tokenizer_sha256": self.tokenizer_sha256}
        if self.init_path is not None:
            described.update(init=self.init_path, init_sha256=self.init_sha256)
        return described


