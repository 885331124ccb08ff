"""Token-budget batchers: by hand, and as properties (every row once, no micro-batch over budget)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.batching import BATCHINGS, plan_window, sequence_cost


def test_sequence_cost_by_hand():
    # class prefix (L = 1): n tokens are n - 1 inputs after the prefix slot; EOS adds one target
    assert sequence_cost(5, prefix_len=1, max_tokens=32, use_eos=False) == 5
    assert sequence_cost(5, prefix_len=1, max_tokens=32, use_eos=True) == 6
    assert sequence_cost(32, prefix_len=1, max_tokens=32, use_eos=True) == 32  # at the cap: no EOS
    assert sequence_cost(3, prefix_len=8, max_tokens=32, use_eos=True) == 11


def test_padded_and_bucketed_by_hand():
    costs = [2, 8, 2, 2, 8, 8]
    padded = plan_window(costs, budget=16, batching="padded", row_length=8, seed=0)
    # stream order: [2, 8] -> 2 x 8 = 16; [2, 2, 8] would be 24 -> [2, 2] then [8, 8]
    assert [b.rows for b in padded] == [[0, 1], [2, 3], [4, 5]]
    assert [(b.positions, b.real) for b in padded] == [(16, 10), (4, 4), (16, 16)]
    bucketed = plan_window(costs, budget=16, batching="bucketed", row_length=8, seed=0)
    assert sorted(sorted(b.rows) for b in bucketed) == [[0, 2, 3], [1, 4], [5]]
    assert sum(b.positions - b.real for b in bucketed) == 0  # one length per micro-batch: no padding


def test_packed_by_hand():
    batches = plan_window([5, 3, 4, 2, 8], budget=16, batching="packed", row_length=8, seed=0)
    # FFD rows: [8], [5, 3], [4, 2]; two rows of 8 per micro-batch -> 2 micro-batches, 3 rows in all
    assert sorted(b.plan.num_rows for b in batches) == [1, 2]
    assert all(b.positions == 8 * b.plan.num_rows for b in batches)
    assert sum(b.real for b in batches) == 22
    doc_rows = sorted(tuple(sorted(b.rows[i] for i in range(len(b.rows)) if b.plan.row[i] == r))
                      for b in batches for r in range(b.plan.num_rows))
    assert doc_rows == [(0, 1), (2, 3), (4,)]


def test_a_sequence_longer_than_a_row_is_refused():
    for batching in BATCHINGS:
        with pytest.raises(ValueError, match="9 positions does not fit"):
            plan_window([3, 9], budget=32, batching=batching, row_length=8, seed=0)
    with pytest.raises(ValueError, match="raise --token-budget"):
        plan_window([3], budget=7, batching="packed", row_length=8, seed=0)


@settings(max_examples=120, deadline=None)
@given(costs=st.lists(st.integers(1, 33), min_size=1, max_size=200), extra=st.integers(0, 100),
       batching=st.sampled_from(BATCHINGS), seed=st.integers(0, 3))
def test_every_row_once_and_no_micro_batch_over_budget(costs, extra, batching, seed):
    row_length = 33
    budget = row_length + extra
    batches = plan_window(costs, budget=budget, batching=batching, row_length=row_length, seed=seed)
    seen = sorted(i for b in batches for i in b.rows)
    assert seen == list(range(len(costs)))  # every row exactly once
    for b in batches:
        assert b.rows and b.positions <= budget
        assert b.real == sum(costs[i] for i in b.rows) <= b.positions
        if batching == "packed":
            assert b.plan.lengths == [costs[i] for i in b.rows] and b.plan.num_rows <= budget // row_length
            used = [[False] * row_length for _ in range(b.plan.num_rows)]
            for r, o, n in zip(b.plan.row, b.plan.offset, b.plan.lengths):
                assert o + n <= row_length
                assert not any(used[r][o:o + n])  # no two sequences share a position
                used[r][o:o + n] = [True] * n
        else:
            assert b.positions == len(b.rows) * max(costs[i] for i in b.rows)
    again = plan_window(costs, budget=budget, batching=batching, row_length=row_length, seed=seed)
    assert [b.rows for b in again] == [b.rows for b in batches]  # replanning is exact (resume)


def test_packing_wastes_less_than_padding_on_adaptive_lengths():
    """Power-of-two lengths 1..32 as the adaptive Fashion-MNIST tokens have (mean ~12)."""
    import random

    rng = random.Random(0)
    costs = [rng.choice([2, 3, 5, 9, 17, 32]) for _ in range(2048)]

    def waste(batching):
        batches = plan_window(costs, budget=1024, batching=batching, row_length=32, seed=0)
        return 1 - sum(b.real for b in batches) / sum(b.positions for b in batches)

    assert waste("packed") < 0.05 < 0.3 < waste("padded")


# The stream and the training step -------------------------------------------------------------
class ListRows:
    """A row stream over an in-memory table, cycled (`training.batching.Rows`)."""

    def __init__(self, table, start: int = 0) -> None:
        self.table, self.next = table, start

    @property
    def position(self) -> list[int]:
        return [self.next]

    def take(self, n: int):
        import pyarrow as pa

        rows = [(self.next + k) % self.table.num_rows for k in range(n)]
        self.next += n
        return self.table.take(pa.array(rows))


def _token_table(num_rows: int = 120, seed: int = 0):
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    lengths = rng.choice([1, 2, 4, 8, 16, 32], size=num_rows)  # adaptive power-of-two prefixes
    return pa.table({"tokens": pa.array([rng.integers(0, 1000, n).tolist() for n in lengths], pa.list_(pa.uint16())),
                     "label": pa.array(rng.integers(0, 10, num_rows), pa.int32())})


def _task(**changes):
    from flextok.gpt import GPTConfig
    from training.tasks import GeneratorTask

    config = GPTConfig.from_preset("tiny", depth=1, dim=32, num_heads=2, use_eos=True, cond_dropout_prob=0.0)
    return GeneratorTask(config=config.replace(**changes), tokenizer_id="t", tokenizer_sha256=None)


def _stream(table, task, batching, start=0, skip=0, budget=256):
    from training.batching import budget_batches

    return budget_batches(ListRows(table, start), task.collate_fn(), task.sequence_costs, budget=budget,
                          batching=batching, row_length=task.row_length, seed=7, skip=skip)


@pytest.mark.parametrize("batching", BATCHINGS)
def test_a_budget_micro_batch_trains_on_the_loss_of_its_rows(batching):
    """Through the task's hooks: the loss of a packed / bucketed / padded micro-batch is the padded
    forward's mean over exactly its rows, and its positions count what the model computes."""
    import torch

    task = _task()
    torch.manual_seed(0)
    model = task.build_model("cpu").eval()
    stream = _stream(_token_table(), task, batching)
    for _ in range(3):
        batch, _ = next(stream)
        prepared = task.prepare_batch(batch, torch.device("cpu"))
        with torch.no_grad():
            got = task.loss(model, prepared, None)
            want = model(prepared["tokens"], prepared["label"])
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        lengths = batch["lengths"]
        computed, real = task.positions(prepared)
        assert real == int(lengths.sum() + (lengths < 32).sum())  # class prefix: n positions + EOS
        assert real <= computed <= 256
        if batching == "packed":
            assert computed == batch["budget_batch"].plan.num_rows * 32


def test_resumed_stream_continues_with_the_same_micro_batches():
    import torch

    task, table = _task(), _token_table()
    stream = _stream(table, task, "packed")
    seen = [next(stream) for _ in range(30)]  # crosses a window boundary
    assert len({p.window_start for _, p in seen}) > 1
    for cut in (0, 4, 17):
        (start,), taken = seen[cut][1].window_start, seen[cut][1].taken
        resumed = _stream(table, task, "packed", start=start, skip=taken)
        for batch, position in seen[cut + 1:cut + 6]:
            again, again_position = next(resumed)
            assert again_position == position
            assert torch.equal(again["tokens"], batch["tokens"]) and torch.equal(again["label"], batch["label"])


def test_steps_weigh_every_loss_target_alike():
    """Two micro-batches holding different numbers of tokens make the update of one batch of all
    their rows (equal weights per micro-batch would not)."""
    import torch

    from training.settings import TrainConfig
    from training.trainer import Trainer

    task = _task()
    stream = _stream(_token_table(), task, "padded", budget=512)
    micro = [task.prepare_batch(next(stream)[0], torch.device("cpu")) for _ in range(2)]
    assert micro[0]["num_targets"] != micro[1]["num_targets"]
    rows = torch.nn.utils.rnn.pad_sequence(
        [r[r >= 0] for m in micro for r in m["tokens"]], batch_first=True, padding_value=-100)
    labels = torch.cat([m["label"] for m in micro])
    whole = {"tokens": rows, "cond": labels, "label": labels}
    cfg = TrainConfig(max_steps=4, warmup_steps=1, lr=1e-2, seed=1)
    one, two = Trainer(task, cfg, torch.device("cpu")), Trainer(task, cfg.replace(grad_accum=2), torch.device("cpu"))
    loss_one, norm_one, _ = one.train_step(whole)
    loss_two, norm_two, _ = two.train_step(*micro)
    torch.testing.assert_close(loss_two, loss_one)
    torch.testing.assert_close(norm_two, norm_one)
    for (name, a), b in zip(one.model.named_parameters(), two.model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7, msg=name)  # Adam would amplify ~0 grads
