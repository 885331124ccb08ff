"""No credential or URL signature of an input URL reaches any output file, column or log line.

The corpus is served over HTTP on 127.0.0.1 and read through a URL carrying `user:password@` and a
presigned-style query (the server ignores both); every file the run leaves is then searched for the
secrets: JSON as text, Parquet through every string column and its key-value metadata.
"""

from __future__ import annotations

import functools
import http.server
import threading

import pyarrow.parquet as pq
import pytest
from pipeline_helpers import jpeg_bytes, write_tar

from pipelines.storage import redact_text, redact_url
from pipelines.tokenize import TokenizeConfig, run_tokenize

PASSWORD = "hunter2-pw-7f3a"
SIGNATURE = "sig9c1e5d"


def test_redact_url_drops_user_info_and_signing_parameters():
    assert redact_url("s3://key:secret@bucket/path") == "s3://bucket/path"
    assert redact_url("https://u:p@host:8080/x?y=1") == "https://host:8080/x?y=1"
    assert redact_url("http://user@h/x") == "http://h/x"
    assert redact_url("/plain/path") == "/plain/path"
    assert redact_url("http://h/a.tar?page=2") == "http://h/a.tar?page=2"
    signed = redact_url("https://b.s3.amazonaws.com/a.tar?X-Amz-Expires=60&X-Amz-Signature=ab12&X-Amz-Security-Token=zz")
    assert signed == "https://b.s3.amazonaws.com/a.tar?X-Amz-Expires=60&X-Amz-Signature=***&X-Amz-Security-Token=***"
    assert redact_url("https://acct.blob.core.windows.net/c/a.tar?sv=2020&sig=abc") == (
        "https://acct.blob.core.windows.net/c/a.tar?sv=2020&sig=***")


def test_redact_text_finds_urls_inside_messages():
    text = "ClientResponseError: 403, url='http://u:pw@h:9/x.tar?sig=S', then (s3://k:s@b/y)."
    assert redact_text(text) == "ClientResponseError: 403, url='http://h:9/x.tar?sig=***', then (s3://b/y)."


@pytest.fixture()
def http_corpus(tmp_path, real_images):
    """Two WebDataset shards (one with a sample that fails to decode) and a missing third, over HTTP."""
    root = tmp_path / "served"
    root.mkdir()
    for n in range(2):
        members = [m for i in range(3) for m in ((f"s{n}{i}.jpg", jpeg_bytes(real_images, i)),
                                                  (f"s{n}{i}.cls", str(i).encode()))]
        if n == 1:
            members.append(("broken.jpg", b"\xff\xd8 not really a jpeg"))
        write_tar(root / f"shard-{n:06d}.tar", members)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address
    yield f"http://reader:{PASSWORD}@{host}:{port}/shard-{{000000..000002}}.tar?X-Amz-Signature={SIGNATURE}"
    server.shutdown()


def _strings_of(path) -> str:
    """Everything a reader of this file can see, as text."""
    if path.suffix != ".parquet":
        return path.read_bytes().decode("utf-8", errors="replace")
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return repr(table.to_pylist()) + repr(meta)


@pytest.mark.slow
def test_no_secret_of_an_input_url_in_any_output(http_corpus, tiny_checkpoint, ray_local, tmp_path, caplog):
    out = tmp_path / "dst"
    result = run_tokenize(TokenizeConfig(input=http_corpus, output=str(out), model=str(tiny_checkpoint), batch_size=8))
    counts = result.manifest["counts"]
    assert (counts["inputs"], counts["rows"], counts["errors"]) == (8, 6, 2)  # 6 photos, 1 broken, 1 missing shard
    files = [p for p in out.rglob("*") if p.is_file()]
    kinds = {p.relative_to(out).parts[0] for p in files}
    assert {"_manifest.json", "_errors", "_state"} <= kinds and any(p.name.startswith("part-") for p in files)
    sources = set()
    for path in files:
        text = _strings_of(path)
        assert PASSWORD not in text and SIGNATURE not in text, f"secret in {path.relative_to(out)}"
        if path.suffix == ".parquet":
            sources |= set(pq.read_table(path).column("source").to_pylist())
    assert sources and all("reader" not in s and "X-Amz-Signature=***" in s for s in sources), sources
    assert PASSWORD not in result.summary() and SIGNATURE not in caplog.text
