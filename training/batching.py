"""Token-budget batches: which rows of a window of the row stream go into which micro-batch.

Owns the batchers that turn a window of variable-length token rows into micro-batches that each
fill a token budget (positions the transformer computes) rather than a row count, what a
micro-batch costs (its real positions and the padding around them), and the stream of such
micro-batches over a worker's row stream with its exact position. The plans are pure functions over
sequence costs; no Ray, no models. Does not own the row stream itself nor its order
(`training.data`), nor the packed forward pass (`flextok.packing`, `Generator.forward_packed`).

Three ways to spend a budget of N positions per micro-batch:

    packed     first-fit decreasing of the window's sequences into rows of S positions (`--pack-length`,
               at least the longest sequence), the packed rows shuffled (seeded) and cut into
               micro-batches of N // S rows: every micro-batch has the same shape (R, S); attention never
               crosses a sequence boundary and positions restart per sequence (`Generator.forward_packed`).
    bucketed   the window's rows sorted by length and cut greedily so that rows x longest <= N, the
               micro-batches shuffled (seeded): little padding, no mask, but each micro-batch holds
               sequences of one length band. The default: the fastest on CPU at the adaptive lengths
               (BENCHMARKS.md).
    padded     the rows in stream order, cut greedily so that rows x longest <= N: the baseline.

A sequence of n tokens costs L - 1 + n positions (L condition slots; the last token is never an
input), plus one with an end-of-sequence target when n < K (`sequence_cost`).

Windows make resume exact and cheap: a window is the rows taken from the row stream until they hold
WINDOW_BATCHES budgets of positions, and it is planned on its own; so the data position is (the row
stream's position before the window, micro-batches of the window already taken), and a resumed run
takes the same window again, replans it with the same seed and skips the micro-batches it has done.
Each window's last micro-batch may be less full (its padding is counted like any other).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flextok.packing import PackPlan, plan_packing

BATCHINGS = ("packed", "bucketed", "padded")
WINDOW_BATCHES = 16  # a window holds rows for about this many full micro-batches


def sequence_cost(num_tokens, *, prefix_len: int, max_tokens: int, use_eos: bool):
    """Positions the transformer computes for a sequence of `num_tokens` tokens (an int, or an array of
    them; see module docstring)."""
    return prefix_len - 1 + num_tokens + (num_tokens < max_tokens) * int(use_eos)


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


# The stream of micro-batches -------------------------------------------------------------------
class Rows(Protocol):
    """A worker's row stream (`training.data.RowStream`): `take(n)` consumes the next n rows (an epoch's
    last rows that do not make n are dropped); `position` is where it stands, as a list of ints."""

    def take(self, num_rows: int) -> pa.Table: ...
    @property
    def position(self) -> Any: ...


@dataclass(frozen=True)
class BudgetPosition:
    """Where a stream of budget micro-batches stands: the row stream's position before the current
    window, and the micro-batches of that window taken."""

    window_start: tuple[int, ...]
    taken: int

    def to_list(self) -> list[int]:
        return [*self.window_start, self.taken]


def _as_list(position: Any) -> list[int]:
    return list(position.to_list()) if hasattr(position, "to_list") else list(position)


def window_seed(seed: int, position: Sequence[int]) -> int:
    """The seed of a window's plan: from --seed and where the window starts in the row stream."""
    return zlib.crc32(np.asarray([seed, *position], dtype=np.int64).tobytes())


def budget_batches(
    rows: Rows, collate: Callable[[pa.Table], dict[str, Any]], cost: Callable[[np.ndarray], np.ndarray], *,
    budget: int, batching: str, row_length: int, seed: int, skip: int = 0,
) -> Iterator[tuple[dict[str, Any], BudgetPosition]]:
    """(micro-batch, position after it) pairs, endlessly: windows of the row stream cut by `plan_window`.

    A micro-batch is `collate` of its rows plus "budget_batch" (its `BudgetBatch`, whose plan packs it).
    The position is the row stream's position before the window plus the micro-batches of the window
    taken so far: a resumed stream starts the row stream at the first part and passes the last as `skip`.
    `cost` maps token counts (n,) to positions per sequence (`sequence_cost`).
    """
    chunk = max(1, budget // row_length)  # rows taken at a time; fewer are lost at an epoch's end
    while True:
        start = _as_list(rows.position)
        parts, positions = [], 0
        while positions < WINDOW_BATCHES * budget:
            part = rows.take(chunk)
            parts.append(part)
            positions += int(cost(_lengths(part)).sum())
        window = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        costs = cost(_lengths(window))
        plans = plan_window(costs.tolist(), budget=budget, batching=batching, row_length=row_length,
                            seed=window_seed(seed, start))
        for k in range(skip, len(plans)):
            batch = collate(window.take(pa.array(plans[k].rows)))
            batch["budget_batch"] = plans[k]
            yield batch, BudgetPosition(tuple(start), k + 1)
        skip = 0


def _lengths(table: pa.Table) -> np.ndarray:
    return pc.list_value_length(table.column("tokens")).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
