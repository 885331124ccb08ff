"""`flextok export`: fp16 checkpoints that load back in fp32, keep their metadata, and refuse bad calls."""

import json

import pytest
import torch

from flextok import FlexTok
from flextok.checkpoint import SAME_TOKENS_KEY, file_sha256, load_checkpoint, read_metadata
from jobs.export import main


def _tiny():
    torch.manual_seed(0)
    return FlexTok.from_preset("tiny", encoder_dim=32, decoder_dim=32, encoder_depth=1, decoder_depth=1, head_dim=16)


def test_fp16_export_halves_the_file_and_loads_as_fp32(tmp_path, capsys):
    model = _tiny()
    src = model.save_pretrained(tmp_path / "run" / "model.safetensors", extra={"step": 7})
    out = tmp_path / "ship" / "tokenizer.safetensors"
    assert main([str(tmp_path / "run"), "--out", str(out)]) == 0  # a run folder: its model.safetensors
    assert "float16" in capsys.readouterr().out
    stored, _ = load_checkpoint(out, dtype=None)
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    assert out.stat().st_size < 0.6 * src.stat().st_size
    md, src_md = read_metadata(out), read_metadata(src)
    assert md["config"] == src_md["config"] and md["kind"] == "FlexTok" and json.loads(md["step"]) == 7
    assert md["exported_from_sha256"] == file_sha256(src)

    loaded = FlexTok.from_pretrained(out)
    assert loaded.checkpoint_sha256 == file_sha256(out)
    for name, param in loaded.state_dict().items():
        original = model.state_dict()[name]
        assert param.dtype == original.dtype  # computes in fp32
        if original.is_floating_point():
            assert torch.equal(param, original.half().float()), name  # exactly the fp16-rounded weights


def test_export_refuses_bad_calls_in_one_line(tmp_path, capsys):
    src = _tiny().save_pretrained(tmp_path / "model.safetensors")
    assert main([str(src), "--out", str(tmp_path / "x.bin")]) != 0
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "y.safetensors")]) != 0
    assert main([str(src), "--out", str(src)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("flextok export: error:") for line in err), err
    assert "Traceback" not in "".join(err)
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "y.safetensors").exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_other_dtypes(tmp_path, dtype):
    src = _tiny().save_pretrained(tmp_path / "model.safetensors")
    out = tmp_path / f"{dtype}.safetensors"
    assert main([str(src), "--out", str(out), "--dtype", dtype]) == 0
    stored, _ = load_checkpoint(out, dtype=None)
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {getattr(torch, dtype)}


def test_the_same_tokens_claim_survives_only_an_exact_cast(tmp_path):
    """fp16 export keeps `same_tokens_as_sha256` when the token-defining weights are fp16 numbers
    already (a decoder fine-tune of a shipped fp16 tokenizer), and drops it when the cast moves them."""
    model = _tiny()
    claim = {SAME_TOKENS_KEY: ["b" * 64]}
    src = model.save_pretrained(tmp_path / "fp32.safetensors", extra=claim)  # random fp32 weights
    assert main([str(src), "--out", str(tmp_path / "a.safetensors")]) == 0
    assert SAME_TOKENS_KEY not in read_metadata(tmp_path / "a.safetensors")
    with torch.no_grad():
        for name, t in model.state_dict().items():  # parameters and persistent buffers alike
            if not name.startswith("decoder.") and t.is_floating_point():
                t.copy_(t.half().float())
    src = model.save_pretrained(tmp_path / "rounded.safetensors", extra=claim)
    assert main([str(src), "--out", str(tmp_path / "b.safetensors")]) == 0
    assert json.loads(read_metadata(tmp_path / "b.safetensors")[SAME_TOKENS_KEY]) == ["b" * 64]
