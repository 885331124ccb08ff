import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.schema import (
    ENCODED_SCHEMA,
    ERROR_SCHEMA,
    SAMPLE_SCHEMA,
    SCHEMA_VERSION,
    TOKEN_SCHEMA,
    error_kind,
    error_message,
    error_rows,
    file_metadata,
    read_file_metadata,
    sample_table,
    token_rows,
    tokens_array,
)
from pipelines.writer import parquet_bytes


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 20), st.integers(1, 40), st.integers(0, 2**16 - 1))
def test_tokens_array_is_a_plain_uint16_list(num_rows, k, high):
    ids = np.random.default_rng(num_rows * 41 + k).integers(0, high + 1, size=(num_rows, k))
    arr = tokens_array(ids)
    assert arr.type == pa.list_(pa.uint16())
    assert arr.to_pylist() == ids.tolist()


def _encoded() -> pa.Table:
    rows = {
        "shard": ["s", "s", "s"], "index": [0, 1, 2], "total": [-1, -1, -1],
        "key": ["s/a", "s/b", "s/c"], "source": ["file:///x.tar"] * 3,
        "label": [3, None, 1], "caption": ["cat", None, None],
        "error": [None, error_message("not an image", "unrecognised image format"), None],
        "stage": [None, "decode", None], "width": [640, None, 10], "height": [480, None, 20],
        "tokens": [[1, 2, 3], None, [7, 8]], "retries": [None] * 3,
    }
    return pa.Table.from_pydict(rows, schema=ENCODED_SCHEMA)


def test_token_and_error_rows_split_an_encoded_table():
    table = _encoded()
    tokens, errors = token_rows(table), error_rows(table)
    assert tokens.schema.equals(TOKEN_SCHEMA)
    assert errors.schema.equals(ERROR_SCHEMA)
    assert tokens.column("key").to_pylist() == ["s/a", "s/c"]
    assert tokens.column("num_tokens").to_pylist() == [3, 2]
    assert tokens.column("label").to_pylist() == [3, 1]
    assert tokens.column("caption").to_pylist() == ["cat", None]
    assert errors.to_pylist() == [
        {"key": "s/b", "source": "file:///x.tar", "error": "not an image: unrecognised image format", "stage": "decode"}
    ]


def test_parquet_round_trip_keeps_schema_and_metadata():
    meta = file_metadata(checkpoint_id="preset:tiny", checkpoint_sha256=None, codebook_size=1000,
                         fsq_levels=(8, 5, 5, 5), max_tokens=2, image_size=32)
    tokens = token_rows(_encoded()).replace_schema_metadata(meta)
    back = pq.read_table(io.BytesIO(parquet_bytes(tokens)))
    assert back.schema.equals(TOKEN_SCHEMA)  # types and nullability, not a tensor extension
    assert back.to_pylist() == tokens.to_pylist()
    assert read_file_metadata(back.schema) == {
        "schema_version": SCHEMA_VERSION, "checkpoint_id": "preset:tiny", "checkpoint_sha256": None,
        "codebook_size": 1000, "fsq_levels": [8, 5, 5, 5], "max_tokens": 2, "image_size": 32,
    }
    frame = back.to_pandas()
    assert list(frame["tokens"].iloc[0]) == [1, 2, 3]


def test_class_names_travel_in_the_file_metadata():
    names = ["T-shirt/top", "Trouser", "Ankle boot"]
    meta = file_metadata(checkpoint_id="a.safetensors", checkpoint_sha256="ab" * 32, codebook_size=1000,
                         fsq_levels=(8, 5, 5, 5), max_tokens=32, image_size=28, class_names=names)
    table = token_rows(_encoded()).replace_schema_metadata(meta)
    back = pq.read_table(io.BytesIO(parquet_bytes(table)))
    assert read_file_metadata(back.schema)["class_names"] == names
    without = file_metadata(checkpoint_id="a", checkpoint_sha256=None, codebook_size=1000, fsq_levels=(8, 5, 5, 5),
                            max_tokens=32, image_size=28)
    assert "class_names" not in read_file_metadata(pa.schema([], metadata=without))


def test_parquet_bytes_are_deterministic():
    table = token_rows(_encoded())
    assert parquet_bytes(table) == parquet_bytes(table)


def test_error_messages_are_one_line_with_a_kind():
    msg = error_message("truncated image", "OSError: image file\nis truncated\t(5 bytes)")
    assert "\n" not in msg and "\t" not in msg
    assert error_kind(msg) == "truncated image"
    assert error_kind(error_message("empty image")) == "empty image"
    assert len(error_message("x", "y" * 5000)) < 400


def test_sample_table_fills_missing_fields_with_nulls():
    table = sample_table([{"shard": "s", "index": 0, "total": -1, "key": "s/0", "source": "u"}])
    assert table.schema.equals(SAMPLE_SCHEMA)
    assert table.column("image").to_pylist() == [None]
