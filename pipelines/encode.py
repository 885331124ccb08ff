"""The model stage: decoded pixels -> token ids, in a Ray Data actor that loads the tokenizer once.

Owns: `TokenizeBatch`, the callable class placed with `ActorPoolStrategy` (one GPU per actor where
there are GPUs, a fixed number of CPU threads otherwise); turning `pixels` into a [B, 3, S, S] batch
in [-1, 1]; the compute precision (`flextok.precision`) and optional compiled encoder blocks;
`--max-tokens` prefixes; adaptive lengths (`FlexTok.tokenize_adaptive`: the actor then needs the
tokenizer's decoder too); the Arrow `list<uint16>` column. A batch that fails is retried
row by row so that one poison sample becomes one error row; CUDA out of memory is not a bad
sample: it halves the images per forward and retries (logged once). Does not own: decoding or writing.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flextok.precision import precision_context
from pipelines.decode import DecodeConfig
from pipelines.model import default_device, load_model
from pipelines.schema import ENCODED_SCHEMA, encoded_schema, error_message

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


def tokens_column(ids: np.ndarray, valid: np.ndarray, lengths: np.ndarray | None = None) -> pa.ListArray:
    """[V, k] ids for the `valid` rows of a batch -> list<uint16> with nulls elsewhere; with
    `lengths` (V,), row j keeps its first lengths[j] ids."""
    num_rows, k = len(valid), ids.shape[1]
    kept = np.full(len(ids), k, np.int64) if lengths is None else np.asarray(lengths, np.int64)
    row_lengths = np.zeros(num_rows, np.int64)
    row_lengths[valid] = kept
    offsets = np.zeros(num_rows + 1, np.int32)
    np.cumsum(row_lengths, out=offsets[1:])
    keep = np.arange(k)[None, :] < kept[:, None]  # (V, k)
    values = pa.array(np.ascontiguousarray(ids, dtype=np.uint16)[keep], pa.uint16())
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, mask=pa.array(~valid))


def float_rows_column(values: np.ndarray, valid: np.ndarray) -> pa.ListArray:
    """[V, C] float rows for the `valid` rows of a batch -> list<float32> with nulls elsewhere."""
    offsets = np.zeros(len(valid) + 1, np.int32)
    np.cumsum(np.where(valid, values.shape[1], 0), out=offsets[1:])
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1), pa.float32())
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat, mask=pa.array(~valid))


def _scatter(values: np.ndarray, valid: np.ndarray, type_: pa.DataType) -> pa.Array:
    """Values (V,) of the valid rows -> a column over all rows, null elsewhere."""
    full = np.zeros(len(valid), values.dtype)
    full[valid] = values
    return pa.array(full, type_, mask=~valid)


class TokenizeBatch:
    """Ray Data actor stage: DECODED_SCHEMA -> ENCODED_SCHEMA (pixels dropped, tokens added), or
    ADAPTIVE_ENCODED_SCHEMA with a length target.

    Args:
        model: what `pipelines.model.load_model` takes (checkpoint path or URL, or preset name).
        max_tokens: store the first k tokens (1..K); None = all K.
        num_threads: torch CPU threads (the actor's CPU share); None leaves torch's default.
        length_target: adaptive length: per image, store the shortest prefix meeting this target
            (a `flextok.adaptive.LengthTarget`), with its measured quality. Excludes `max_tokens`.
        keep_all_tokens: with `length_target`, store all K tokens and only record the chosen length.
        storage_options, sha256: for a checkpoint URL: how to reach it, and the digest the driver
            checked (fetched once per node into a cache; a copy with another digest is an error).
        device: 'cuda' (an error if CUDA is unavailable: a GPU actor never falls back to CPU silently)
            / 'cpu'; None = CUDA when this actor sees a GPU.
        precision: `flextok.precision.PRECISIONS` (default fp32: the tokens do not depend on the
            hardware; bf16/fp16 change a few % of them, see README).
        compile: torch.compile the encoder's blocks (eager where compile is unavailable).
        decode: the `pipelines.decode.DecodeConfig` limits (max_pixels, min_side) for rows whose
            JPEG bytes the decode stage left to this actor (`pixels_format` "jpeg", `--gpu-decode`):
            decoded here in one batch (nvJPEG on CUDA), failures become decode error rows.
    """

    def __init__(
        self, model: str, *, max_tokens: int | None = None, num_threads: int | None = None,
        device: str | None = None, precision: str = "fp32", compile: bool = False,
        decode: dict[str, int] | None = None, storage_options: dict[str, Any] | None = None,
        sha256: str | None = None, length_target: Any = None, keep_all_tokens: bool = False,
    ) -> None:
        import torch

        from flextok.precision import check_precision

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = device or default_device()
        self.precision = check_precision(precision)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise RuntimeError(
                f"this encoder actor holds a GPU (CUDA_VISIBLE_DEVICES={visible}) but torch sees no CUDA "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); fix the node's driver/torch, "
                "or pass --device cpu to tokenize on CPU on purpose"
            )
        # Plain tokenizing never uses the flow decoder: the actor neither reads nor holds it. Adaptive
        # length measures candidate prefixes with it, so only then is it loaded.
        self.model = load_model(model, device=self.device, storage_options=storage_options, sha256=sha256,
                                encoder_only=length_target is None)
        if compile:
            from flextok.compile import compile_blocks

            log.info("compiled %d encoder blocks", compile_blocks(self.model.encoder))
        cfg = self.model.config
        self.image_size = int(cfg.image_size)
        self.decode_config = DecodeConfig(image_size=self.image_size, **(decode or {}))
        self.warned_cpu_decode = not self.device.startswith("cpu")
        self.max_tokens = int(max_tokens or cfg.num_registers)
        if not 1 <= self.max_tokens <= cfg.num_registers:
            raise ValueError(f"max_tokens must be in 1..{cfg.num_registers}, got {self.max_tokens}")
        if cfg.codebook_size > 2**16:
            raise ValueError(f"codebook of {cfg.codebook_size} does not fit uint16 tokens")
        if length_target is not None and self.max_tokens != cfg.num_registers:
            raise ValueError("adaptive length and max_tokens exclude each other")
        if keep_all_tokens and length_target is None:
            raise ValueError("keep_all_tokens needs a length_target")
        if length_target is not None:
            length_target.lengths(cfg.num_registers)  # candidates beyond K: the error now, not per batch
        self.length_target, self.keep_all_tokens = length_target, keep_all_tokens
        self.num_encoded = 0
        self.num_failed = 0
        self.chunk_size: int | None = None  # images per forward; set by the first CUDA out-of-memory
        self.oom_logged = False

    def _tokenize(self, images: np.ndarray | Any) -> dict[str, np.ndarray]:
        """[B, S, S, 3] uint8 (numpy, or a tensor on any device) -> {"ids": [B, k] token ids, and for
        adaptive runs "chosen" (B,), "mse" (B,), "full_mse" (B,), "candidate_mse" [B, C]}."""
        import torch

        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.array(images, copy=True))  # Arrow buffers are read-only
        x = images.to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (B, 3, H, W) in [-1, 1]
        with torch.inference_mode(), precision_context(self.precision, self.device):
            if self.length_target is None:
                return {"ids": self.model.tokenize(x)[:, : self.max_tokens].cpu().numpy()}
            found = self.model.tokenize_adaptive(x, self.length_target)
        return {"ids": found.tokens.cpu().numpy(), "chosen": found.num_tokens.cpu().numpy(),
                "mse": found.mse.float().cpu().numpy(), "full_mse": found.full_mse.float().cpu().numpy(),
                "candidate_mse": found.candidate_mse.float().cpu().numpy()}

    def _images(self, batch: pa.Table, valid: np.ndarray, errors: list, stages: list) -> np.ndarray | Any:
        """The valid rows' pixels [V, S, S, 3] uint8; JPEG rows left by the decode stage are decoded
        here on the device (their failures turn the rows invalid, with a decode error)."""
        column = batch.column("pixels")
        formats = batch.column("pixels_format").to_pylist()
        deferred = [i for i in np.flatnonzero(valid) if formats[i] == "jpeg"]
        if not deferred:
            return pixels_to_array(column.filter(pa.array(valid)), self.image_size)
        import torch

        from pipelines.gpu_decode import decode_on_device

        if not self.warned_cpu_decode:
            log.warning("JPEGs were left to this actor to decode (--gpu-decode), but it runs on %s: decoding "
                        "with Pillow here instead of on CPU tasks", self.device)
            self.warned_cpu_decode = True

        data = column.to_pylist()
        decoded, _, failures = decode_on_device([data[i] for i in deferred], self.decode_config, self.device)
        rows = {row: j for j, row in enumerate(deferred)}
        for row, failure in zip(deferred, failures):
            if failure is not None:
                valid[row], errors[row], stages[row] = False, failure, "decode"
        S = self.image_size
        out = [
            decoded[rows[row]] if row in rows
            else torch.from_numpy(np.frombuffer(data[row], np.uint8).reshape(S, S, 3).copy()).to(self.device)
            for row in np.flatnonzero(valid)
        ]
        return torch.stack(out) if out else torch.zeros(0, S, S, 3, dtype=torch.uint8, device=self.device)

    def _tokenize_in_chunks(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """`_tokenize` in chunks of at most `chunk_size` images. CUDA out of memory halves the chunk
        size (kept for the actor's later batches) and retries: logged once, never error rows; a
        single image that does not fit re-raises."""
        import torch

        while True:
            size = min(len(images), self.chunk_size or len(images))
            try:
                return _concat([self._tokenize(images[i : i + size]) for i in range(0, len(images), size)])
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                self.chunk_size = size // 2
                if self.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                if not self.oom_logged:
                    log.warning("CUDA out of memory at %d images per forward; encoding %d at a time from now on "
                                "(use a smaller --batch-size to avoid the retry)", size, self.chunk_size)
                    self.oom_logged = True

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        valid = pc.is_valid(batch.column("pixels")).to_numpy(zero_copy_only=False)
        errors = batch.column("error").to_pylist()
        stages = batch.column("stage").to_pylist()
        images = self._images(batch, valid, errors, stages) if valid.any() else None
        out: dict[str, np.ndarray] = {"ids": np.zeros((0, self.max_tokens), np.int64)}
        if valid.any():
            try:
                out = self._tokenize_in_chunks(images)
            except torch.cuda.OutOfMemoryError:
                raise  # not even one image fits: an error of the setup, never error rows
            except Exception as e:  # isolate the bad rows instead of failing the batch
                log.warning("batch of %d failed to encode (%s); retrying row by row", len(images), e)
                pieces = []
                for j, row in enumerate(np.flatnonzero(valid)):
                    try:
                        pieces.append(self._tokenize(images[j : j + 1]))
                    except torch.cuda.OutOfMemoryError:
                        raise
                    except Exception as row_error:
                        valid[row] = False
                        errors[row] = error_message("encode failed", f"{type(row_error).__name__}: {row_error}")
                        stages[row] = "encode"
                        self.num_failed += 1
                if pieces:
                    out = _concat(pieces)
            self.num_encoded += len(out["ids"])
        ids = out["ids"]
        assert ids.shape[0] == valid.sum(), "token rows do not match valid rows"
        assert ids.size == 0 or (ids.min() >= 0 and ids.max() < 2**16), "token id out of uint16 range"
        columns: dict[str, Any] = {n: batch.column(n) for n in ENCODED_SCHEMA.names if n in batch.column_names}
        columns["error"] = pa.array(errors, pa.string())
        columns["stage"] = pa.array(stages, pa.string())
        if self.length_target is None:
            columns["tokens"] = tokens_column(ids, valid)
        else:
            chosen = out.get("chosen", np.zeros(0, np.int64))
            columns["tokens"] = tokens_column(ids, valid, None if self.keep_all_tokens else chosen)
            columns["chosen_num_tokens"] = _scatter(chosen.astype(np.uint16), valid, pa.uint16())
            columns["reconstruction_mse"] = _scatter(out.get("mse", np.zeros(0, np.float32)), valid, pa.float32())
            columns["full_reconstruction_mse"] = _scatter(out.get("full_mse", np.zeros(0, np.float32)), valid,
                                                          pa.float32())
            columns["candidate_mse"] = float_rows_column(out.get("candidate_mse", np.zeros((0, 1), np.float32)), valid)
        schema = encoded_schema(self.length_target is not None)
        return pa.Table.from_pydict({n: columns[n] for n in schema.names}, schema=schema)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`_tokenize` results of consecutive image chunks, joined."""
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
