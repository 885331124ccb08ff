"""Demo corpora from real data installed by the OS packages, written as WebDataset tar shards.

Owns: reading the Debian data (`fonts-noto-color-emoji` + `unicode-data`: 3,655 colour emoji with
names and 9 groups; `dataset-fashion-mnist`: 70,000 product photos in 10 classes with the standard
train/test split), rendering/encoding each sample as PNG, and writing deterministic tar shards
(`<name>-<split>-NNNNNN.tar`, members `<key>.png`, `.cls`, `.txt`, `.json`) plus `dataset.json`.
Does not own: tokenizing them (`pipelines.tokenize`).
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
import itertools
import json
import logging
import os
import signal
import struct
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# NotoColorEmoji is a bitmap font: Pillow renders it only at 109 px, on a 136x128 canvas.
EMOJI_FONT_SIZE = 109
EMOJI_CANVAS = (136, 128)
EMOJI_SKIPPED_GROUPS = ("Component",)  # skin-tone and hair swatches, not emoji of their own
SPLITS = ("train", "test", "all")
EMOJI_TEST_FRACTION = 10  # 1 in 10 emoji (by a hash of the name) is in the emoji test split


@dataclass(frozen=True)
class Sample:
    key: str
    png: bytes
    label: int
    caption: str
    meta: dict


@dataclass(frozen=True)
class Emoji:
    text: str
    codepoints: str
    name: str
    group: str
    subgroup: str


# Writing ------------------------------------------------------------------------------------------
def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    samples: Iterable[Sample], out: Path, prefix: str, *, samples_per_shard: int = 1000,
    files: Callable[[list[Path]], dict[str, bytes]] | None = None,
) -> list[Path]:
    """Write samples as byte-identical-on-rerun tar shards `<prefix>-NNNNNN.tar` under `out`.

    Every shard is written under a hidden temporary name first (readers skip hidden files); only when
    the last one is complete are they renamed into place, together with `files(shards)` (name -> bytes,
    e.g. dataset.json), and shards of `prefix` left from an earlier, larger run are removed, with
    Ctrl-C held off for those few renames. So an interrupted run leaves no shard and no temporary file
    behind, and a corpus already in `out` stays as it was; a re-run writes it all again.
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    out.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(out)
    staged: list[tuple[Path, Path]] = []  # (temporary, final)
    it = iter(samples)
    try:
        while chunk := list(itertools.islice(it, samples_per_shard)):
            path = out / f"{prefix}-{len(staged):06d}.tar"
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            staged.append((tmp, path))
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for sample in chunk:
                    _add_member(tar, f"{sample.key}.png", sample.png)
                    _add_member(tar, f"{sample.key}.cls", str(sample.label).encode())
                    _add_member(tar, f"{sample.key}.txt", sample.caption.encode())
                    _add_member(tar, f"{sample.key}.json", json.dumps(sample.meta, sort_keys=True).encode())
        paths = [path for _, path in staged]
        for name, data in (files(paths) if files else {}).items():
            staged.append((out / f".{name}.tmp-{os.getpid()}", out / name))
            staged[-1][0].write_bytes(data)
        with _signals_held():
            for tmp, path in staged:
                os.replace(tmp, path)
            keep = {p.name for p in paths}
            for old in out.glob(f"{glob.escape(prefix)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
                if old.name not in keep:
                    old.unlink()
        return paths
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def _remove_dead_temporaries(out: Path) -> None:
    """Temporary files of a writer that was killed (-9: no clean-up ran)."""
    for tmp in out.glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends (then raise/terminate as they would have)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    before = {sig: signal.signal(sig, lambda signum, _frame: caught.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        for sig in caught[:1]:
            signal.raise_signal(sig)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _in_split(split: str, is_test: bool) -> bool:
    return split == "all" or (split == "test") == is_test


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def _require(path: Path, package: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: install the Debian package {package} (scripts/setup.sh)")


# Emoji --------------------------------------------------------------------------------------------
def read_emoji_list(path: Path = EMOJI_TEST) -> tuple[list[Emoji], tuple[str, ...]]:
    """Fully-qualified emoji of `emoji-test.txt` in file order, and the group names (labels)."""
    _require(path, "unicode-data")
    emoji: list[Emoji] = []
    groups: list[str] = []
    group = subgroup = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
            if group not in EMOJI_SKIPPED_GROUPS and group not in groups:
                groups.append(group)
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            fields, comment = line.split("#", 1)
            codepoints, status = (x.strip() for x in fields.split(";"))
            if status != "fully-qualified" or group in EMOJI_SKIPPED_GROUPS:
                continue
            # comment: "<emoji> E<version> <name>"
            name = comment.strip().split(" ", 2)[2]
            text = "".join(chr(int(c, 16)) for c in codepoints.split())
            emoji.append(Emoji(text=text, codepoints=codepoints, name=name, group=group, subgroup=subgroup))
    return emoji, tuple(groups)


def render_emoji(text: str, font: ImageFont.FreeTypeFont, size: int) -> Image.Image | None:
    """One emoji, RGBA composited on white, padded to a square and resized to size x size."""
    canvas = Image.new("RGBA", EMOJI_CANVAS, (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), text, font=font, embedded_color=True)
    if canvas.getchannel("A").getbbox() is None:
        return None  # not in the font
    white = Image.new("RGBA", EMOJI_CANVAS, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, canvas).convert("RGB")
    side = max(EMOJI_CANVAS)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgb, ((side - EMOJI_CANVAS[0]) // 2, (side - EMOJI_CANVAS[1]) // 2))
    return square if size == side else square.resize((size, size), Image.Resampling.LANCZOS)


def emoji_is_test(name: str) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % EMOJI_TEST_FRACTION == 0


def emoji_samples(
    *, size: int = 64, split: str = "all", font_path: Path = EMOJI_FONT, limit: int | None = None
) -> Iterator[Sample]:
    """Emoji as samples: caption = the emoji's name, label = its group (0..8)."""
    _check_split(split)
    _require(font_path, "fonts-noto-color-emoji")
    emoji, groups = read_emoji_list()
    font = ImageFont.truetype(str(font_path), EMOJI_FONT_SIZE)
    subgroups = sorted({e.subgroup for e in emoji})
    skipped = written = 0
    for i, e in enumerate(emoji):
        if not _in_split(split, emoji_is_test(e.name)):
            continue
        if limit is not None and written >= limit:
            break
        img = render_emoji(e.text, font, size)
        if img is None:
            skipped += 1
            continue
        written += 1
        label = groups.index(e.group)
        meta = {
            "label": label, "label_name": e.group, "caption": e.name, "codepoints": e.codepoints,
            "subgroup": e.subgroup, "subgroup_label": subgroups.index(e.subgroup), "index": i,
        }
        yield Sample(key=f"{i:06d}", png=_png(img), label=label, caption=e.name, meta=meta)
    if skipped:
        log.warning("skipped %d emoji the font cannot render", skipped)


# Fashion-MNIST ------------------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """An idx(.gz) file (the MNIST format) -> uint8 array."""
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or dtype != 0x08:
        raise ValueError(f"{path}: not a uint8 idx file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_arrays(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N] uint8) of the standard train (60k) or test (10k) split."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    _require(images_path, "dataset-fashion-mnist")
    images = read_idx(images_path)
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    assert images.shape[0] == labels.shape[0], "image and label counts differ"
    return images, labels


def fashion_mnist_samples(
    *, size: int = 28, split: str = "train", root: Path = FASHION_MNIST_DIR, limit: int | None = None
) -> Iterator[Sample]:
    """Fashion-MNIST as samples: label = class id, caption = class name; split 'all' = train + test."""
    _check_split(split)
    for part in ("train", "test") if split == "all" else (split,):
        images, labels = fashion_mnist_arrays(part, root)
        count = len(images) if limit is None else min(limit, len(images))
        for i in range(count):
            img = Image.fromarray(images[i], mode="L")  # (28, 28)
            if size != img.width:
                img = img.resize((size, size), Image.Resampling.BICUBIC)
            label = int(labels[i])
            name = FASHION_MNIST_CLASSES[label]
            meta = {"label": label, "label_name": name, "caption": name, "split": part, "index": i}
            yield Sample(key=f"{part}{i:06d}", png=_png(img), label=label, caption=name, meta=meta)


# Entry point --------------------------------------------------------------------------------------
CORPORA = ("emoji", "fashion-mnist")
DEFAULT_SIZES = {"emoji": 64, "fashion-mnist": 28}
DEFAULT_SPLITS = {"emoji": "all", "fashion-mnist": "train"}


MAX_SIZE = 1024  # the sources are 136 px (emoji) and 28 px (Fashion-MNIST): larger is only upsampling


def build_corpus(
    name: str,
    out: Path,
    *,
    size: int | None = None,
    split: str | None = None,
    samples_per_shard: int = 1000,
    limit: int | None = None,
) -> dict:
    """Write corpus `name` under `out`; returns what `dataset.json` says."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
    size = DEFAULT_SIZES[name] if size is None else size
    split = DEFAULT_SPLITS[name] if split is None else split
    if not 1 <= size <= MAX_SIZE:  # 100,000 px per side would mean 30 GB per image
        raise ValueError(f"--size must be in 1..{MAX_SIZE}, got {size}")
    _check_split(split)
    if name == "emoji":
        samples = emoji_samples(size=size, split=split, limit=limit)
        class_names = list(read_emoji_list()[1])
        source = f"Debian fonts-noto-color-emoji ({EMOJI_FONT}) + unicode-data ({EMOJI_TEST})"
    else:
        samples = fashion_mnist_samples(size=size, split=split, limit=limit)
        class_names = list(FASHION_MNIST_CLASSES)
        source = f"Debian dataset-fashion-mnist ({FASHION_MNIST_DIR})"
    counts = [0] * len(class_names)

    def counted(items: Iterable[Sample]) -> Iterator[Sample]:
        for s in items:
            counts[s.label] += 1
            yield s

    info: dict = {}

    def describe(shards: list[Path]) -> dict[str, bytes]:
        info.update({
            "name": name, "split": split, "image_size": size, "num_samples": sum(counts),
            "num_shards": len(shards), "shards": [p.name for p in shards], "class_names": class_names,
            "class_counts": counts, "source": source,
            "members": {"png": "RGB/L image", "cls": "label", "txt": "caption", "json": "all metadata"},
        })
        return {"dataset.json": (json.dumps(info, indent=2) + "\n").encode()}

    write_shards(counted(samples), out, f"{name}-{split}", samples_per_shard=samples_per_shard, files=describe)
    return info
