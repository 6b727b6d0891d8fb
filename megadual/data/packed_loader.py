"""The packed multimodal loader of one data-parallel rank: streams, DataLoader workers, resumable state.

Legend: B rows per batch, T tokens per row, R residual depth.

    tokens = SpecialTokens(image_start_id=..., image_end_id=..., eos_id=..., pad_id=...)
    loader = PackedMultimodalLoader(cfg.loader, tokens, rank=dp_rank, world_size=dp_size)
    batch = next(loader)             # see mm_sequence.collate_rows for the keys and shapes
    state = loader.state_dict()      # save with the checkpoint (one per data-parallel rank)
    loader.load_state_dict(state)    # the next batches are those an uninterrupted run would see

Rank r runs streams r*n .. r*n + n - 1 (n = max(1, num_workers)); with workers, DataLoader
worker w runs one stream, and batches arrive round-robin over the workers. The state holds
each stream's position (as of the batches handed out, not the ones prefetched) and how many
batches were handed out; a resumed loader rotates which stream each worker runs so the
round-robin continues with the stream that was next. Streams are endless (epochs follow one
another inside each stream), so every rank always has a next batch.
"""

from __future__ import annotations

import copy
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
               "num_positions", "depth")


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
    """The streams of one rank as an IterableDataset: each worker iterates one stream.

    Yields (batch, stream id, stream state after the batch). `rotation` shifts which
    stream each worker runs (see the module docstring).
    """

    def __init__(self, cfg, tokens, shards, rank, world_size, states: dict[int, dict], rotation: int = 0):
        self.cfg, self.tokens, self.shards = cfg, tokens, shards
        self.rank, self.world_size, self.states, self.rotation = rank, world_size, states, rotation
        self.per_rank = max(1, cfg.num_workers)

    def __iter__(self) -> Iterator[tuple[dict, int, dict]]:
        info = get_worker_info()
        if info is not None and info.num_workers != self.per_rank:
            raise ValueError(f"this dataset expects {self.per_rank} workers, the DataLoader runs {info.num_workers}")
        worker = 0 if info is None else info.id
        stream = self.rank * self.per_rank + (worker + self.rotation) % self.per_rank
        state = copy_state(self.states[stream])
        run = PackedStream(self.cfg, self.tokens, self.shards, stream, self.world_size * self.per_rank, state)
        for batch, new_state in run:
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
        self.per_rank = max(1, cfg.num_workers)
        self.streams = [rank * self.per_rank + i for i in range(self.per_rank)]
        self._states = {s: initial_state() for s in self.streams}
        self._batches = 0
        self._it: Iterator | None = None

    # ----------------------------------------------------------------- iteration

    def _start(self) -> Iterator:
        rotation = self._batches % self.per_rank
        dataset = PackedMultimodalDataset(
            self.cfg, self.tokens, self.shards, self.rank, self.world_size,
            {s: copy_state(st) for s, st in self._states.items()}, rotation,
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
        expected = self.streams[self._batches % self.per_rank]
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
            "batches": self._batches,
            "streams": {str(s): copy_state(st) for s, st in self._states.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`, which must come from a loader with the same data layout.

        Raises:
            ValueError: the state was saved with another seed, rank, world size or worker
                count (each changes which stream reads which samples).
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = {"seed": self.cfg.seed, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.cfg.num_workers}
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(
                    f"loader state was saved with {key}={state[key]}, this loader has {key}={value}; resume with "
                    "the same seed, data-parallel size and loader.num_workers (the split of samples depends on them)"
                )
        self._states = {int(s): copy_state(st) for s, st in state["streams"].items()}
        self._batches = state["batches"]
        self._it = None

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


def stream_batches(cfg: PackedLoaderConfig, tokens: SpecialTokens, stream: int, num_streams: int) -> Iterator[dict]:
    """Batches of one stream without a DataLoader (benchmarks, inspection)."""
    _, shards = load_shards(cfg.paths)
    for batch, _ in PackedStream(cfg, tokens, shards, stream, num_streams):
        yield batch

