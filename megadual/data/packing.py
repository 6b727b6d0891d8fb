"""Packing sequence lengths into fixed-length rows with as few rows as possible.

Legend: N items, C row capacity (seq_len), g a row's free space, k items in a row.

The padding of a window is (rows x C - sum of lengths), so only the number of rows matters.
Image sequences are long and nearly equal (729 visual positions plus a caption and a few
special tokens), which makes the row count mostly a question of *how many items a row holds*:
at C = 8192 a row holds 10 of them, or 11 if they are short enough. Two constructions are run
and the one with fewer rows is kept (ties go to the first):

* greedy (`_greedy_rows`): a row takes waiting items in window order while they fit, then the
  longest item that still fits, then *exchanges* a row item a for a waiting item b with
  0 < b - a <= g. Good when lengths vary widely, since some item always closes a gap.
* cardinality-first (`_cardinality_rows`): k is the most items one row can hold (the k
  shortest fit); as many rows of exactly k items as possible are formed from the shortest
  items (largest first into the least-loaded row, so loads stay even), their slack is then
  given to longer waiting items by the same exchange, and the rest is packed the same way
  with its own k. Good when lengths are nearly equal, where greedy rows settle on k - 1 items
  and leave about half an item of padding in each.

`min_rows` is a lower bound on the row count of any packing (benchmarks report it, so a gap
to the target can be told apart from a gap to what is possible at all).
"""

from __future__ import annotations

import heapq
from bisect import bisect_right, insort
from typing import Optional

_MAX_SWAPS = 4  # exchanges per row; each needs a waiting item of about the right extra length


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group item indices into rows of at most `capacity` total length, using few rows.

    Args:
        lengths: N item lengths, each in [1, capacity].
        capacity: C, the row length.

    Returns:
        Rows as lists of item indices; every index appears exactly once. Deterministic:
        ties between equal lengths go to the lower index.

    Raises:
        ValueError: an item longer than `capacity` or not positive.
    """
    for i, n in enumerate(lengths):
        if not 1 <= n <= capacity:
            raise ValueError(f"item {i} has length {n}; lengths must lie in [1, capacity={capacity}]")
    if not lengths:
        return []
    greedy = _greedy_rows(lengths, capacity)
    if len(greedy) <= min_rows(lengths, capacity):
        return greedy  # already optimal: skip the second construction
    by_count = _cardinality_rows(lengths, capacity)
    return greedy if len(greedy) <= len(by_count) else by_count


def min_rows(lengths: list[int], capacity: int) -> int:
    """A lower bound on the rows any packing of `lengths` into `capacity` needs.

    The larger of two bounds: total length / C, and a count bound. If at most k items fit a
    row (the k shortest already fill it), a packing with m rows of k items leaves the other
    N - m k items to rows of at most k - 1; and m is at most the largest m whose m k shortest
    items fit m rows by total length.
    """
    if not lengths:
        return 0
    total = sum(lengths)
    by_length = -(-total // capacity)
    ascending = sorted(lengths)
    prefix = [0]
    for n in ascending:
        prefix.append(prefix[-1] + n)
    k = bisect_right(prefix, capacity) - 1  # most items one row can hold
    if k >= len(lengths):
        return max(by_length, 1)
    if k == 1:
        return max(by_length, len(lengths))
    m = 0  # rows of k items: at most those whose m*k shortest items fit m rows by total length
    while (m + 1) * k <= len(lengths) and prefix[(m + 1) * k] <= (m + 1) * capacity:
        m += 1
    by_count = m + -(-(len(lengths) - m * k) // (k - 1))
    return max(by_length, by_count)


# --------------------------------------------------------------------------- exchanges


def _best_swap(row: list[tuple[int, int]], space: int, pool: list[tuple[int, int]]) -> Optional[tuple[int, int, int]]:
    """The exchange that fills a row's gap most: (gain, row slot, pool index), or None.

    `row` and `pool` hold (length, index); `pool` is sorted. A row item a can give way to a
    pooled item b with a < b <= a + space; the largest b - a wins (ties: first row slot).
    """
    best = None
    for j, (a, _) in enumerate(row):
        k = bisect_right(pool, (a + space, float("inf"))) - 1  # the longest b <= a + g
        if k >= 0 and pool[k][0] > a and (best is None or pool[k][0] - a > best[0]):
            best = (pool[k][0] - a, j, k)
    return best


def _fill_by_swaps(row: list[tuple[int, int]], space: int, pool: list[tuple[int, int]]) -> tuple[int, list[tuple[int, int]]]:
    """Apply up to _MAX_SWAPS best exchanges to `row` (in place); returns (space left, items put back)."""
    returned = []
    for _ in range(_MAX_SWAPS):
        if space == 0 or not pool:
            break
        best = _best_swap(row, space, pool)
        if best is None:
            break
        gain, j, k = best
        row[j], out = pool.pop(k), row[j]
        insort(pool, out)
        returned.append(out)
        space -= gain
    return space, returned


# --------------------------------------------------------------------------- greedy


def _greedy_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Window order while it fits, then the longest that fits, then exchanges (module docstring)."""
    pool = sorted((n, i) for i, n in enumerate(lengths))  # ascending (length, index)
    taken = [False] * len(lengths)
    oldest = 0  # window order: the first index not yet placed is >= oldest
    rows: list[list[int]] = []

    def take(k: int) -> tuple[int, int]:
        item = pool.pop(k)
        taken[item[1]] = True
        return item

    while pool:
        row: list[tuple[int, int]] = []
        space = capacity
        while True:  # window order, while it fits
            while oldest < len(lengths) and taken[oldest]:
                oldest += 1
            if oldest == len(lengths) or lengths[oldest] > space:
                break
            row.append(take(bisect_right(pool, (lengths[oldest], oldest)) - 1))
            space -= row[-1][0]
        while True:  # then the best fit for the space left
            k = bisect_right(pool, (space, len(lengths))) - 1  # the longest item <= space
            if k < 0:
                break
            row.append(take(k))
            space -= row[-1][0]
        space, returned = _fill_by_swaps(row, space, pool)
        for _, i in returned:  # back in the pool (unless swapped in again below)
            taken[i] = False
            oldest = min(oldest, i)
        for _, i in row:
            taken[i] = True
        rows.append([i for _, i in row])
    return rows


# --------------------------------------------------------------------------- cardinality-first


def _rows_of_k(items: list[tuple[int, int]], m: int, k: int, capacity: int) -> Optional[list[list[tuple[int, int]]]]:
    """Split `items` (m*k of them, ascending) into m rows of exactly k, or None if a row overflows.

    Longest first, each to the least-loaded row that is not full: loads end up nearly equal,
    so the split succeeds whenever the average load is a little under `capacity`.
    """
    heap = [(0, r) for r in range(m)]
    rows: list[list[tuple[int, int]]] = [[] for _ in range(m)]
    for item in reversed(items):
        load, r = heapq.heappop(heap)
        load += item[0]
        if load > capacity:
            return None
        rows[r].append(item)
        if len(rows[r]) < k:
            heapq.heappush(heap, (load, r))
    return rows


def _cardinality_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Most rows of k items from the shortest, exchanges into their slack, repeat on the rest."""
    rest = sorted((n, i) for i, n in enumerate(lengths))  # ascending (length, index)
    out: list[list[int]] = []
    while rest:
        k, used = 0, 0
        while k < len(rest) and used + rest[k][0] <= capacity:  # the k shortest fit one row
            used += rest[k][0]
            k += 1
        # The most rows of k (binary search; one row of the k shortest always fits).
        lo, hi, best = 1, len(rest) // k, None
        while lo <= hi:
            m = (lo + hi) // 2
            rows = _rows_of_k(rest[: m * k], m, k, capacity)
            if rows is not None:
                best, lo = rows, m + 1
            else:
                hi = m - 1
        assert best is not None
        rest = rest[len(best) * k:]
        # Emptiest rows first take the longer waiting items that fit their slack.
        slack = sorted(range(len(best)), key=lambda r: (sum(n for n, _ in best[r]), r))
        for r in slack:
            _fill_by_swaps(best[r], capacity - sum(n for n, _ in best[r]), rest)
        out.extend([i for _, i in row] for row in best)
    return out
