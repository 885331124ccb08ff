"""The newest checkpoint of a run (what a resumed run starts from). The training streams' row order is
tested in tests/training/test_data_stream.py."""

from pipelines.writer import OutputStore
from training.runs import latest_checkpoint_step


def test_the_newest_checkpoint_step(tmp_path):
    store = OutputStore(str(tmp_path))
    assert latest_checkpoint_step(store) == 0  # a fresh run
    for name in ("checkpoint_00000500", "checkpoint_00001500", "checkpoint_00001000"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")  # not a checkpoint
    assert latest_checkpoint_step(store) == 1500
    assert latest_checkpoint_step(OutputStore(str(tmp_path / "missing"))) == 0
