"""Small helpers shared by the pipeline tests (importable because pytest puts this folder on sys.path)."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
from PIL import Image

from pipelines.corpus import fashion_mnist_samples, write_shards
from pipelines.sources import Shard, read_shard


def jpeg_bytes(real_images, i: int, size: tuple[int, int] = (80, 60)) -> bytes:
    img = real_images[i % len(real_images)].open().convert("RGB").resize(size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def read_all(shard: Shard, skip=(), storage_options=None) -> list[dict]:
    """Every row the read stage yields for a shard (the last is the end marker)."""
    tables = list(read_shard(shard, storage_options, skip=skip, rows_per_batch=4))
    return pa.concat_tables(tables).to_pylist()


def read_output(dst: str | Path, filesystem=None) -> tuple[pa.Table, pa.Table]:
    """(token rows, error rows) of a token dataset, read with pyarrow.dataset, sorted by key."""
    dst = str(dst).rstrip("/")
    rows = pads.dataset(dst, format="parquet", filesystem=filesystem).to_table()
    try:
        errors = pads.dataset(f"{dst}/_errors", format="parquet", filesystem=filesystem).to_table()
    except (FileNotFoundError, OSError):
        errors = None
    if errors is None or errors.num_rows == 0:
        from pipelines.schema import ERROR_SCHEMA

        errors = ERROR_SCHEMA.empty_table()
    return rows.sort_by("key"), errors.sort_by([("key", "ascending"), ("error", "ascending")])


def outcome(rows: pa.Table, errors: pa.Table) -> dict[str, str | None]:
    """key -> None for a token row, else the error kind (a key written once and reported once as a
    duplicate keeps None)."""
    out: dict[str, str | None] = {k: None for k in rows.column("key").to_pylist()}
    for key, err in zip(errors.column("key").to_pylist(), errors.column("error").to_pylist()):
        out.setdefault(key, err.split(":")[0])
    return out


def image_of(path: Path) -> Image.Image:
    return Image.open(path)


# Encoders for the odd cases ------------------------------------------------------------------------
def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png16_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write these)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")


def huge_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny file whose header claims a decompression bomb's size."""
    small = png(Image.new("L", (8, 8), 128))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    start = small.index(b"IHDR") - 4
    end = start + 4 + 4 + 13 + 4
    return small[:start] + png_chunk(b"IHDR", ihdr) + small[end:]


def photo(real_images, i: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    img = real_images[i % len(real_images)].open().convert("RGB")
    return img.resize(size, Image.Resampling.BICUBIC)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))


def sample(key: str, ext: str, data: bytes, label: int | None = None, caption: str | None = None):
    out = [(f"{key}.{ext}", data)]
    if label is not None:
        out.append((f"{key}.cls", str(label).encode()))
    if caption is not None:
        out.append((f"{key}.txt", caption.encode()))
    return out


@dataclass(frozen=True)
class Corpus:
    root: Path
    url: str  # what --input gets
    expected: dict[str, str | None]  # key -> error kind, None for a token row
    sizes: dict[str, tuple[int, int]]  # key -> original (width, height) of token rows with a known size
    duplicates: tuple[str, ...] = ()  # keys seen a second time: one token row + one "duplicate key" error

    @property
    def num_inputs(self) -> int:
        return len(self.expected) + len(self.duplicates)

    @property
    def ok_keys(self) -> set[str]:
        return {k for k, v in self.expected.items() if v is None}


def build_bad_corpus(root: Path, real_images, animated_gif: Path | None) -> Corpus:
    """Five shards: tricky-but-valid images, bad samples, a garbage tar, a tar truncated part-way,
    and (through the brace pattern) a shard that does not exist."""
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}
    sizes: dict[str, tuple[int, int]] = {}

    # shard-000000: all decodable.
    s0 = "shard-000000"
    m: list[tuple[str, bytes]] = []
    for i in range(len(real_images)):
        m += sample(f"photo{i}", "jpg", jpeg(photo(real_images, i)), label=i, caption=real_images[i].name)
        expected[f"{s0}/photo{i}"] = None
        sizes[f"{s0}/photo{i}"] = (96, 72)
    base = photo(real_images, 0, (120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: displayed 80 x 120
    m += sample("exif6", "jpg", jpeg(base, exif=exif), label=1)
    sizes[f"{s0}/exif6"] = (80, 120)
    m += sample("png", "png", png(photo(real_images, 1)), caption="a png")
    grey16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    m += sample("grey16", "png", png(Image.fromarray(grey16)))
    m += sample("rgb16", "png", png16_rgb(np.asarray(base, dtype=np.uint16) * 257))
    m += sample("cmyk", "jpg", jpeg(base.convert("CMYK")))
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    m += sample("palette_transparent", "png", png(pal, transparency=0))
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    m += sample("rgba", "png", png(rgba))
    m += sample("la", "png", png(rgba.convert("LA")))
    frames = [photo(real_images, i, (64, 48)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], duration=100, loop=0)
    m += sample("anim_webp", "webp", buf.getvalue())
    if animated_gif is not None:
        m += sample("anim_gif", "gif", animated_gif.read_bytes())  # a real 24-frame GIF
        sizes[f"{s0}/anim_gif"] = Image.open(animated_gif).size
    else:
        buf = io.BytesIO()
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
        m += sample("anim_gif", "gif", buf.getvalue())
    m += sample("webp", "webp", _webp(photo(real_images, 2)))
    m += [("json_only.png", png(photo(real_images, 3))), ("json_only.json", b'{"label": 7, "caption": "from json"}')]
    for key in ("exif6", "png", "grey16", "rgb16", "cmyk", "palette_transparent", "rgba", "la", "anim_webp",
                "anim_gif", "webp", "json_only"):
        expected[f"{s0}/{key}"] = None
    write_tar(root / f"{s0}.tar", m)

    # shard-000001: one of each bad kind, between good samples.
    s1 = "shard-000001"
    good = jpeg(photo(real_images, 4))
    full = jpeg(photo(real_images, 5, (200, 150)))
    corrupt = bytearray(full)
    for k in range(400, len(corrupt) - 2):
        corrupt[k] = 0xFF if k % 2 else 0x00
    m = []
    m += sample("dup", "jpg", good, label=0)
    m += sample("truncated", "jpg", full[: len(full) // 2])
    m += sample("corrupt", "jpg", bytes(corrupt))
    m += sample("zero", "jpg", b"")
    m += sample("text", "png", b"this is a text file, not a PNG\n")
    m += [("noimage.cls", b"3"), ("noimage.txt", b"a sample without an image")]
    m += sample("huge", "png", huge_png())
    m += sample("onepx", "png", png(Image.new("RGB", (1, 1), (200, 10, 10))))
    m += sample("badlabel", "jpg", good) + [("badlabel.cls", b"not-a-number")]
    m += sample("ok", "jpg", good, label=5, caption="fine")
    m += sample("dup", "jpg", good, label=9)  # same key again, not adjacent: reported, first kept
    write_tar(root / f"{s1}.tar", m)
    expected.update({
        f"{s1}/dup": None, f"{s1}/truncated": "truncated image", f"{s1}/corrupt": "corrupt image",
        f"{s1}/zero": "empty image", f"{s1}/text": "not an image", f"{s1}/noimage": "no image member",
        f"{s1}/huge": "image too large", f"{s1}/onepx": "image too small", f"{s1}/badlabel": "bad metadata",
        f"{s1}/ok": None,
    })

    # shard-000002: not a tar at all.
    (root / "shard-000002.tar").write_bytes(b"garbage " * 100)
    expected["shard-000002/*"] = "unreadable shard"

    # shard-000003: a tar cut in the middle of its fourth member.
    members = [(f"t{i}.jpg", jpeg(photo(real_images, i))) for i in range(5)]
    write_tar(root / "whole.tmp", members)
    data = (root / "whole.tmp").read_bytes()
    (root / "whole.tmp").unlink()
    offset = 0
    for _, payload in members[:3]:
        offset += 512 + (len(payload) + 511) // 512 * 512
    (root / "shard-000003.tar").write_bytes(data[: offset + 512 + len(members[3][1]) // 2])
    expected.update({f"shard-000003/t{i}": None for i in range(3)})
    expected["shard-000003/*"] = "unreadable shard"

    # shard-000004: named by the pattern, absent.
    expected["shard-000004/*"] = "missing shard"
    return Corpus(root=root, url=str(root / "shard-{000000..000004}.tar"), expected=expected, sizes=sizes,
                  duplicates=(f"{s1}/dup",))


def _webp(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="WEBP", quality=90)
    return buf.getvalue()


def build_fashion_corpus(root: Path, *, num: int, per_shard: int) -> Corpus:
    """Real Fashion-MNIST test images as WebDataset shards (the `flextok corpus` writer)."""
    samples = list(fashion_mnist_samples(split="test", limit=num))
    paths = write_shards(samples, root, "fm", samples_per_shard=per_shard)
    expected = {f"{p.stem}/{s.key}": None for n, p in enumerate(paths) for s in samples[n * per_shard : (n + 1) * per_shard]}
    return Corpus(root=root, url=str(root), expected=expected, sizes={k: (28, 28) for k in expected})


