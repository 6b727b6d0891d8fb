"""The packed multimodal loader of one data-parallel rank: streams, DataLoader workers, resumable state.

Legend: B rows per batch, T tokens per row, R residual depth.

    tokens = SpecialTokens(image_start_id=..., image_end_id=..., eos_id=..., pad_id=...)
    loader = PackedMultimodalLoader(cfg.loader, tokens, rank=dp_rank, world_size=dp_size)
    batch = next(loader)             # see mm_sequence.collate_rows for the keys and shapes
    state = loader.state_dict()      # save with the checkpoint (one per data-parallel rank)
    loader.load_state_dict(state)    # the next batches are those an uninterrupted run would see

The data is split into S streams (`loader.num_streams`, default dp x max(1, num_workers)); rank
r of W runs the m = S / W streams r*m .. r*m + m - 1, and its k-th batch comes from its stream
k mod m. With n workers, worker w runs the streams whose batches it serves (batches arrive
round-robin over the workers), so n must divide m. The state holds each stream's position (as
of the batches handed out, not the ones prefetched) and how many batches were handed out; a
resumed loader continues the round-robin where it stopped. Streams are endless (epochs follow
one another inside each stream), so every rank always has a next batch.

A stream's samples depend on S and its id only, never on W: a run resumed on another number
of ranks (`load_global_state`) hands the same S streams out again, each continuing from its
saved position, so every sample is read exactly once across the change.
"""

from __future__ import annotations

import copy
import itertools
import os
from typing import Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megadual.config.schema import PackedLoaderConfig

from .mm_sequence import SpecialTokens
from .mm_stream import ROW_COUNTERS, SAMPLE_COUNTERS, PackedStream, ShardRef, copy_state, initial_state
from .token_shards import Manifest, read_manifest
from .workers import die_with_parent

STATE_VERSION = 1
_MUST_AGREE = ("tokenizer_checkpoint_sha256", "text_tokenizer", "pixel_codebook_size", "semantic_codebook_size",
               "num_positions", "depth", "shared_codes")


def load_shards(paths: list[str]) -> tuple[Manifest, list[ShardRef]]:
    """Read the manifests of `paths` and list their shards.

    Returns:
        (the first directory's manifest, every shard of every directory in path order).

    Raises:
        TokenShardError: a missing or invalid manifest.
        ValueError: directories made by different tokenizers or with different code shapes.
    """
    first: Manifest | None = None
    shards: list[ShardRef] = []
    for d, path in enumerate(paths):
        manifest = read_manifest(path)
        if first is None:
            first = manifest
        for name in _MUST_AGREE:
            if getattr(manifest, name) != getattr(first, name):
                raise ValueError(
                    f"token shard directories disagree on {name}: {paths[0]} has {getattr(first, name)!r}, "
                    f"{path} has {getattr(manifest, name)!r}; train on directories from one tokenizer"
                )
        for entry in manifest.shards:
            if entry.num_samples > 0:
                shards.append(ShardRef(os.path.join(path, entry.name), f"{d}/{entry.name}", entry.num_samples, manifest))
    if not shards:
        raise ValueError(f"the token shard directories {paths} list no samples")
    return first, shards


class PackedMultimodalDataset(IterableDataset):
    """The streams of one rank as an IterableDataset: each worker serves every n-th batch.

    Yields (batch, stream id, stream state after the batch). Batch `first_batch + b` of the
    rank comes from `streams[(first_batch + b) % len(streams)]`; worker w serves the b with
    b % n == w (the DataLoader's round-robin), so it runs the streams those batches come from.
    """

    def __init__(self, cfg, tokens, shards, streams: list[int], num_streams: int, states: dict[int, dict],
                 first_batch: int = 0):
        self.cfg, self.tokens, self.shards = cfg, tokens, shards
        self.streams, self.num_streams, self.states, self.first_batch = streams, num_streams, states, first_batch
        self.readers = max(1, cfg.num_workers)

    def __iter__(self) -> Iterator[tuple[dict, int, dict]]:
        info = get_worker_info()
        if info is not None and info.num_workers != self.readers:
            raise ValueError(f"this dataset expects {self.readers} workers, the DataLoader runs {info.num_workers}")
        worker = 0 if info is None else info.id
        runs: dict[int, Iterator] = {}
        for k in itertools.count():
            stream = self.streams[(self.first_batch + worker + k * self.readers) % len(self.streams)]
            if stream not in runs:
                state = copy_state(self.states[stream])
                runs[stream] = iter(PackedStream(self.cfg, self.tokens, self.shards, stream, self.num_streams, state))
            batch, new_state = next(runs[stream])
            yield batch, stream, new_state


class PackedMultimodalLoader:
    """Endless packed batches for one data-parallel rank, resumable exactly.

    Args:
        cfg: the loader section (validated here).
        tokens: special ids from the text tokenizer.
        rank, world_size: the data-parallel rank and degree (no collectives are used).
    """

    def __init__(self, cfg: PackedLoaderConfig, tokens: SpecialTokens, rank: int = 0, world_size: int = 1):
        cfg.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        self.cfg, self.tokens, self.rank, self.world_size = cfg, tokens, rank, world_size
        self.manifest, self.shards = load_shards(cfg.paths)
        shortest = self.manifest.num_positions + min(tokens.overhead(t) for t in ("understanding", "generation"))
        if shortest > cfg.seq_len:
            raise ValueError(
                f"loader.seq_len={cfg.seq_len} cannot hold one image of {self.manifest.num_positions} positions "
                f"plus its {shortest - self.manifest.num_positions} special tokens; raise seq_len to at least {shortest}"
            )
        self.readers = max(1, cfg.num_workers)
        self._set_streams(cfg.num_streams or world_size * self.readers)
        self._states = {s: initial_state() for s in self.streams}
        self._batches = 0
        self._it: Iterator | None = None

    def _set_streams(self, num_streams: int) -> None:
        """Split the data into `num_streams` streams and take this rank's share of them."""
        all_readers = self.world_size * self.readers
        if num_streams % all_readers:
            raise ValueError(
                f"the data is split into {num_streams} loader streams, which {self.world_size} data-parallel ranks x "
                f"{self.readers} readers (max(1, loader.num_workers)) cannot share evenly; use a data-parallel size "
                f"and worker count whose product divides {num_streams}, or set loader.num_streams to a multiple of "
                f"{all_readers} for a new run"
            )
        self.num_streams = num_streams
        streams_per_rank = num_streams // self.world_size
        self.streams = list(range(self.rank * streams_per_rank, (self.rank + 1) * streams_per_rank))

    # ----------------------------------------------------------------- iteration

    def _start(self) -> Iterator:
        dataset = PackedMultimodalDataset(
            self.cfg, self.tokens, self.shards, self.streams, self.num_streams,
            {s: copy_state(st) for s, st in self._states.items()}, self._batches,
        )
        if self.cfg.num_workers == 0:
            return iter(dataset)
        return iter(
            DataLoader(
                dataset, batch_size=None, num_workers=self.cfg.num_workers,
                prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False, worker_init_fn=die_with_parent,
            )
        )

    def __iter__(self) -> "PackedMultimodalLoader":
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._start()
        batch, stream, state = next(self._it)
        expected = self.streams[self._batches % len(self.streams)]
        assert stream == expected, f"batch from stream {stream}, expected {expected}: worker order broke"
        self._states[stream] = state
        self._batches += 1
        return batch

    def close(self) -> None:
        """Stop the workers (a later `next` restarts them from the current state)."""
        self._it = None

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """The position after the last batch handed out (plain ints and dicts; JSON-able)."""
        return {
            "version": STATE_VERSION,
            "seed": self.cfg.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.cfg.num_workers,
            "num_streams": self.num_streams,
            "batches": self._batches,
            "streams": {str(s): copy_state(st) for s, st in self._states.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`, which must come from a loader with the same data layout.

        Raises:
            ValueError: the state was saved with another seed, rank, world size, worker or
                stream count (each changes which stream reads which samples).
        """
        self._check_version_and_seed(state)
        mine = {"rank": self.rank, "world_size": self.world_size, "num_workers": self.cfg.num_workers,
                "num_streams": self.num_streams}
        for key, value in mine.items():
            if _saved(state, key) != value:
                raise ValueError(
                    f"loader state was saved with {key}={_saved(state, key)}, this loader has {key}={value}; resume "
                    "with the same data-parallel size and loader.num_workers, or load every rank's state with "
                    "load_global_state"
                )
        self._states = {int(s): copy_state(st) for s, st in state["streams"].items()}
        self._batches = state["batches"]
        self._it = None

    def load_global_state(self, states: list[dict]) -> None:
        """Continue after every data-parallel rank's state of a run (dp-rank order), saved with
        any number of ranks and workers whose streams this layout can share (see `_set_streams`).
        Each stream continues from its own position: no sample is skipped or read twice.

        Raises:
            ValueError: states of another seed, or a stream count this layout cannot share.
        """
        for state in states:
            self._check_version_and_seed(state)
        if len(states) == self.world_size and states[self.rank]["num_workers"] == self.cfg.num_workers:
            self.load_state_dict(states[self.rank])
            return
        num_streams = _saved(states[0], "num_streams")
        if self.cfg.num_streams not in (0, num_streams):
            raise ValueError(f"loader.num_streams: got {self.cfg.num_streams}, the checkpoint's data is split into "
                             f"{num_streams} streams; leave it at 0 or set it to {num_streams}")
        self._set_streams(num_streams)
        saved = {int(s): st for state in states for s, st in state["streams"].items()}
        self._states = {s: copy_state(saved[s]) for s in self.streams}
        self._batches = 0
        self._it = None

    def _check_version_and_seed(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["seed"] != self.cfg.seed:
            raise ValueError(f"loader state was saved with seed={state['seed']}, this loader has seed={self.cfg.seed}; "
                             "resume with the same loader.seed (the split of samples depends on it)")

    @property
    def stats(self) -> dict:
        """Counters summed over this rank's streams, plus `padding_fraction`.

        samples / generation / understanding / caption_dropped: laid-out samples read so far
        (including any prefetched by the current window); skipped_corrupt, dropped_too_long:
        samples lost to on_error='skip' and too_long='drop'; rows, tokens, padding: of the
        batches handed out.
        """
        total = {k: sum(st["counts"][k] for st in self._states.values()) for k in SAMPLE_COUNTERS + ROW_COUNTERS}
        slots = total["tokens"] + total["padding"]
        total["padding_fraction"] = total["padding"] / slots if slots else 0.0
        return copy.deepcopy(total)


def _saved(state: dict, key: str) -> int:
    """A layout figure of a saved state; states written before `num_streams` existed ran
    world_size x max(1, num_workers) streams."""
    if key == "num_streams" and key not in state:
        return state["world_size"] * max(1, state["num_workers"])
    return state[key]


def stream_batches(cfg: PackedLoaderConfig, tokens: SpecialTokens, stream: int, num_streams: int) -> Iterator[dict]:
    """Batches of one stream without a DataLoader (benchmarks, inspection)."""
    _, shards = load_shards(cfg.paths)
    for batch, _ in PackedStream(cfg, tokens, shards, stream, num_streams):
        yield batch

