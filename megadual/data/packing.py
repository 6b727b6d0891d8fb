"""Packing sequence lengths into fixed-length rows: best fit over a buffer, plus a swap repair.

Legend: N items, C row capacity (seq_len), g a row's free space.

Rows are filled one at a time. A row first takes the oldest waiting items in arrival order
while they fit (so no item waits long and rows mix lengths), then repeatedly the longest
pooled item that still fits (the best fit for the space left). When nothing fits any more,
the row's gap g is shorter than every pooled item, so it can only shrink by *exchanging* a row
item a for a pooled item b with 0 < b - a <= g: the largest such gain is taken, a few times.
Image sequences are long and nearly equal (an image of 729 positions plus a caption), so
plain best-fit-decreasing leaves a gap of about half a caption in every row; the exchange
closes most of it, because caption lengths vary. The loader packs one window at a time, so
only the window's last rows are short.
"""

from __future__ import annotations

from bisect import bisect_right, insort

_MAX_SWAPS = 4  # per row; each swap needs a pooled item of exactly the right extra length


def best_fit_pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group item indices into rows of at most `capacity` total length.

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
    pool = sorted((n, i) for i, n in enumerate(lengths))  # ascending (length, index)
    taken = [False] * len(lengths)
    oldest = 0  # arrival order: the first index not yet placed is >= oldest
    rows: list[list[int]] = []

    def take(k: int) -> tuple[int, int]:
        item = pool.pop(k)
        taken[item[1]] = True
        return item

    while pool:
        row: list[tuple[int, int]] = []
        space = capacity
        while True:  # oldest first, while they fit
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
        for _ in range(_MAX_SWAPS):
            if space == 0 or not pool:
                break
            best = None  # (gain, row slot, pool index)
            for j, (a, _) in enumerate(row):
                k = bisect_right(pool, (a + space, len(lengths))) - 1  # longest b <= a + g
                if k >= 0 and pool[k][0] > a and (best is None or pool[k][0] - a > best[0]):
                    best = (pool[k][0] - a, j, k)
            if best is None:
                break
            gain, j, k = best
            row[j], out = take(k), row[j]
            insort(pool, out)
            taken[out[1]] = False
            oldest = min(oldest, out[1])
            space -= gain
        rows.append([i for _, i in row])
    return rows
