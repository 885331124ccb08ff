"""Image bytes -> RGB uint8 pixels at the tokenizer's size, on CPU; every failure an error row.

Owns: refusing bad bytes (empty, not an image, truncated, decompression bombs, tiny images) with a
one-line reason; EXIF orientation; converting every Pillow mode to RGB (transparency composited on
white; 16-bit, CMYK, palette, grey converted); first frame of animations; shorter side resized and
centre-cropped to a square. `decode_batch` is the stateless Ray Data stage over `SAMPLE_SCHEMA`
tables. Does not own: reading shards (`pipelines.sources`) or the model (`pipelines.encode`).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.schema import DECODED_SCHEMA, error_message

DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MIN_SIDE = 8
_ORIENTATION_TAG = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class DecodeError(ValueError):
    """A sample that cannot become pixels; `kind` groups it in the summary."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(error_message(kind, detail))
        self.kind = kind


@dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    image_size: int
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {self.min_side}")


def _white_background(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """Grey images with more than 8 bits ('I;16*', 'I', 'F') -> 'L' by scaling, not clipping."""
    arr = np.asarray(img)
    if img.mode == "F":
        out = np.clip(arr, 0.0, 255.0)
    elif img.mode.startswith("I;16") or arr.max(initial=0) > 255:
        out = np.clip(arr.astype(np.float64) / 257.0, 0.0, 255.0)  # 0..65535 -> 0..255
    else:
        out = np.clip(arr, 0, 255)
    return Image.fromarray(np.rint(out).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 'RGB'; anything transparent is composited on white."""
    mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in img.info
    ):
        if mode in ("RGBa", "La"):
            img = img.convert(mode.upper())
        return _white_background(img)
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_l(img).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def centre_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square of a width x height image, as a Pillow box."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return (left, top, left + side, top + side)


def jpeg_for_device(data: bytes | None, cfg: DecodeConfig) -> tuple[int, int] | None:
    """(width, height) when `data` is a JPEG that a device decoder may take instead of this module:
    RGB or grey, no EXIF rotation, inside the size limits; read from the header alone (no pixels
    are decoded). None leaves the sample to `decode_image`, which also names any error."""
    if not data:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                    return None
                width, height = img.size
                if width * height > cfg.max_pixels or min(width, height) < cfg.min_side:
                    return None
                if img.getexif().get(_ORIENTATION_TAG, 1) != 1:
                    return None
                return width, height
    except Exception:  # anything odd: decode_image decides, with its one-line reasons
        return None


def decode_image(data: bytes | None, cfg: DecodeConfig) -> tuple[np.ndarray, int, int]:
    """Bytes -> (pixels [S, S, 3] uint8, original width, original height), or DecodeError.

    The original size is after EXIF orientation (what a viewer shows), before resizing.
    """
    if not data:
        raise DecodeError("empty image", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            # Refuse before any pixel is decoded: the header alone gives the size.
            if width * height > cfg.max_pixels:
                raise DecodeError("image too large", f"{width}x{height} exceeds {cfg.max_pixels} pixels")
            try:
                orientation = img.getexif().get(_ORIENTATION_TAG, 1)
            except Exception:  # broken EXIF: keep the pixels, ignore the orientation
                orientation = 1
            if orientation in _TRANSPOSED_ORIENTATIONS:
                width, height = height, width
            if min(width, height) < cfg.min_side:
                raise DecodeError("image too small", f"{width}x{height} is below {cfg.min_side} pixels")
            if getattr(img, "is_animated", False):
                img.seek(0)
            if img.format == "JPEG":  # decode at a reduced DCT scale when that still covers the target
                img.draft(None, (cfg.image_size, cfg.image_size))
            img.load()
            if orientation != 1:
                with contextlib.suppress(Exception):  # broken EXIF: keep the pixels as stored
                    img = ImageOps.exif_transpose(img)
            rgb = to_rgb(img)
            # Crop first: resizing with a box would let the filter see pixels outside the square.
            resized = rgb.crop(centre_crop_box(*rgb.size)).resize(
                (cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC, reducing_gap=3.0
            )
            pixels = np.asarray(resized, dtype=np.uint8)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image", "unrecognised image format") from None
    except Image.DecompressionBombError as e:
        raise DecodeError("image too large", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        text = str(e)
        kind = "truncated image" if "truncat" in text.lower() else "corrupt image"
        raise DecodeError(kind, f"{type(e).__name__}: {text}") from None
    except Exception as e:  # a decoder bug must not fail the task
        raise DecodeError("corrupt image", f"{type(e).__name__}: {e}") from None
    assert pixels.shape == (cfg.image_size, cfg.image_size, 3), f"bad decoded shape {pixels.shape}"
    return pixels, width, height


def decode_batch(
    batch: pa.Table,
    *,
    image_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    defer_jpeg: bool = False,
) -> pa.Table:
    """Ray Data CPU stage: SAMPLE_SCHEMA -> DECODED_SCHEMA. Rows already in error pass through.

    With `defer_jpeg`, JPEGs that `jpeg_for_device` accepts pass through undecoded (`pixels_format`
    "jpeg") for the encoder's GPU to decode in batches (`pipelines.gpu_decode`).
    """
    cfg = DecodeConfig(image_size=image_size, max_pixels=max_pixels, min_side=min_side)
    images = batch.column("image").to_pylist()
    errors = batch.column("error").to_pylist()
    stages = batch.column("stage").to_pylist()
    indices = batch.column("index").to_pylist()
    pixels: list[bytes | None] = []
    widths: list[int | None] = []
    heights: list[int | None] = []
    formats: list[str | None] = [None] * len(images)
    for i, (data, index) in enumerate(zip(images, indices)):
        if errors[i] is not None or index < 0:
            pixels.append(None), widths.append(None), heights.append(None)
            continue
        if defer_jpeg and (size := jpeg_for_device(data, cfg)) is not None:
            pixels.append(data), widths.append(size[0]), heights.append(size[1])
            formats[i] = "jpeg"
            continue
        try:
            arr, width, height = decode_image(data, cfg)
        except DecodeError as e:
            errors[i], stages[i] = str(e), "decode"
            pixels.append(None), widths.append(None), heights.append(None)
            continue
        pixels.append(arr.tobytes())
        widths.append(width)
        heights.append(height)
    columns = {name: batch.column(name) for name in DECODED_SCHEMA.names if name in batch.column_names}
    columns.update(
        error=pa.array(errors, pa.string()),
        stage=pa.array(stages, pa.string()),
        pixels=pa.array(pixels, pa.binary()),
        width=pa.array(widths, pa.int32()),
        height=pa.array(heights, pa.int32()),
        pixels_format=pa.array(formats, pa.string()),
    )
    return pa.Table.from_pydict({name: columns[name] for name in DECODED_SCHEMA.names}, schema=DECODED_SCHEMA)

