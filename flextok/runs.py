"""Run folders as the models see them: where a run's model is, and which tokenizer speaks which tokens.

Owns the one answer to "the newest model of a run" for every reader (local folders here; remote ones
through `pipelines.storage`, the training jobs through `training.runs`) and to "does this tokenizer
emit the tokens of that checkpoint". Needs no fsspec: a reader passes how to list and test names.

    RUN/model.safetensors                      the final model of a finished run
    RUN/checkpoint_<step>/model.safetensors    the EMA model of each checkpoint (zero-padded step)
    RUN/checkpoint_<step>/_COMPLETE            written last, once every worker's files are uploaded
    RUN/_MARKED                                the run marks its complete checkpoints (from its start)

Checkpoints are uploaded while training goes on, so a checkpoint folder may be partly there: a reader
takes only folders with the completion marker. Runs written before markers existed (no `_MARKED`, no
folder with a marker) wrote each checkpoint whole before training went on: all their folders count.

Does not own writing run folders (`training.runs`) or reading weights (`flextok.checkpoint`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

MODEL_FILE = "model.safetensors"
CHECKPOINT_PREFIX = "checkpoint_"
COMPLETE_FILE = "_COMPLETE"
MARKED_RUN_FILE = "_MARKED"


def checkpoint_dir_name(step: int) -> str:
    """`checkpoint_<step>`, zero-padded so that names sort by step."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a `checkpoint_<step>` folder name (any padding), else None."""
    digits = name[len(CHECKPOINT_PREFIX):] if name.startswith(CHECKPOINT_PREFIX) else ""
    return int(digits) if digits.isdigit() else None


def checkpoint_steps(names: Iterable[str]) -> list[int]:
    """Steps of the `checkpoint_<step>` names among a run folder's entries, oldest first."""
    return sorted(step for step in map(checkpoint_step, names) if step is not None)


def complete_checkpoints(names: Iterable[str], exists: Callable[[str], bool]) -> list[tuple[int, str]]:
    """(step, folder name) of RUN's complete checkpoints, oldest first (see the module docstring)."""
    folders = sorted((step, name) for name in names if (step := checkpoint_step(name)) is not None)
    marked = [(step, name) for step, name in folders if exists(f"{name}/{COMPLETE_FILE}")]
    return marked if marked or exists(MARKED_RUN_FILE) else folders


def newest_model(names: Iterable[str], exists: Callable[[str], bool]) -> str | None:
    """A run's model relative to RUN, or None: `model.safetensors` when finished, else the newest
    complete checkpoint's EMA. `names`: RUN's entries; `exists(rel)`: whether RUN/rel is there."""
    if exists(MODEL_FILE):
        return MODEL_FILE
    for _, name in reversed(complete_checkpoints(names, exists)):
        rel = f"{name}/{MODEL_FILE}"
        if exists(rel):
            return rel
    return None


def newest_local_model(run: str | os.PathLike) -> Path | None:
    """A local run folder's model (see `newest_model`), or None when it holds none."""
    run = Path(run)
    if not run.is_dir():
        return None
    rel = newest_model((p.name for p in run.iterdir()), lambda name: (run / name).is_file())
    return run / rel if rel is not None else None


def speaks_tokens_of(tokenizer: str | os.PathLike | None, sha256: str | None) -> bool:
    """Whether the tokenizer checkpoint `tokenizer` emits the tokens of the checkpoint with `sha256`:
    it is that checkpoint, or a decoder-only fine-tune recording it (`same_tokens_as_sha256`). An
    unreadable or missing file speaks nothing."""
    from flextok.checkpoint import same_tokens_shas

    if not tokenizer or not sha256:
        return False
    try:
        return sha256 in same_tokens_shas(Path(tokenizer).expanduser())
    except (OSError, ValueError):
        return False
