"""Where samples come from: resolve an input URL into shards, and read a shard into sample rows.

Owns: input URLs of any fsspec filesystem (a folder, a glob, a brace pattern, a file), format
detection (WebDataset tar shards, image folders with class sub-folders, Parquet with an image-bytes
column), stable shard ids and sample keys, and the readers that turn one shard into `SAMPLE_SCHEMA`
rows. A reader never raises for bad data: a missing or unreadable shard, a sample without an image, a
duplicate key each become an error row. A storage fault is never data: it is retried, and a shard it
keeps failing is left unfinished (`read_shard`; the classification is `pipelines.retry`'s). Does not own: credentials and filesystems
(`pipelines.storage`, whose helpers are re-exported here), decoding (`pipelines.decode`), the output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import re
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import retry
from pipelines.schema import error_message, sample_table
from pipelines.storage import effective_storage_options, filesystem, redact_options, redact_url

TAR_EXTS = (".tar", ".tar.gz", ".tgz")
PARQUET_EXTS = (".parquet", ".pq")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# WebDataset members: which extension is the image, which carry label and caption.
WDS_IMAGE_EXTS = tuple(e[1:] for e in IMAGE_EXTS)
PARQUET_IMAGE_COLUMNS = ("image", "img", "jpg", "png", "image_bytes", "bytes")
LABEL_FIELDS = ("label", "labels", "cls", "class")
CAPTION_FIELDS = ("caption", "text", "txt")
KEY_FIELDS = ("key", "__key__", "id")
FORMATS = ("webdataset", "parquet", "images")
# Untrusted inputs: no sample's encoded bytes (a tar member, a Parquet cell, an image file) may exceed
# this; larger ones are error rows, skipped without being read into memory where the format allows.
MAX_SAMPLE_BYTES = 256 << 20
# Class ids are embedding rows in training: a negative id or one in the billions is a broken label.
MAX_LABEL = 1_000_000

log = logging.getLogger(__name__)

# Shards -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """One unit of input and of resume bookkeeping.

    `id` is stable and file-name safe; output files and sample keys derive from it. For image
    folders a shard is a run of `files`, with `keys` and `labels` per file. `fingerprint` changes when
    the shard's content (a file's size and ETag or mtime, or membership) changes, so that a re-run redoes it.
    """

    id: str
    url: str
    format: str
    fingerprint: str
    files: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    labels: tuple[int | None, ...] = ()

    @property
    def source(self) -> str:
        """`url` as it may be recorded (rows, markers, manifest): credentials and signatures redacted."""
        return redact_url(self.url)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Shard:
        d = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class InputPlan:
    url: str
    format: str
    shards: tuple[Shard, ...]
    class_names: tuple[str, ...] = ()
    skipped: tuple[tuple[str, int], ...] = ()  # (reason, number of files) found but not read

    def describe(self) -> dict[str, Any]:
        return {
            "url": redact_url(self.url),
            "format": self.format,
            "num_shards": len(self.shards),
            "class_names": list(self.class_names),
            "skipped_files": dict(self.skipped),
        }


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> 3 names; `{x,y}` lists; groups expand left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        items = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        raise ValueError(f"cannot expand brace group {{{body}}} in {pattern!r}")
    return [name for item in items for name in expand_braces(head + item + tail)]


def _without_query(path: str) -> str:
    """An HTTP(S) path is a whole URL: its query (often a signature) is not part of the file's name."""
    return urlsplit(path).path if "://" in path else path


def _ext(path: str) -> str:
    name = posixpath.basename(_without_query(path)).lower()
    for ext in TAR_EXTS + PARQUET_EXTS + IMAGE_EXTS:
        if name.endswith(ext):
            return ext
    return posixpath.splitext(name)[1]


def _format_of(path: str) -> str | None:
    ext = _ext(path)
    if ext in TAR_EXTS:
        return "webdataset"
    if ext in PARQUET_EXTS:
        return "parquet"
    if ext in IMAGE_EXTS:
        return "images"
    return None


def _skip_reason(rel: str) -> str | None:
    """Why a file found under an input folder is not read, or None. Dot-names are hidden; `_` folders
    are bookkeeping (`_errors`, `_temporary`); a `_` file is read only as an image (`_MG_0001.jpg`)."""
    parts = rel.split("/")
    if any(part.startswith(".") for part in parts):
        return "hidden (name starts with '.')"
    if any(part.startswith("_") for part in parts[:-1]):
        return "in a folder whose name starts with '_'"
    if parts[-1] == "dataset.json":  # the class names `flextok corpus` writes beside its shards
        return None
    if parts[-1].startswith("_") and _format_of(rel) != "images":
        return "name starts with '_'"
    if _format_of(rel) is None:
        return f"unsupported format ({_ext(rel) or 'no extension'})"
    return None


def _follow_link(path: str, info: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """A local symlink found in a folder: a link to a file is read as that file; others are skipped."""
    if not info.get("islink"):
        return (info, None) if info.get("type", "file") == "file" else (None, None)
    if os.path.isfile(path):
        st = os.stat(path)
        return {**info, "type": "file", "size": st.st_size, "mtime": st.st_mtime}, None
    if os.path.isdir(path):
        return None, "symlinked folder (not followed)"
    return None, "broken symlink"


def _safe_id(rel: str) -> str:
    for ext in TAR_EXTS + PARQUET_EXTS:
        if rel.lower().endswith(ext):
            rel = rel[: -len(ext)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", rel.replace("/", "-")).strip("._") or "shard"


def _fingerprint(*parts: object) -> str:
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _version(info: Mapping[str, Any]) -> tuple:
    """What changes when a file's content changes: its size with its ETag (object stores) or its
    modification time (local and network filesystems). An in-place edit of the same size keeps the
    size but not the mtime or the ETag (a content hash on S3), so its shard is redone."""
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get(
        "last_modified") or info.get("updated")
    return (info.get("size"), str(stamp) if stamp is not None else None)


def _file_shards(fs: Any, entries: list[tuple[str, tuple | None]], fmt: str) -> list[Shard]:
    """Tar or Parquet files -> shards with ids from their paths relative to the common folder."""
    paths = [_without_query(p) for p, _ in entries]
    root = posixpath.commonpath([posixpath.dirname(p) for p in paths]) if len(paths) > 1 else (
        posixpath.dirname(paths[0])
    )
    rels = [posixpath.relpath(p, root) if root else p for p in paths]
    ids = [_safe_id(r) for r in rels]
    seen: dict[str, int] = {}
    for i in ids:
        seen[i] = seen.get(i, 0) + 1
    ids = [i if seen[i] == 1 else f"{i}-{_fingerprint(r)[:8]}" for i, r in zip(ids, rels)]
    return [
        Shard(id=i, url=fs.unstrip_protocol(p), format=fmt,
              fingerprint=_fingerprint(redact_url(fs.unstrip_protocol(p)), version))
        for i, (p, version) in zip(ids, entries)
    ]


def _image_shards(
    fs: Any, root: str, entries: list[tuple[str, tuple | None]], files_per_shard: int
) -> tuple[list[Shard], tuple[str, ...]]:
    """Image files under `root` -> shards of `files_per_shard`; class sub-folders -> labels."""
    rels = [posixpath.relpath(p, root) for p, _ in entries]
    class_names = tuple(sorted({r.split("/", 1)[0] for r in rels if "/" in r}))
    class_index = {c: i for i, c in enumerate(class_names)}
    shards = []
    for n, start in enumerate(range(0, len(entries), files_per_shard)):
        chunk = list(zip(rels[start : start + files_per_shard], entries[start : start + files_per_shard]))
        labels = tuple(class_index[r.split("/", 1)[0]] if "/" in r else None for r, _ in chunk)
        files = tuple(fs.unstrip_protocol(p) for _, (p, _) in chunk)
        shards.append(
            Shard(
                id=f"images-{n:06d}",
                url=fs.unstrip_protocol(root),
                format="images",
                fingerprint=_fingerprint([(r, version) for r, (_, version) in chunk]),
                files=files,
                keys=tuple(r for r, _ in chunk),
                labels=labels,
            )
        )
    return shards, class_names


LISTABLE_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "file", "local")


def _list_parents(patterns: list[str], storage_options: Mapping[str, Any] | None) -> dict[str, dict] | None:
    """The names of a brace pattern, found by listing their folders (one paginated listing per
    folder, the folders listed concurrently) instead of 2-3 requests per name: 10,000 shards of
    one folder are 10 LIST requests, not 30,000 HEADs. None when a storage listing is not
    authoritative (HTTP index pages) or the names hold wildcards: then each name is looked up."""
    from concurrent.futures import ThreadPoolExecutor

    fs, _ = filesystem(patterns[0], storage_options)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if not set(protocols) & set(LISTABLE_PROTOCOLS):
        return None
    paths = [filesystem(p, storage_options)[1].rstrip("/") for p in patterns]
    if any(ch in p for p in paths for ch in "*?[") or any("?" in p for p in patterns):
        return None
    folders = sorted({posixpath.dirname(p) for p in paths})

    def listing(folder: str) -> list[dict]:
        try:
            return retry.call_with_retries(lambda: fs.ls(folder, detail=True), what=f"listing {folder}")
        except FileNotFoundError:
            return []

    with ThreadPoolExecutor(max_workers=min(16, len(folders))) as pool:
        found = [info for infos in pool.map(listing, folders) for info in infos]
    return {info["name"].rstrip("/"): info for info in found}


def resolve_inputs(
    url: str, storage_options: Mapping[str, Any] | None = None, *, files_per_shard: int = 1000
) -> InputPlan:
    """Turn a folder / glob / brace pattern / file URL into an ordered list of shards.

    Raises FileNotFoundError or ValueError (one line, for the user) when nothing usable is found.
    A name from a brace pattern that does not exist stays in the plan: its reader reports it.
    """
    if files_per_shard < 1:
        raise ValueError("files_per_shard must be >= 1")
    patterns = expand_braces(url)
    entries: list[tuple[str, tuple | None]] = []  # (path, version)
    skipped: dict[str, int] = {}
    fs = None
    image_root: str | None = None
    listed = _list_parents(patterns, storage_options) if len(patterns) > 1 else None
    for pattern in patterns:
        fs, path = filesystem(pattern, storage_options)
        if listed is not None and not any(ch in path for ch in "*?["):
            info = listed.get(path.rstrip("/"))
            if info is not None and info.get("type") == "directory":
                raise ValueError(f"{redact_url(pattern)} is a folder; a brace pattern must name files")
            entries.append((path, None if info is None else _version(info)))  # None: a missing shard
            continue
        if fs.isdir(path):
            if len(patterns) > 1:
                raise ValueError(f"{redact_url(pattern)} is a folder; a brace pattern must name files")
            found = fs.find(path, detail=True, withdirs=True)
            image_root = path.rstrip("/")
            for p, info in sorted(found.items()):
                rel = posixpath.relpath(p, image_root)
                info, reason = _follow_link(p, info)
                reason = reason or (_skip_reason(rel) if info is not None else None)
                if reason:
                    skipped[reason] = skipped.get(reason, 0) + 1
                elif info is not None and _format_of(p):
                    entries.append((p, _version(info)))
        elif any(ch in _without_query(path) for ch in "*?["):
            found = fs.glob(path, detail=True)
            for p, info in sorted(found.items()):
                if info.get("type", "file") == "file" and _format_of(p):
                    entries.append((p, _version(info)))
        elif fs.exists(path):
            entries.append((path, _version(fs.info(path))))
        elif len(patterns) > 1:
            entries.append((path, None))  # reported as a missing shard by its reader
        else:
            raise FileNotFoundError(f"input not found: {redact_url(pattern)}")
    if not entries or fs is None:
        raise FileNotFoundError(
            f"no WebDataset shards (.tar), Parquet files or images found at {redact_url(url)}"
        )
    formats = {_format_of(p) for p, _ in entries}
    for fmt in ("webdataset", "parquet", "images"):
        if fmt in formats:
            chosen = fmt
            break
    if len(formats - {None}) > 1 and image_root is None:
        raise ValueError(f"{redact_url(url)} mixes input formats {sorted(f for f in formats if f)}; name one")
    for p, _ in entries:
        if _format_of(p) != chosen:
            reason = f"{_format_of(p)} file beside {chosen} input"
            skipped[reason] = skipped.get(reason, 0) + 1
    if skipped:
        log.warning("%s: %d files not read: %s", redact_url(url), sum(skipped.values()),
                    "; ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())))
    skipped_items = tuple(sorted(skipped.items()))
    entries = [(p, s) for p, s in entries if _format_of(p) == chosen]
    if chosen == "images":
        root = image_root or posixpath.commonpath([posixpath.dirname(p) for p, _ in entries])
        shards, class_names = _image_shards(fs, root, entries, files_per_shard)
        return InputPlan(url=url, format=chosen, shards=tuple(shards), class_names=class_names, skipped=skipped_items)
    folder = posixpath.dirname(entries[0][0])
    return InputPlan(url=url, format=chosen, shards=tuple(_file_shards(fs, entries, chosen)),
                     class_names=_dataset_json_class_names(fs, folder), skipped=skipped_items)


def _dataset_json_class_names(fs, folder: str) -> tuple[str, ...]:
    """`class_names` of the `dataset.json` that `flextok corpus` writes beside its shards, else ()."""
    try:
        with fs.open(f"{folder}/dataset.json", "r") as f:
            names = json.load(f).get("class_names")
    except (OSError, ValueError, AttributeError):  # none, unreadable, or not ours: labels stay numeric
        return ()
    return tuple(str(n) for n in names) if isinstance(names, list) else ()


# Readers ------------------------------------------------------------------------------------------
class _Batcher:
    """Accumulates sample rows and hands out tables of at most `rows` rows / `max_bytes` bytes."""

    def __init__(self, rows: int, max_bytes: int = 32 << 20):
        self.rows, self.max_bytes = rows, max_bytes
        self.buf: list[dict[str, Any]] = []
        self.nbytes = 0

    def add(self, row: dict[str, Any]) -> pa.Table | None:
        """Add a row; returns a full table to hand out, if this row filled one."""
        self.buf.append(row)
        self.nbytes += len(row.get("image") or b"")
        if len(self.buf) >= self.rows or self.nbytes >= self.max_bytes:
            return self.flush()
        return None

    def flush(self) -> pa.Table | None:
        if not self.buf:
            return None
        table, self.buf, self.nbytes = sample_table(self.buf), [], 0
        return table


def _split_wds_name(name: str) -> tuple[str, str] | None:
    """WebDataset member name -> (sample key, extension): the key ends at the basename's first dot."""
    m = re.fullmatch(r"((?:.*/)?[^./][^/]*?)\.([^/]+)", name)
    return (m.group(1), m.group(2).lower()) if m else None


def _parse_label(text: str | bytes) -> int:
    """A class id: an integer in [0, MAX_LABEL); anything else is the sample's error row."""
    value = int(text.decode() if isinstance(text, bytes) else text)
    if not 0 <= value < MAX_LABEL:
        raise ValueError(f"label {value} is outside 0..{MAX_LABEL - 1}")
    return value


def _wds_sample(shard: Shard, key: str, members: dict[str, bytes]) -> dict[str, Any]:
    row: dict[str, Any] = {"shard": shard.id, "key": f"{shard.id}/{key}", "source": shard.source, "total": -1}
    image_ext = next((e for e in WDS_IMAGE_EXTS if e in members), None)
    if image_ext is None:
        kinds = ", ".join(sorted(members)) or "nothing"
        row.update(error=error_message("no image member", f"sample has {kinds}"), stage="read")
        return row
    row["image"] = members[image_ext]
    try:
        if "cls" in members:
            row["label"] = _parse_label(members["cls"].strip())
        if "txt" in members:
            row["caption"] = members["txt"].decode("utf-8", errors="replace").strip()
        if "json" in members:
            meta = json.loads(members["json"])
            if isinstance(meta, dict):
                if row.get("label") is None:
                    label = next((meta[f] for f in LABEL_FIELDS if isinstance(meta.get(f), int)), None)
                    row["label"] = None if label is None else _parse_label(str(label))
                if row.get("caption") is None:
                    row["caption"] = next((meta[f] for f in CAPTION_FIELDS if isinstance(meta.get(f), str)), None)
    except (ValueError, UnicodeDecodeError) as e:
        row.update(image=None, label=None, caption=None, error=error_message("bad metadata", str(e)), stage="read")
    return row


class TruncatedShardError(ValueError):
    """A tar shard without its end-of-archive blocks: a writer was killed, samples may be missing."""


def _read_webdataset(shard: Shard, fs: Any, path: str) -> Iterator[dict[str, Any]]:
    """Samples of a tar shard in member order; raises OSError/tarfile errors for a broken tar and
    TruncatedShardError for one that ends without its end-of-archive marker (even on a 512-byte
    boundary, where tarfile itself sees a clean end)."""
    seen: set[str] = set()
    key: str | None = None
    members: dict[str, bytes] = {}
    too_large: str | None = None
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            tar.members.clear()  # stream mode keeps every header otherwise: memory would grow with the shard
            if not info.isfile():
                continue
            parsed = _split_wds_name(info.name)
            if parsed is None:
                continue
            k, ext = parsed
            if k != key:
                if key is not None:
                    yield _wds_finish(shard, key, members, seen, too_large)
                    seen.add(key)
                key, members, too_large = k, {}, None
            if info.size > MAX_SAMPLE_BYTES:  # not read: the next header skips it without buffering
                too_large = f"member {info.name} has {info.size:,} bytes (limit {MAX_SAMPLE_BYTES:,})"
                continue
            data = tar.extractfile(info)
            members[ext] = data.read() if data is not None else b""
        if key is not None:
            yield _wds_finish(shard, key, members, seen, too_large)
        # A clean end reads one all-zero 512-byte block past the last member; a cut file reads nothing.
        if tar.fileobj.tell() < tar.offset + tarfile.BLOCKSIZE:
            raise TruncatedShardError("no end-of-archive marker: the tar was cut short")


def _wds_finish(shard: Shard, key: str, members: dict[str, bytes], seen: set[str], too_large: str | None):
    if key in seen:
        return _duplicate(shard, key)
    if too_large is not None:
        return {"shard": shard.id, "key": f"{shard.id}/{key}", "source": shard.source, "total": -1,
                "error": error_message("sample too large", too_large), "stage": "read"}
    return _wds_sample(shard, key, members)


def _duplicate(shard: Shard, key: str) -> dict[str, Any]:
    return {
        "shard": shard.id, "key": f"{shard.id}/{key}", "source": shard.source, "total": -1,
        "error": error_message("duplicate key", f"{key} appears again in the shard; first kept"),
        "stage": "read",
    }


def _first_present(names: Iterable[str], candidates: Iterable[str]) -> str | None:
    names = list(names)
    return next((c for c in candidates if c in names), None)


def parquet_image_column(schema: pa.Schema) -> str:
    """The column of image bytes in a Parquet schema; ValueError (one line) when there is none."""
    image_col = _first_present(schema.names, PARQUET_IMAGE_COLUMNS)
    if image_col is None:
        raise ValueError(f"no image column (looked for {', '.join(PARQUET_IMAGE_COLUMNS)})")
    image_type = schema.field(image_col).type
    if pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0:
        image_type = image_type.field("bytes").type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
        raise ValueError(f"column {image_col!r} holds {image_type}, not image bytes (binary)")
    return image_col


def unusable_parquet_shards(plan: InputPlan, storage_options: Mapping[str, Any] | None = None,
                            threads: int = 16) -> dict[str, str]:
    """Shard id -> one line, for the Parquet shards of `plan` that can hold no image: a footer that
    does not read (a truncated or non-Parquet file) or no image-bytes column. Only footers are read,
    concurrently. A storage fault is not the file's: it is retried, and raises once retries are spent.
    The tokenize pipeline reports such a file as its one error row; a training job skips it up front.
    """
    from concurrent.futures import ThreadPoolExecutor

    def check(shard: Shard) -> str | None:
        fs, path = filesystem(shard.url, storage_options)

        def footer() -> pa.Schema:
            with fs.open(path, "rb") as f:
                return pq.ParquetFile(f).schema_arrow

        try:
            parquet_image_column(retry.call_with_retries(footer, what=f"reading {shard.source}"))
        except FileNotFoundError:
            return error_message("missing shard", f"{shard.source} does not exist")
        except Exception as e:
            if retry.classify(e) is not None:
                raise
            return error_message("unreadable shard", str(e) if type(e) is ValueError else f"{type(e).__name__}: {e}")
        return None

    shards = [s for s in plan.shards if s.format == "parquet"]
    with ThreadPoolExecutor(max(1, min(threads, len(shards)))) as pool:
        found = pool.map(check, shards)
        return {shard.id: problem for shard, problem in zip(shards, found) if problem is not None}


def _read_parquet(shard: Shard, fs: Any, path: str, rows_per_batch: int) -> Iterator[dict[str, Any]]:
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        image_col = parquet_image_column(pf.schema_arrow)
        label_col = _first_present(names, LABEL_FIELDS)
        caption_col = _first_present(names, CAPTION_FIELDS)
        key_col = _first_present(names, KEY_FIELDS)
        columns = [c for c in (image_col, label_col, caption_col, key_col) if c]
        index = 0
        seen: set[str] = set()
        for batch in pf.iter_batches(batch_size=rows_per_batch, columns=columns):
            images = batch.column(image_col)
            if pa.types.is_struct(images.type):  # Hugging Face datasets: struct<bytes, path>
                images = images.field("bytes")
            images = images.to_pylist()
            labels = batch.column(label_col).to_pylist() if label_col else [None] * len(images)
            captions = batch.column(caption_col).to_pylist() if caption_col else [None] * len(images)
            keys = batch.column(key_col).to_pylist() if key_col else [None] * len(images)
            for image, label, caption, key in zip(images, labels, captions, keys):
                key = str(key if key is not None else index)
                index += 1
                if key in seen:
                    yield _duplicate(shard, key)
                    continue
                seen.add(key)
                row = {
                    "shard": shard.id, "source": shard.source, "total": -1, "key": f"{shard.id}/{key}",
                    "image": image, "caption": caption if isinstance(caption, str) else None,
                }
                try:
                    row["label"] = None if label is None else _parse_label(str(label))
                except ValueError as e:
                    row.update(image=None, error=error_message("bad metadata", str(e)), stage="read")
                if image is None and "error" not in row:
                    row.update(error=error_message("empty image", "null image bytes"), stage="read")
                elif image is not None and len(image) > MAX_SAMPLE_BYTES:
                    row.update(image=None, error=error_message(
                        "sample too large", f"{len(image):,} bytes (limit {MAX_SAMPLE_BYTES:,})"), stage="read")
                yield row


def _read_images(shard: Shard, fs: Any, skip: frozenset[int]) -> Iterator[dict[str, Any]]:
    """One row per file. A file that is gone or that the store refuses to read as data is an error
    row; a storage fault (`pipelines.retry`) propagates, so that the shard is retried, not marked."""
    for i, (url, key, label) in enumerate(zip(shard.files, shard.keys, shard.labels)):
        row: dict[str, Any] = {"shard": shard.id, "key": key, "source": redact_url(url), "total": -1, "label": label}
        if i in skip:
            yield row  # placeholder, dropped by the caller
            continue
        try:
            data = fs.cat_file(fs._strip_protocol(url), start=0, end=MAX_SAMPLE_BYTES + 1)  # one bounded read
            if len(data) > MAX_SAMPLE_BYTES:
                row.update(label=None, stage="read", error=error_message(
                    "sample too large", f"more than {MAX_SAMPLE_BYTES:,} bytes"))
            else:
                row["image"] = data
        except FileNotFoundError:
            row.update(label=None, error=error_message("missing file", redact_url(url)), stage="read")
        except Exception as e:
            if retry.classify(e) is not None:
                raise
            row.update(label=None, error=error_message("unreadable file", f"{type(e).__name__}: {e}"), stage="read")
        yield row


def _open_rows(shard: Shard, fs: Any, path: str, skip: frozenset[int], rows_per_batch: int):
    if shard.format == "webdataset":
        return _read_webdataset(shard, fs, path)
    if shard.format == "parquet":
        return _read_parquet(shard, fs, path, rows_per_batch)
    if shard.format == "images":
        return _read_images(shard, fs, skip)
    raise AssertionError(f"unknown shard format {shard.format!r}")


def read_shard(
    shard: Shard,
    storage_options: Mapping[str, Any] | None = None,
    *,
    skip: Iterable[int] = (),
    rows_per_batch: int = 64,
    retry_policy: retry.RetryPolicy | None = None,
) -> Iterator[pa.Table]:
    """Yield SAMPLE_SCHEMA tables for one shard; the last row is its end marker (index -1).

    Indices are positions in the shard, stable across runs. `skip` lists indices already done (a
    resumed run); they are not re-emitted, but they count in the end marker's `total`.

    Bad data never raises: a shard that is missing, or that breaks part-way as data (a corrupt tar,
    Parquet without an image column), adds one error row for the rest. A storage fault is not data:
    a transient one re-opens the shard after a backoff and carries on after the last index it
    emitted; once `retry_policy` is spent, or at once for an environment fault (access denied), the
    shard ends with a *failure marker* instead (index -1, total -1, `error` saying why): it is not
    complete, so it gets no done marker and a re-run reads it again. Both markers carry `retries`.
    """
    policy = retry_policy or retry.RetryPolicy()
    skip = frozenset(skip)
    batcher = _Batcher(rows_per_batch)
    tail: list[dict[str, Any]] = []  # a shard-level error and the end marker
    index = 0  # next index to emit: every index below it was emitted (or skipped) exactly once
    retries = 0
    failure: str | None = None
    fs, path = filesystem(shard.url, storage_options)
    while True:
        position = 0
        try:
            for row in _open_rows(shard, fs, path, skip | frozenset(range(index)), rows_per_batch):
                if position >= index:
                    if index not in skip:
                        row["index"] = index
                        out = batcher.add(row)
                        if out is not None:
                            yield out
                    index += 1
                position += 1
            break
        except FileNotFoundError:
            if index not in skip:
                tail.append(_shard_error(shard, index, "missing shard", f"{redact_url(shard.url)} does not exist"))
            index += 1
            break
        except TruncatedShardError as e:
            if index not in skip:
                tail.append(_shard_error(shard, index, "truncated shard", f"{e} (after {index} samples)"))
            index += 1
            break
        except Exception as e:
            kind = retry.classify(e)
            if kind is None:  # a broken shard: report the rest of it as one error row
                if index not in skip:
                    detail = f"{type(e).__name__}: {e} (after {index} samples)"
                    tail.append(_shard_error(shard, index, "unreadable shard", detail))
                index += 1
                break
            if kind == retry.TRANSIENT and retries + 1 < policy.attempts:
                wait = policy.delay(retries)
                log.warning("shard %s: %s after %d samples; retry %d/%d in %.1f s", shard.id, retry.describe(e),
                            index, retries + 1, policy.attempts - 1, wait)
                retries += 1
                time.sleep(wait)
                continue
            failure = error_message(f"storage unavailable after {retries + 1} attempts" if kind == retry.TRANSIENT
                                    else "storage refused", f"({index} samples read) {retry.describe(e)}")
            log.error("shard %s: %s; left unfinished", shard.id, failure)
            break
    end = {"shard": shard.id, "index": -1, "total": index, "key": "", "source": shard.source, "retries": retries}
    if failure is not None:  # not complete: no total, so no done marker; the error says why
        end.update(total=-1, error=failure, stage="read")
    tail.append(end)
    batcher.buf.extend(tail)
    out = batcher.flush()
    assert out is not None, "end marker missing"
    yield out


def _shard_error(shard: Shard, index: int, kind: str, detail: str) -> dict[str, Any]:
    return {
        "shard": shard.id, "index": index, "total": -1, "key": f"{shard.id}/*", "source": shard.source,
        "error": error_message(kind, detail), "stage": "read",
    }


def read_shard_batch(batch: pa.Table, storage_options: Mapping[str, Any] | None = None,
                     rows_per_batch: int = 64, retry_policy: retry.RetryPolicy | None = None) -> Iterator[pa.Table]:
    """Ray Data read stage: rows of (`shard` JSON, `skip` indices) -> sample tables (a generator)."""
    for spec, skip in zip(batch.column("shard").to_pylist(), batch.column("skip").to_pylist()):
        yield from read_shard(Shard.from_json(spec), storage_options, skip=skip or (), rows_per_batch=rows_per_batch,
                              retry_policy=retry_policy)


__all__ = [
    "FORMATS", "InputPlan", "Shard", "expand_braces", "parquet_image_column", "read_shard", "read_shard_batch",
    "resolve_inputs", "unusable_parquet_shards",
    # re-exported from pipelines.storage
    "effective_storage_options", "filesystem", "redact_options", "redact_url",
]
