"""The model stage: decoded pixels -> token ids, in a Ray Data actor that loads the tokenizer once.

Owns: `TokenizeBatch`, the callable class placed with `ActorPoolStrategy` (one GPU per actor where
there are GPUs, a fixed number of CPU threads otherwise); turning `pixels` into a [B, 3, S, S] batch
in [-1, 1]; the compute precision (`flextok.precision`) and optional compiled encoder blocks;
`--max-tokens` prefixes; the Arrow `list<uint16>` column. A batch that fails is retried
row by row so that one poison sample becomes one error row. Does not own: decoding or writing.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flextok.precision import precision_context
from pipelines.model import default_device, load_model
from pipelines.schema import DECODED_SCHEMA, ENCODED_SCHEMA, error_message

log = logging.getLogger(__name__)


def pixels_to_array(column: pa.Array | pa.ChunkedArray, image_size: int) -> np.ndarray:
    """A binary column of equal-length RGB pixel strings -> [B, S, S, 3] uint8 (zero-copy if it can)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    num = len(column)
    row_bytes = image_size * image_size * 3
    if num == 0:
        return np.zeros((0, image_size, image_size, 3), np.uint8)
    assert column.null_count == 0, "pixels_to_array takes valid rows only"
    _, offsets_buf, data_buf = column.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32, count=num + 1, offset=column.offset * 4)
    assert np.all(np.diff(offsets) == row_bytes), "decoded pixels have the wrong size"
    flat = np.frombuffer(data_buf, np.uint8)[offsets[0] : offsets[-1]]
    return flat.reshape(num, image_size, image_size, 3)  # (B, H, W, C)


def tokens_column(ids: np.ndarray, valid: np.ndarray) -> pa.ListArray:
    """[V, k] ids for the `valid` rows of a batch -> list<uint16> with nulls elsewhere."""
    num_rows, k = len(valid), ids.shape[1]
    lengths = np.where(valid, k, 0)
    offsets = np.zeros(num_rows + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = pa.array(np.ascontiguousarray(ids, dtype=np.uint16).reshape(-1), pa.uint16())
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, mask=pa.array(~valid))


class TokenizeBatch:
    """Ray Data actor stage: DECODED_SCHEMA -> ENCODED_SCHEMA (pixels dropped, tokens added).

    Args:
        model: what `pipelines.model.load_model` takes (checkpoint path or preset name).
        max_tokens: store the first k tokens (1..K); None = all K.
        num_threads: torch CPU threads (the actor's CPU share); None leaves torch's default.
        device: 'cuda' / 'cpu'; None = CUDA when this actor sees a GPU.
        precision: `flextok.precision.PRECISIONS` (default fp32: the tokens do not depend on the
            hardware; bf16/fp16 change a few % of them, see README).
        compile: torch.compile the encoder's blocks (eager where compile is unavailable).
    """

    def __init__(
        self, model: str, *, max_tokens: int | None = None, num_threads: int | None = None,
        device: str | None = None, precision: str = "fp32", compile: bool = False,
    ) -> None:
        import torch

        from flextok.precision import check_precision

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = device or default_device()
        self.precision = check_precision(precision)
        self.model = load_model(model, device=self.device)
        if compile:
            from flextok.compile import compile_blocks

            log.info("compiled %d encoder blocks", compile_blocks(self.model.encoder))
        cfg = self.model.config
        self.image_size = int(cfg.image_size)
        self.max_tokens = int(max_tokens or cfg.num_registers)
        if not 1 <= self.max_tokens <= cfg.num_registers:
            raise ValueError(f"max_tokens must be in 1..{cfg.num_registers}, got {self.max_tokens}")
        if cfg.codebook_size > 2**16:
            raise ValueError(f"codebook of {cfg.codebook_size} does not fit uint16 tokens")
        self.num_encoded = 0
        self.num_failed = 0

    def _tokenize(self, images: np.ndarray) -> np.ndarray:
        """[B, S, S, 3] uint8 -> [B, k] token ids."""
        import torch

        x = torch.from_numpy(np.array(images, copy=True)).to(self.device)  # Arrow buffers are read-only
        x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (B, 3, H, W) in [-1, 1]
        with torch.inference_mode(), precision_context(self.precision, self.device):
            ids = self.model.tokenize(x)
        return ids[:, : self.max_tokens].cpu().numpy()

    def __call__(self, batch: pa.Table) -> pa.Table:
        valid = pc.is_valid(batch.column("pixels")).to_numpy(zero_copy_only=False)
        errors = batch.column("error").to_pylist()
        stages = batch.column("stage").to_pylist()
        ids = np.zeros((int(valid.sum()), self.max_tokens), np.int64)
        if valid.any():
            images = pixels_to_array(batch.column("pixels").filter(pa.array(valid)), self.image_size)
            try:
                ids = self._tokenize(images)
            except Exception as e:  # isolate the bad rows instead of failing the batch
                log.warning("batch of %d failed to encode (%s); retrying row by row", len(images), e)
                rows = np.flatnonzero(valid)
                for j, row in enumerate(rows):
                    try:
                        ids[j] = self._tokenize(images[j : j + 1])[0]
                    except Exception as row_error:
                        valid[row] = False
                        errors[row] = error_message("encode failed", f"{type(row_error).__name__}: {row_error}")
                        stages[row] = "encode"
                        self.num_failed += 1
                ids = ids[valid[rows]]
            self.num_encoded += len(ids)
        assert ids.shape[0] == valid.sum(), "token rows do not match valid rows"
        assert ids.size == 0 or (ids.min() >= 0 and ids.max() < 2**16), "token id out of uint16 range"
        columns: dict[str, Any] = {n: batch.column(n) for n in DECODED_SCHEMA.names if n not in ("pixels",)}
        columns["error"] = pa.array(errors, pa.string())
        columns["stage"] = pa.array(stages, pa.string())
        columns["tokens"] = tokens_column(ids, valid)
        return pa.Table.from_pydict({n: columns[n] for n in ENCODED_SCHEMA.names}, schema=ENCODED_SCHEMA)
