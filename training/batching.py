"""Token-budget batches: which rows of a window of the row stream go into which micro-batch.

Owns the batchers that turn a window of variable-length token rows into micro-batches that each
fill a token budget (positions the transformer computes) rather than a row count, and what a
micro-batch costs: its real positions and the padding around them. Pure functions over sequence
costs; no Ray, no Arrow, no models. Does not own the row stream itself nor its order
(`training.data`), nor the packed forward pass (`flextok.packing`, `Generator.forward_packed`).

Three ways to spend a budget of N positions per micro-batch:

    packed     first-fit decreasing of the window's sequences into rows of S positions (the longest
               sequence a generator sees), the packed rows shuffled (seeded) and cut into micro-batches
               of N // S rows: every micro-batch has the same shape (R, S); attention never crosses a
               sequence boundary and positions restart per sequence (`Generator.forward_packed`).
    bucketed   the window's rows sorted by length and cut greedily so that rows x longest <= N, the
               micro-batches shuffled (seeded): little padding, no mask, but each micro-batch holds
               sequences of one length band.
    padded     the rows in stream order, cut greedily so that rows x longest <= N: the baseline.

A sequence of n tokens costs L - 1 + n positions (L condition slots; the last token is never an
input), plus one with an end-of-sequence target when n < K (`sequence_cost`).

Windows make resume exact and cheap: every window is planned on its own, so the data position is
(rows before the window, micro-batches of the window already taken), and a resumed run replans the
window from the same rows and seed and skips the micro-batches it has done. Each window's last
micro-batch may be less full (its padding is counted like any other).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from flextok.packing import PackPlan, plan_packing

BATCHINGS = ("packed", "bucketed", "padded")
WINDOW_BATCHES = 64  # a window holds enough rows for this many micro-batches of full-length sequences


def sequence_cost(num_tokens: int, *, prefix_len: int, max_tokens: int, use_eos: bool) -> int:
    """Positions the transformer computes for one sequence of `num_tokens` tokens (see module docstring)."""
    return prefix_len - 1 + num_tokens + int(use_eos and num_tokens < max_tokens)


@dataclass(frozen=True)
class BudgetBatch:
    """One micro-batch of a window: `rows` index the window; `plan` (packed only) says where each sits.

    `plan.lengths[i]` is the cost of `rows[i]`; the plan's rows are numbered from 0 in this micro-batch.
    """

    rows: list[int]
    positions: int  # positions the transformer computes: R x S packed, rows x longest padded
    real: int  # positions that belong to a sequence
    plan: PackPlan | None = None

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real / self.positions


def window_rows(budget: int, row_length: int) -> int:
    """Rows per window: enough for WINDOW_BATCHES micro-batches if every sequence were full-length."""
    return WINDOW_BATCHES * max(1, budget // row_length)


def check_budget(budget: int, row_length: int) -> None:
    """ValueError unless a budget holds the longest sequence (packed rows are `row_length` long)."""
    if budget < row_length:
        raise ValueError(f"a token budget of {budget} positions cannot hold the longest sequence "
                         f"({row_length} positions: condition + K tokens); raise --token-budget to >= {row_length}")


def plan_window(costs: Sequence[int], *, budget: int, batching: str, row_length: int, seed: int) -> list[BudgetBatch]:
    """Cut one window of sequences (their costs, in stream order) into micro-batches of <= `budget` positions.

    Every sequence lands in exactly one micro-batch. A sequence longer than `row_length` (packed) or
    than `budget` is a ValueError: it fits no micro-batch. `seed` shuffles packed rows / bucketed
    micro-batches (the same seed replans the same micro-batches: exact resume).
    """
    if batching not in BATCHINGS:
        raise ValueError(f"batching must be one of {', '.join(BATCHINGS)}, got {batching!r}")
    costs = [int(c) for c in costs]
    if not costs:
        return []
    check_budget(budget, row_length)
    longest = max(costs)
    if longest > row_length or min(costs) < 1:
        raise ValueError(f"a sequence of {longest if longest > row_length else min(costs)} positions does not fit "
                         f"rows of 1..{row_length} (condition + K tokens)")
    if batching == "packed":
        return _packed(costs, budget, row_length, seed)
    order = list(range(len(costs)))
    if batching == "bucketed":
        order.sort(key=lambda i: costs[i])  # stable: ties keep stream order
    batches = _greedy(order, costs, budget)
    if batching == "bucketed":
        random.Random(seed).shuffle(batches)
    return batches


def _greedy(order: list[int], costs: list[int], budget: int) -> list[BudgetBatch]:
    """Rows in `order`, a new micro-batch whenever rows x longest would exceed the budget."""
    batches: list[BudgetBatch] = []
    rows: list[int] = []
    widest = 0
    for i in order:
        if rows and (len(rows) + 1) * max(widest, costs[i]) > budget:
            batches.append(BudgetBatch(rows, len(rows) * widest, sum(costs[j] for j in rows)))
            rows, widest = [], 0
        rows.append(i)
        widest = max(widest, costs[i])
    batches.append(BudgetBatch(rows, len(rows) * widest, sum(costs[j] for j in rows)))
    return batches


def _packed(costs: list[int], budget: int, row_length: int, seed: int) -> list[BudgetBatch]:
    plan = plan_packing(costs, row_length)
    members: list[list[int]] = [[] for _ in range(plan.num_rows)]
    for i in sorted(range(len(costs)), key=lambda j: (plan.row[j], plan.offset[j])):
        members[plan.row[i]].append(i)
    packed_rows = list(range(plan.num_rows))
    random.Random(seed).shuffle(packed_rows)  # FFD fills rows longest-first: mix them across micro-batches
    per_batch = budget // row_length
    batches = []
    for start in range(0, len(packed_rows), per_batch):
        chosen = packed_rows[start:start + per_batch]
        rows = [i for r in chosen for i in members[r]]
        local = {r: k for k, r in enumerate(chosen)}
        sub = PackPlan(row=[local[plan.row[i]] for i in rows], offset=[plan.offset[i] for i in rows],
                       lengths=[costs[i] for i in rows], num_rows=len(chosen), row_length=row_length)
        batches.append(BudgetBatch(rows, len(chosen) * row_length, sum(sub.lengths), sub))
    return batches
