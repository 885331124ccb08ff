"""The package layering of STYLE.md: flextok/ is pure PyTorch, jobs/ run nothing at import."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_FLEXTOK = {"ray", "pyarrow", "fsspec", "s3fs", "webdataset", "argparse", "pandas"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "flextok").rglob("*.py")), ids=lambda p: p.name)
def test_flextok_imports_no_ray_io_or_cli_libraries(path):
    assert not _imports(path) & FORBIDDEN_IN_FLEXTOK


@pytest.mark.parametrize("path", sorted((ROOT / "flextok").rglob("*.py")), ids=lambda p: p.name)
def test_flextok_prints_nothing(path):
    calls = [n for n in ast.walk(ast.parse(path.read_text()))
             if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
    assert not calls


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.py")), ids=lambda p: p.name)
def test_no_job_imports_another_job(path):
    allowed = {"jobs.cli_util", "jobs.train_flags", "jobs"}
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jobs"):
            assert node.module in allowed or path.name == "cli.py", f"{path.name} imports {node.module}"


def test_importing_every_job_module_runs_nothing():
    for path in sorted((ROOT / "jobs").glob("*.py")):
        module = importlib.import_module(f"jobs.{path.stem}")
        if path.stem not in ("__init__", "cli_util", "train_flags", "cli"):
            assert callable(getattr(module, "main", None)), f"jobs.{path.stem} has no main()"


def test_the_ray_stage_modules_of_reading_decoding_and_writing_load_no_torch():
    """Every Ray worker that runs a read, decode, write or finalize task imports its stage module; torch
    there costs ~2 s of CPU per worker process (measured: 171 -> 221 img/s on the 2-core pipeline)."""
    code = ("import sys, pipelines.sources, pipelines.decode, pipelines.writer, pipelines.schema, "
            "pipelines.storage, pipelines.retry, flextok.runs; print(sorted(m for m in sys.modules if m == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_flextok_top_level_names_load_on_first_use():
    import flextok

    for name in flextok.__all__:  # each exported name resolves to the object of its defining module
        value = getattr(flextok, name)
        if callable(value):
            assert value.__module__ == flextok._EXPORTS[name], name
    assert flextok.FlexTok is importlib.import_module("flextok.tokenizer").FlexTok
    assert set(flextok.__all__) <= set(dir(flextok))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        flextok.nope  # noqa: B018
