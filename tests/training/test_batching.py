"""Token-budget batchers: by hand, and as properties (every row once, no micro-batch over budget)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.batching import BATCHINGS, plan_window, sequence_cost, window_rows


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
    costs = [rng.choice([2, 3, 5, 9, 17, 32]) for _ in range(window_rows(1024, 32))]

    def waste(batching):
        batches = plan_window(costs, budget=1024, batching=batching, row_length=32, seed=0)
        return 1 - sum(b.real for b in batches) / sum(b.positions for b in batches)

    assert waste("packed") < 0.05 < 0.3 < waste("padded")
