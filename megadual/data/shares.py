"""How the data-parallel ranks share an endless sequence of items, and how the sharing
survives a change of the number of ranks.

Legend: W data-parallel ranks, r a rank, t items a rank has taken, k an index among the
remaining items, g an item's global index.

The items (packed rows, image samples) are numbered 0, 1, 2, ... epoch after epoch. A `Split`
begins at item `start`, passes over `skip` (items past `start` that were taken before the
split began) and deals the remaining items round-robin: rank r's i-th item is the
(r + i*W)-th remaining one. Which items a split has handed out follows from the ranks'
counts alone, so `Split.after` can build the split that continues over any W' ranks and
hands out every item not yet taken exactly once: the ranks read as one reader would, only
the number of readers changed. Ranks that ran ahead of the others (a rank that skipped a
batch of corrupt images took more items) leave their extra items in the next split's `skip`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class Split:
    """Items from `start` on, without `skip` (sorted, each > start), dealt round-robin."""

    start: int = 0
    skip: tuple[int, ...] = ()

    def remaining(self, k: int) -> int:
        """The global index of the k-th remaining item."""
        g = self.start + k
        for s in self.skip:  # each skipped item at or before g pushes g one further
            if s > g:
                break
            g += 1
        return g

    def item(self, rank: int, world_size: int, i: int) -> int:
        """The global index of rank `rank`'s i-th item when `world_size` ranks share this split."""
        return self.remaining(rank + i * world_size)

    def after(self, taken: list[int]) -> "Split":
        """The split of the items left once rank r of len(taken) ranks took taken[r] items.

        Every remaining index below `first` was taken (rank r took indices r, r + W, ... below
        r + taken[r]*W); past it only ranks that ran ahead took some, and those are skipped.
        """
        world_size = len(taken)
        first = min(r + t * world_size for r, t in enumerate(taken))
        start = self.remaining(first)
        ahead = {self.remaining(k) for r, t in enumerate(taken)
                 for k in range(r + (t - 1) * world_size, first - 1, -world_size)}
        earlier = self.skip[bisect.bisect_right(self.skip, start):]
        return Split(start, tuple(sorted(ahead.union(earlier))))

    def to_state(self) -> dict:
        return {"start": self.start, "skip": list(self.skip)}

    @classmethod
    def from_state(cls, state: dict) -> "Split":
        return cls(int(state["start"]), tuple(int(s) for s in state["skip"]))


def continue_split(states: list[dict]) -> Split:
    """The split that continues after the positions in `states`, one per data-parallel rank of
    the run that saved them (dp-rank order), whatever the new number of ranks.

    Each state holds the split its ranks shared ("split"), how many ranks shared it
    ("world_size") and how many items that rank took ("taken").

    Raises:
        ValueError: the states are not one run's (different splits or rank counts).
    """
    world_sizes = {s["world_size"] for s in states}
    splits = {(s["split"]["start"], tuple(s["split"]["skip"])) for s in states}
    if world_sizes != {len(states)} or len(splits) != 1:
        raise ValueError(f"the {len(states)} saved loader positions are not those of one run's data-parallel ranks "
                         f"(world sizes {sorted(world_sizes)}, {len(splits)} different splits); resume from the "
                         "checkpoint that wrote them")
    return Split.from_state(states[0]["split"]).after([int(s["taken"]) for s in states])
