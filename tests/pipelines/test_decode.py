import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pipeline_helpers import huge_png, jpeg, outcome, photo, png, png16_rgb, read_all

from pipelines.decode import DecodeConfig, DecodeError, centre_crop_box, decode_batch, decode_image
from pipelines.schema import DECODED_SCHEMA
from pipelines.sources import resolve_inputs

CFG = DecodeConfig(image_size=32)


def test_every_bad_corpus_sample_decodes_or_gets_its_reason(bad_corpus):
    plan = resolve_inputs(bad_corpus.url)
    tables = [decode_batch(pa.Table.from_pylist(read_all(s), schema=_sample_schema()), image_size=32)
              for s in plan.shards]
    table = pa.concat_tables(tables)
    assert table.schema.equals(DECODED_SCHEMA)
    samples = table.filter(pa.compute.greater_equal(table["index"], 0))
    ok = samples.filter(pa.compute.is_null(samples["error"]))
    bad = samples.filter(pa.compute.is_valid(samples["error"]))
    got = outcome(ok.select(["key"]), bad.select(["key", "error"]))
    assert got == bad_corpus.expected
    assert all(len(p) == 32 * 32 * 3 for p in ok.column("pixels").to_pylist())
    sizes = dict(zip(ok.column("key").to_pylist(), zip(ok.column("width").to_pylist(), ok.column("height").to_pylist())))
    for key, size in bad_corpus.sizes.items():
        assert sizes[key] == size, key


def _sample_schema():
    from pipelines.schema import SAMPLE_SCHEMA

    return SAMPLE_SCHEMA


def test_exif_orientation_is_applied(real_images):
    img = Image.new("RGB", (60, 40), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 60, 20))  # top half blue, bottom half red
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer rotates 90 degrees clockwise: blue ends up on the right
    pixels, width, height = decode_image(jpeg(img, exif=exif), DecodeConfig(image_size=16))
    assert (width, height) == (40, 60)
    left, right = pixels[:, :4].mean(axis=(0, 1)), pixels[:, -4:].mean(axis=(0, 1))
    assert left[0] > 200 and left[2] < 60  # red
    assert right[2] > 200 and right[0] < 60  # blue


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # fully transparent black
    rgba.paste((255, 0, 0, 255), (0, 0, 10, 20))  # opaque red left half
    pixels, _, _ = decode_image(png(rgba), DecodeConfig(image_size=20, min_side=1))
    assert np.all(pixels[:, 15:] == 255)
    assert np.all(pixels[:, :5] == [255, 0, 0])
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (0, 0, 10, 20))
    pixels, _, _ = decode_image(png(pal, transparency=0), DecodeConfig(image_size=20, min_side=1))
    assert np.all(pixels[:, 15:] == 255) and np.all(pixels[:, :5] == [0, 255, 0])


def test_sixteen_bit_images_are_scaled_not_clipped(real_images):
    base = photo(real_images, 0, (64, 64))
    reference, _, _ = decode_image(png(base), CFG)
    rgb16, _, _ = decode_image(png16_rgb(np.asarray(base, dtype=np.uint16) * 257), CFG)
    assert np.abs(rgb16.astype(int) - reference).max() <= 1
    grey = base.convert("L")
    grey_ref, _, _ = decode_image(png(grey), CFG)
    grey16, _, _ = decode_image(png(Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257)), CFG)
    assert np.abs(grey16.astype(int) - grey_ref).max() <= 1
    assert grey16.std() > 10  # clipping at 255 would make it nearly white


def test_cmyk_jpeg_keeps_its_colours(real_images):
    base = photo(real_images, 1, (64, 64))
    reference, _, _ = decode_image(jpeg(base), CFG)
    cmyk, _, _ = decode_image(jpeg(base.convert("CMYK")), CFG)
    assert np.abs(cmyk.astype(float) - reference).mean() < 12


def test_shorter_side_resize_and_centre_crop():
    assert centre_crop_box(100, 40) == (30, 0, 70, 40)
    assert centre_crop_box(40, 100) == (0, 30, 40, 70)
    img = Image.new("RGB", (300, 100), (0, 0, 255))
    img.paste((255, 0, 0), (100, 0, 200, 100))  # red centre square, blue sides
    pixels, width, height = decode_image(png(img), DecodeConfig(image_size=10))
    assert (width, height) == (300, 100)
    assert np.all(pixels[..., 0] > 240) and np.all(pixels[..., 2] < 15)


def test_pixel_limit_refuses_before_decoding():
    with pytest.raises(DecodeError, match="image too large"):
        decode_image(huge_png(3000, 3000), DecodeConfig(image_size=32, max_pixels=1_000_000))
    with pytest.raises(DecodeError, match="image too large"):
        decode_image(huge_png(), CFG)  # 10^10 pixels: Pillow's own bomb check also refuses


def test_min_side_is_configurable():
    tiny = png(Image.new("RGB", (1, 1), (10, 20, 30)))
    with pytest.raises(DecodeError, match="image too small"):
        decode_image(tiny, CFG)
    pixels, _, _ = decode_image(tiny, DecodeConfig(image_size=4, min_side=1))
    assert np.all(pixels == [10, 20, 30])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF"]))
def test_arbitrary_bytes_never_escape_as_other_exceptions(data, magic):
    try:
        pixels, _, _ = decode_image(magic + data, CFG)
    except DecodeError as e:
        assert "\n" not in str(e)
    else:
        assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8


def test_decode_batch_passes_errors_and_end_markers_through():
    rows = [
        {"shard": "s", "index": 0, "total": -1, "key": "s/0", "source": "u", "image": None,
         "error": "no image member: x", "stage": "read"},
        {"shard": "s", "index": -1, "total": 1, "key": "", "source": "u"},
    ]
    out = decode_batch(pa.Table.from_pylist(rows, schema=_sample_schema()), image_size=8)
    assert out.column("error").to_pylist() == ["no image member: x", None]
    assert out.column("stage").to_pylist() == ["read", None]
    assert out.column("pixels").to_pylist() == [None, None]
    assert out.column("total").to_pylist() == [-1, 1]


def _with_claimed_size(fmt: str, side: int) -> bytes:
    """A real 16x16 image whose header claims side x side (nothing beyond the header is changed)."""
    import io
    import struct

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, format=fmt)
    data = bytearray(buf.getvalue())
    if fmt == "JPEG":  # SOF0: marker, length (2), precision (1), height (2), width (2)
        at = data.index(b"\xff\xc0") + 5
        data[at : at + 4] = struct.pack(">HH", side, side)
    elif fmt == "GIF":  # logical screen width, height (little-endian) after the 6-byte signature
        data[6:10] = struct.pack("<HH", side, side)
    else:  # WEBP lossy: the VP8 key frame's 14-bit width and height
        assert data[12:16] == b"VP8 "
        data[26:30] = struct.pack("<HH", side, side)
    return bytes(data)


@pytest.mark.parametrize("fmt", ["JPEG", "GIF", "WEBP"])
def test_header_size_limits_for_jpeg_gif_webp(fmt):
    # 12,000^2 = 1.44e8: above our 1e8 limit, below Pillow's own bomb limit (~1.79e8), so ours decides.
    with pytest.raises(DecodeError, match="image too large: 12000x12000 exceeds 100000000 pixels"):
        decode_image(_with_claimed_size(fmt, 12000), DecodeConfig(image_size=32))
    with pytest.raises(DecodeError, match="image too large"):  # ~1e9 pixels: refused from the header
        decode_image(_with_claimed_size(fmt, 16000 if fmt == "WEBP" else 40000), DecodeConfig(image_size=32))
    pixels, width, height = decode_image(_with_claimed_size(fmt, 16), DecodeConfig(image_size=32))
    assert (width, height) == (16, 16) and pixels.shape == (32, 32, 3)
