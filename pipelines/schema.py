"""The Parquet schemas of a token dataset (DESIGN §2.2-2.3) and of the rows flowing between stages.

Owns: the column names and Arrow types of token rows, error rows, the in-flight sample stream and
the staged pieces; the file-level key-value metadata; the schema version; the error-message
convention (`"<kind>: <detail>"`, one line). Does not own: reading inputs (`pipelines.sources`),
decoding (`pipelines.decode`) or writing files (`pipelines.writer`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.storage import redact_text

SCHEMA_VERSION = "1"
METADATA_PREFIX = "flextok."
STAGES = ("read", "decode", "encode")

# What users read: one row per tokenized image (DESIGN §2.3).
TOKEN_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("tokens", pa.list_(pa.uint16()), nullable=False),
        pa.field("num_tokens", pa.uint16(), nullable=False),
        pa.field("label", pa.int32()),
        pa.field("caption", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
)

# Extra columns of an adaptive-length run (`flextok tokenize --adaptive-...`), after TOKEN_SCHEMA's:
# the chosen prefix length (equal to `num_tokens` unless the run kept all K tokens) and the latent
# MSE of the one-step reconstruction from that prefix and from all K tokens (`flextok.adaptive`).
# Plain runs write TOKEN_SCHEMA alone, so data written before these columns existed reads the same.
ADAPTIVE_FIELDS = [
    pa.field("chosen_num_tokens", pa.uint16(), nullable=False),
    pa.field("reconstruction_mse", pa.float32(), nullable=False),
    pa.field("full_reconstruction_mse", pa.float32(), nullable=False),
]
ADAPTIVE_TOKEN_SCHEMA = pa.schema(list(TOKEN_SCHEMA) + ADAPTIVE_FIELDS)

# One row per input sample that could not be tokenized, under DST/_errors/.
ERROR_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
    ]
)

# In flight between stages. `shard` + `index` (position in the input shard) identify a sample for
# exactly-once bookkeeping; a row with index -1 is a shard's end marker carrying `total`, the number
# of indices the shard produced, and `retries`, the storage faults its reader retried. A row with
# `error` set is an error row from then on, except the failure marker (index -1, total -1): the
# reader gave up on the shard (storage unavailable) and `error` says why; the shard stays unfinished.
SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),
        pa.field("total", pa.int64(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("image", pa.binary()),
        pa.field("label", pa.int32()),
        pa.field("caption", pa.string()),
        pa.field("error", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("retries", pa.int32()),
    ]
)

# After decoding: `image` bytes replaced by `pixels` (H*W*3 uint8, RGB, row-major) and the size.
# With GPU decode, a JPEG the encoder's device decodes keeps its bytes in `pixels` and has
# `pixels_format` "jpeg" (null = RGB pixels); width and height come from its header.
DECODED_SCHEMA = pa.schema(
    [f for f in SAMPLE_SCHEMA if f.name != "image"]
    + [pa.field("pixels", pa.binary()), pa.field("width", pa.int32()), pa.field("height", pa.int32()),
       pa.field("pixels_format", pa.string())]
)

# After encoding, and in staged pieces under DST/_state/staging/: everything a final row needs.
ENCODED_SCHEMA = pa.schema(
    [f for f in DECODED_SCHEMA if f.name not in ("pixels", "pixels_format")]
    + [pa.field("tokens", pa.list_(pa.uint16()))]
)
# The same in an adaptive run, plus the adaptive columns (null on error rows) and `candidate_mse`, the
# MSE at every candidate length, which is summed into the shard's marker (the manifest's
# quality-vs-length summary) and not kept in rows.
ADAPTIVE_ENCODED_SCHEMA = pa.schema(
    list(ENCODED_SCHEMA) + [f.with_nullable(True) for f in ADAPTIVE_FIELDS]
    + [pa.field("candidate_mse", pa.list_(pa.float32()))]
)


def encoded_schema(adaptive: bool) -> pa.Schema:
    return ADAPTIVE_ENCODED_SCHEMA if adaptive else ENCODED_SCHEMA

# What the write stage returns to the driver, one row per (piece, shard).
PIECE_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),
        pa.field("piece", pa.string()),
        pa.field("indices", pa.list_(pa.int64()), nullable=False),
        pa.field("total", pa.int64(), nullable=False),
        pa.field("num_rows", pa.int64(), nullable=False),
        pa.field("num_errors", pa.int64(), nullable=False),
        pa.field("retries", pa.int64(), nullable=False),  # storage faults retried by the shard's reader
        pa.field("failure", pa.string()),  # why the reader gave up on the shard (it stays unfinished)
    ]
)


# Error messages -----------------------------------------------------------------------------------
def error_message(kind: str, detail: str = "") -> str:
    """One line, `"<kind>: <detail>"`; `kind` is what the summary groups errors by."""
    detail = " ".join(redact_text(str(detail)).split())[:300]
    return f"{kind}: {detail}" if detail else kind


def error_kind(message: str) -> str:
    return message.split(":", 1)[0].strip()


# Tables -------------------------------------------------------------------------------------------
def sample_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Build a SAMPLE_SCHEMA table from dicts; missing optional fields are null."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in SAMPLE_SCHEMA}
    for r, total in zip(rows, cols["total"]):
        assert total is not None, f"sample row without total: {r.get('key')}"
    return pa.Table.from_pydict(cols, schema=SAMPLE_SCHEMA)


def tokens_array(tokens: np.ndarray) -> pa.ListArray:
    """[B, K] integer tokens -> a plain Arrow list<uint16> column (no tensor extension type)."""
    tokens = np.ascontiguousarray(tokens, dtype=np.uint16)
    num_rows, num_tokens = tokens.shape  # (B, K)
    offsets = pa.array(np.arange(num_rows + 1, dtype=np.int32) * num_tokens, pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(tokens.reshape(-1), pa.uint16()))


def token_rows(encoded: pa.Table, *, adaptive: bool = False) -> pa.Table:
    """The TOKEN_SCHEMA rows (successes) of an ENCODED_SCHEMA table, in its order; for an adaptive run
    the ADAPTIVE_TOKEN_SCHEMA rows of an ADAPTIVE_ENCODED_SCHEMA table."""
    ok = encoded.filter(pc.is_null(encoded["error"]))
    num_tokens = pc.list_value_length(ok["tokens"]).cast(pa.uint16())
    columns = {
        "key": ok["key"],
        "tokens": ok["tokens"],
        "num_tokens": num_tokens,
        "label": ok["label"],
        "caption": ok["caption"],
        "source": ok["source"],
        "width": ok["width"],
        "height": ok["height"],
    }
    if not adaptive:
        return pa.Table.from_pydict(columns, schema=TOKEN_SCHEMA)
    for f in ADAPTIVE_FIELDS:
        assert ok[f.name].null_count == 0, f"adaptive run with a null {f.name}"
        columns[f.name] = ok[f.name]
    return pa.Table.from_pydict(columns, schema=ADAPTIVE_TOKEN_SCHEMA)


def error_rows(encoded: pa.Table) -> pa.Table:
    """The ERROR_SCHEMA rows of a SAMPLE/DECODED/ENCODED table, in its order."""
    bad = encoded.filter(pc.is_valid(encoded["error"]))
    columns = {name: bad[name] for name in ERROR_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=ERROR_SCHEMA)


# File-level metadata ------------------------------------------------------------------------------
def file_metadata(
    *,
    checkpoint_id: str,
    checkpoint_sha256: str | None,
    codebook_size: int,
    fsq_levels: Sequence[int],
    max_tokens: int,
    image_size: int,
    class_names: Sequence[str] = (),
    precision: str | None = None,
    length_target: Mapping[str, Any] | None = None,
) -> dict[bytes, bytes]:
    """Key-value metadata stored in every token Parquet file (all values are strings).

    `class_names` (the names of the `label` values, when the corpus has them) is stored as JSON;
    `precision` is the encoder's compute precision (`flextok.precision`), when tokens were encoded;
    `length_target` (an adaptive run's target, `LengthTarget.describe()`, plus `keep_all_tokens`) as JSON.
    """
    values = {
        "schema_version": SCHEMA_VERSION,
        "checkpoint_id": checkpoint_id,
        "checkpoint_sha256": checkpoint_sha256 or "",
        "codebook_size": str(int(codebook_size)),
        "fsq_levels": json.dumps([int(x) for x in fsq_levels]),
        "max_tokens": str(int(max_tokens)),
        "image_size": str(int(image_size)),
    }
    if class_names:
        values["class_names"] = json.dumps([str(n) for n in class_names])
    if precision is not None:
        values["precision"] = precision
    if length_target is not None:
        values["length_target"] = json.dumps(dict(length_target), sort_keys=True)
    return {(METADATA_PREFIX + k).encode(): v.encode() for k, v in values.items()}


def read_file_metadata(schema: pa.Schema) -> dict[str, Any]:
    """Parse `file_metadata` back from a Parquet/Arrow schema; {} when it has none."""
    raw = schema.metadata or {}
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = k.decode()
        if not key.startswith(METADATA_PREFIX):
            continue
        name, value = key[len(METADATA_PREFIX) :], v.decode()
        if name in ("fsq_levels", "class_names", "length_target"):
            out[name] = json.loads(value)
        elif name in ("codebook_size", "max_tokens", "image_size"):
            out[name] = int(value)
        elif name == "checkpoint_sha256":
            out[name] = value or None
        else:
            out[name] = value
    return out
