"""GPU-side JPEG decode: the torch crop/resize reproduces the Pillow path, the routing sends every
other sample to the CPU path with the same error rows; nvJPEG itself only where CUDA exists."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.decode import DecodeConfig, DecodeError, decode_image
from pipelines.gpu_decode import (
    decode_on_device,
    nvjpeg_decoder,
    pillow_decoder,
    resize_like_pillow,
)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.mark.parametrize("size", [28, 32, 64, 256])
def test_torch_resize_reproduces_the_pillow_path_on_real_photos(real_images, size):
    for photo in real_images:
        data = _jpeg(photo.open())
        expected, _, _ = decode_image(data, DecodeConfig(image_size=size))
        full = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
        got = resize_like_pillow(full, size).numpy()
        assert got.shape == expected.shape == (size, size, 3)
        diff = np.abs(got.astype(int) - expected.astype(int))
        # Measured: 45.9-56.6 dB, mean |diff| 0.14-0.58 (draft scaling is emulated by an average pool).
        assert _psnr(got, expected) > 44 and diff.mean() < 0.8, (photo.name, size, _psnr(got, expected), diff.mean())


def test_without_the_draft_and_box_steps_the_resize_would_differ(real_images):
    """The comparison above can fail: a plain bicubic resize of the centre square misses the Pillow
    path's draft/reducing-gap steps by far more at small sizes."""
    import torch.nn.functional as F

    worst = float("inf")
    for photo in real_images:
        data = _jpeg(photo.open())
        expected, _, _ = decode_image(data, DecodeConfig(image_size=28))
        full = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1).float()
        side = min(full.shape[1:])
        top, left = (full.shape[1] - side) // 2, (full.shape[2] - side) // 2
        plain = F.interpolate(full[None, :, top : top + side, left : left + side], size=(28, 28), mode="bicubic",
                              antialias=True).round().clamp(0, 255).byte()[0].permute(1, 2, 0).numpy()
        worst = min(worst, _psnr(plain, expected))
    assert worst < 40, worst


def test_mixed_batch_routes_non_jpegs_and_bad_files_to_the_cpu_path(real_images):
    cfg = DecodeConfig(image_size=32)
    photo = real_images[0].open()
    png = io.BytesIO()
    photo.save(png, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    good = _jpeg(photo)
    batch = [good, png.getvalue(), good[: len(good) // 3], _jpeg(photo, exif=exif), b"", b"not an image", None,
             _jpeg(real_images[1].open().convert("L"))]
    pixels, sizes, errors = decode_on_device(batch, cfg, "cpu")
    assert pixels.shape == (len(batch), 32, 32, 3) and pixels.dtype == torch.uint8
    for i, data in enumerate(batch):
        try:
            arr, w, h = decode_image(data, cfg)
        except DecodeError as e:
            assert errors[i] == str(e) and sizes[i] is None and not pixels[i].any(), i
            continue
        assert errors[i] is None and sizes[i] == (w, h), i
        if i in (0, 7):  # JPEGs decoded at full size, resized in torch
            assert _psnr(pixels[i].numpy(), arr) > 40, i
        else:  # the CPU path itself: identical
            assert np.array_equal(pixels[i].numpy(), arr), i
    assert errors[2] is not None and "truncated" in errors[2]
    assert errors[4] is not None and errors[5] is not None and errors[6] is not None


def test_a_batch_the_decoder_refuses_is_retried_image_by_image(real_images):
    calls = []

    def picky(data, device):  # fails whole batches, as nvJPEG does when one file is bad
        calls.append(len(data))
        if len(data) > 1:
            raise RuntimeError("batch refused")
        return pillow_decoder(data, device)

    jpegs = [_jpeg(p.open()) for p in real_images[:3]]
    pixels, sizes, errors = decode_on_device(jpegs, DecodeConfig(image_size=16), "cpu", jpeg_decoder=picky)
    assert calls == [3, 1, 1, 1] and errors == [None] * 3 and all(s is not None for s in sizes)
    reference, _, _ = decode_on_device(jpegs, DecodeConfig(image_size=16), "cpu")
    assert torch.equal(pixels, reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA GPU")
def test_nvjpeg_decodes_like_pillow(real_images):
    data = [torch.frombuffer(bytearray(_jpeg(p.open())), dtype=torch.uint8) for p in real_images]
    gpu = nvjpeg_decoder(data, torch.device("cuda"))
    cpu = pillow_decoder(data, torch.device("cpu"))
    for g, c in zip(gpu, cpu):
        assert g.shape == c.shape and (g.cpu().int() - c.int()).abs().float().mean() < 1.0


def _samples(blobs: list[bytes]):
    import pyarrow as pa

    from pipelines.schema import SAMPLE_SCHEMA

    rows = [{"shard": "s", "index": i, "total": -1, "key": f"s/{i}", "source": "u", "image": b}
            for i, b in enumerate(blobs)]
    return pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)


def test_decode_stage_defers_eligible_jpegs_and_the_actor_decodes_them(real_images, tiny_checkpoint):
    """--gpu-decode end to end without Ray: the CPU stage passes eligible JPEG bytes through (size from
    the header), the actor decodes them on its device and encodes exactly those pixels; a JPEG that
    fails there becomes a decode error row with decode_image's message; PNGs decode on the CPU."""
    from pipelines.decode import decode_batch
    from pipelines.encode import TokenizeBatch
    from pipelines.model import load_model

    photo = real_images[0].open()
    png = io.BytesIO()
    photo.save(png, "PNG")
    good = [_jpeg(p.open()) for p in real_images[:3]]
    bad = good[0][:200] + b"\0" * 4000 + good[0][-2:]  # a readable header, then garbage
    blobs = [good[0], png.getvalue(), good[1], bad, good[2]]
    decoded = decode_batch(_samples(blobs), image_size=32, defer_jpeg=True)
    formats = decoded.column("pixels_format").to_pylist()
    assert formats == ["jpeg", None, "jpeg", "jpeg", "jpeg"]
    assert decoded.column("pixels").to_pylist()[0] == good[0]
    assert (decoded.column("width")[0].as_py(), decoded.column("height")[0].as_py()) == photo.size

    stage = TokenizeBatch(str(tiny_checkpoint), num_threads=1)
    out = stage(decoded)
    errors = out.column("error").to_pylist()
    assert errors[:3] == [None, None, None] and errors[4] is None
    with pytest.raises(DecodeError) as expected:
        decode_image(bad, DecodeConfig(image_size=32))
    assert errors[3] == str(expected.value) and out.column("stage").to_pylist()[3] == "decode"
    pixels, _, _ = decode_on_device([good[0], good[1], good[2]], DecodeConfig(image_size=32), "cpu")
    png_pixels, _, _ = decode_image(png.getvalue(), DecodeConfig(image_size=32))
    x = torch.cat([pixels[:1], torch.from_numpy(png_pixels)[None], pixels[1:]])
    expected_ids = load_model(str(tiny_checkpoint)).tokenize(x.permute(0, 3, 1, 2).float() / 127.5 - 1)
    tokens = [t for t in out.column("tokens").to_pylist() if t is not None]
    assert tokens == expected_ids.tolist()
