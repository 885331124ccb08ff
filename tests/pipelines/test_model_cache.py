"""Models from any fsspec URL: fetched once per node into a cache, checked by sha256 (moto S3 on 127.0.0.1,
counted by the fault proxy, which here injects nothing)."""

from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fault_proxy import FaultProxy

from flextok.checkpoint import file_sha256
from pipelines.encode import TokenizeBatch
from pipelines.model import inspect_model, resolve_model_spec
from pipelines.storage import fetch_checkpoint

pytestmark = pytest.mark.slow  # moto server


@pytest.fixture
def remote_model(s3_server, tiny_checkpoint):
    bucket = s3_server.make_bucket("models")
    s3_server.filesystem().put_file(str(tiny_checkpoint), f"{bucket}/tok/model.safetensors")
    return bucket


def test_one_download_per_node_however_many_actors_ask(s3_server, remote_model, tiny_checkpoint, tmp_path):
    parts = urlsplit(s3_server.endpoint_url)
    proxy = FaultProxy((parts.hostname, parts.port))
    opts = {**s3_server.storage_options, "endpoint_url": proxy.endpoint_url, "skip_instance_cache": True}
    gets = []
    proxy._fault_for = lambda line, _orig=proxy._fault_for: (gets.append(line), _orig(line))[1]
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(fetch_checkpoint(
        f"s3://{remote_model}/tok/", opts, cache_dir=str(tmp_path), sha256=file_sha256(tiny_checkpoint))))
        for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    proxy.close()
    assert len(paths) == 4 and len(set(paths)) == 1  # a run folder URL -> its model.safetensors
    assert Path(paths[0]).read_bytes() == tiny_checkpoint.read_bytes()
    downloads = [g for g in gets if g.startswith(f"GET /{remote_model}/tok/model.safetensors")]
    assert len(downloads) == 1, gets


def test_a_copy_with_another_sha256_is_refused(s3_server, remote_model, tmp_path):
    url = f"s3://{remote_model}/tok/model.safetensors"
    with pytest.raises(ValueError, match="does not have the sha256"):
        fetch_checkpoint(url, s3_server.storage_options, cache_dir=str(tmp_path), sha256="0" * 64)


def test_an_actor_loads_a_model_url_and_tokenizes_as_the_local_file(s3_server, remote_model, tiny_checkpoint,
                                                                    monkeypatch, tmp_path):
    import numpy as np
    import pyarrow as pa

    from pipelines.schema import DECODED_SCHEMA

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    url = f"s3://{remote_model}/tok/model.safetensors"
    assert resolve_model_spec(url) == url
    info = inspect_model(url, s3_server.storage_options)
    assert info.checkpoint_id == url and info.checkpoint_sha256 == file_sha256(tiny_checkpoint)
    remote = TokenizeBatch(url, storage_options=s3_server.storage_options, sha256=info.checkpoint_sha256)
    local = TokenizeBatch(str(tiny_checkpoint))
    size = info.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    rows = [{"shard": "s", "index": i, "total": -1, "key": f"s/{i}", "source": "x", "pixels": p.tobytes(),
             "width": size, "height": size} for i, p in enumerate(pixels)]
    batch = pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)
    assert remote(batch).column("tokens").to_pylist() == local(batch).column("tokens").to_pylist()


def test_a_release_folder_on_s3_brings_its_config_json(s3_server, tmp_path):
    """An official release is weights + config.json (settings no tensor shows): both are fetched, so
    the model built from the cache is the one a local copy of the folder gives."""
    import json

    from flextok import FlexTok

    golden = Path(__file__).resolve().parents[1] / "fixtures" / "official_golden" / "release"
    config = json.loads((golden / "config.json").read_text())
    config["vae"]["scaling_factor"] = 0.5  # not the default a release without config.json gets
    local = tmp_path / "release"
    local.mkdir()
    (local / "config.json").write_text(json.dumps(config))
    (local / "model.safetensors").symlink_to(golden / "model.safetensors")
    bucket = s3_server.make_bucket("release")
    fs = s3_server.filesystem()
    for name in ("config.json", "model.safetensors"):
        fs.put_file(str(local / name), f"{bucket}/flextok_tiny/{name}")
    fetched = fetch_checkpoint(f"s3://{bucket}/flextok_tiny", s3_server.storage_options, cache_dir=str(tmp_path / "c"))
    assert (Path(fetched).parent / "config.json").read_text() == (local / "config.json").read_text()
    assert FlexTok.config_of(fetched) == FlexTok.config_of(local)
    assert FlexTok.config_of(fetched).vae.scaling_factor == 0.5
    # the config is part of what is cached: a changed one is a new download, not the old copy
    config["vae"]["scaling_factor"] = 0.25
    fs.pipe_file(f"{bucket}/flextok_tiny/config.json", json.dumps(config).encode())
    again = fetch_checkpoint(f"s3://{bucket}/flextok_tiny/model.safetensors", s3_server.storage_options,
                             cache_dir=str(tmp_path / "c"))
    assert again != fetched and FlexTok.config_of(again).vae.scaling_factor == 0.25


def test_a_node_hashes_a_fetched_checkpoint_once_however_many_actors_load_it(s3_server, remote_model,
                                                                             tiny_checkpoint, monkeypatch, tmp_path):
    """Each actor checks its node's copy against the driver's sha256; the whole file is hashed once
    per copy (d18_d28: 10 GB per pass), not once in the cache and again in from_pretrained per actor."""
    import flextok.checkpoint
    import flextok.tokenizer
    from pipelines.model import load_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    hashed = []
    real = flextok.checkpoint.file_sha256
    for module in (flextok.checkpoint, flextok.tokenizer):  # the cache's check, and from_pretrained's
        monkeypatch.setattr(module, "file_sha256", lambda p: (hashed.append(str(p)), real(p))[1])
    url, sha = f"s3://{remote_model}/tok/model.safetensors", file_sha256(tiny_checkpoint)
    models = [load_model(url, "cpu", storage_options=s3_server.storage_options, sha256=sha, encoder_only=True)
              for _ in range(3)]
    assert len(hashed) == 1 and all(m.checkpoint_sha256 == sha for m in models)
    # A copy changed in place (same path, other bytes) is hashed again and refused, then fetched anew.
    local = Path(hashed[0])
    local.write_bytes(local.read_bytes()[:-1] + b"!")
    load_model(url, "cpu", storage_options=s3_server.storage_options, sha256=sha, encoder_only=True)
    assert len(hashed) == 3 and file_sha256(local) == sha
