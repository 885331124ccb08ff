"""Reading a training run folder in tests."""

from __future__ import annotations


def scalars(run_dir, tag="train/loss"):
    """(file, step, value) of every `tag` event under RUN/tensorboard, file by file in time order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    files = sorted((run_dir / "tensorboard").iterdir(), key=lambda p: int(p.name.split(".")[3]))
    for i, path in enumerate(files):
        events = EventAccumulator(str(path))
        events.Reload()
        out += [(i, e.step, e.value) for e in events.Scalars(tag)]
    return out
