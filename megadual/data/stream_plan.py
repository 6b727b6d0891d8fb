"""Which samples each loader stream reads in each epoch: a pure function of the seed.

Legend: S streams in total (data-parallel ranks x workers per rank), N shards.

A stream is one (rank, worker) pair: stream id `rank * workers_per_rank + worker`. In epoch e
the shards are permuted with (seed, e) -- or, in "resample" mode, drawn with replacement --
and split among the S streams:

* "shard": stream s takes shards s, s + S, ... of that order (needs N >= S);
* "sample": the epoch's samples are numbered in that shard order and stream s takes
  every S-th one starting at s (any N; every stream scans every shard's headers).

In "epochs" mode the streams' epoch-e plans therefore cover every sample exactly once.
A plan is a list of (shard index, positions in that shard) segments.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import accumulate


@dataclass(frozen=True)
class EpochPlan:
    """One stream's reading order for one epoch.

    `segments`: (shard index, range of sample positions in that shard), in reading order.
    """

    segments: tuple[tuple[int, range], ...]

    def __post_init__(self):
        object.__setattr__(self, "_ends", list(accumulate(len(r) for _, r in self.segments)))

    @property
    def num_samples(self) -> int:
        return self._ends[-1] if self._ends else 0

    def slice(self, start: int, stop: int) -> list[tuple[int, list[int]]]:
        """Segments covering this plan's samples [start, stop), as (shard, positions)."""
        out = []
        begin = 0
        for (shard, positions), end in zip(self.segments, self._ends):
            lo, hi = max(start, begin), min(stop, end)
            if lo < hi:
                out.append((shard, list(positions[lo - begin : hi - begin])))
            begin = end
            if begin >= stop:
                break
        return out


def shard_order(num_shards: int, seed: int, epoch: int, mode: str) -> list[int]:
    """The epoch's shard order, identical on every rank and worker."""
    rng = random.Random(f"megadual-shards:{seed}:{epoch}")
    if mode == "resample":
        return [rng.randrange(num_shards) for _ in range(num_shards)]
    if mode != "epochs":
        raise ValueError(f"mode must be 'epochs' or 'resample', got {mode!r}")
    order = list(range(num_shards))
    rng.shuffle(order)
    return order


def plan_epoch(
    shard_sizes: list[int], seed: int, epoch: int, stream: int, num_streams: int, split: str, mode: str
) -> EpochPlan:
    """The samples stream `stream` of `num_streams` reads in `epoch`.

    Args:
        shard_sizes: samples per shard (from the manifests), N entries.
        split: "shard" or "sample" (module docstring).
        mode: "epochs" or "resample".

    Raises:
        ValueError: split="shard" with fewer shards than streams, or an unknown split.
    """
    if not 0 <= stream < num_streams:
        raise ValueError(f"stream {stream} outside [0, {num_streams})")
    order = shard_order(len(shard_sizes), seed, epoch, mode)
    if split == "shard":
        if len(shard_sizes) < num_streams:
            raise ValueError(
                f"split='shard' needs at least one shard per stream: {len(shard_sizes)} shards for "
                f"{num_streams} streams (data-parallel ranks x max(1, num_workers)); use loader.split='sample', "
                "fewer workers, or write more, smaller shards"
            )
        return EpochPlan(tuple((s, range(shard_sizes[s])) for s in order[stream::num_streams]))
    if split != "sample":
        raise ValueError(f"split must be 'shard' or 'sample', got {split!r}")
    segments = []
    offset = 0  # global index of the shard's first sample in this epoch's order
    for s in order:
        first = (stream - offset) % num_streams
        if first < shard_sizes[s]:
            segments.append((s, range(first, shard_sizes[s], num_streams)))
        offset += shard_sizes[s]
    return EpochPlan(tuple(segments))
