"""One loader stream: read its samples window by window, lay them out, pack them, batch them.

Legend: W samples per window (pack_window), B rows per batch, T tokens per row.

A stream is a pure function of (config, stream id, number of streams): epoch e's plan
(`stream_plan.py`) is cut into windows of W sample positions; each window is read, turned
into sequences, shuffled and packed on its own (`packing.pack_rows`), and its rows are emitted in a
shuffled order. Everything random is seeded from the seed and the window's (epoch, index)
or the sample's identity, never from how far the stream has run, so the stream's position
is just (epoch, window, rows of that window already emitted). Resuming rereads one window
and skips the emitted rows: no sample is repeated or skipped.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Iterator

from megadual.config.schema import PackedLoaderConfig

from .mm_sequence import GENERATION, UNDERSTANDING, MMSequence, SpecialTokens, build_sequence, collate_rows
from .packing import pack_rows
from .shard_reader import ShardCursor
from .stream_plan import plan_epoch
from .token_shards import Manifest, TokenShardError, decode_sample

logger = logging.getLogger(__name__)

# Per-window counts (summed when the window is read) and per-row counts (summed when a row is emitted).
SAMPLE_COUNTERS = ("samples", "skipped_corrupt", "dropped_too_long", "generation", "understanding", "caption_dropped")
ROW_COUNTERS = ("rows", "tokens", "padding")
_MAX_ERROR_LOGS = 20


@dataclass(frozen=True)
class ShardRef:
    """A shard as the streams see it.

    `uid` names it stably for seeding per-sample choices (directory index and file name, so
    moving the data keeps the choices); `manifest` is its directory's manifest.
    """

    path: str
    uid: str
    num_samples: int
    manifest: Manifest


def initial_state() -> dict:
    """The state of a stream that has emitted nothing."""
    return {
        "epoch": 0,
        "window": 0,
        "row": 0,
        "counts_base": dict.fromkeys(SAMPLE_COUNTERS, 0),
        "counts": dict.fromkeys(SAMPLE_COUNTERS + ROW_COUNTERS, 0),
    }


class PackedStream:
    """An endless iterator of (batch, state after that batch) for one stream.

    Args:
        cfg: the loader section.
        tokens: special ids for the layouts.
        shards: every shard of every directory, in a fixed order.
        stream, num_streams: this stream's id and how many streams split the data.
        state: where to start (`initial_state()` or a state this class yielded).
    """

    def __init__(
        self,
        cfg: PackedLoaderConfig,
        tokens: SpecialTokens,
        shards: list[ShardRef],
        stream: int,
        num_streams: int,
        state: dict | None = None,
    ):
        self.cfg, self.tokens, self.shards = cfg, tokens, shards
        self.stream, self.num_streams = stream, num_streams
        self.depth = shards[0].manifest.depth
        self.state = initial_state() if state is None else state
        self._cursor: ShardCursor | None = None
        self._cursor_shard = -1
        self._errors_logged = 0

    # ----------------------------------------------------------------- reading

    def _read(self, shard: int, positions: list[int]):
        if shard != self._cursor_shard:
            if self._cursor is not None:
                self._cursor.close()
            ref = self.shards[shard]
            self._cursor, self._cursor_shard = ShardCursor(ref.path, ref.path, ref.num_samples), shard
        yield from self._cursor.read(positions)

    def _on_error(self, err: TokenShardError, counts: dict) -> None:
        if self.cfg.on_error == "raise":
            raise err
        counts["skipped_corrupt"] += 1
        self._errors_logged += 1
        if self._errors_logged <= _MAX_ERROR_LOGS:
            logger.warning("skipping (loader.on_error='skip'): %s", err)
        elif self._errors_logged == _MAX_ERROR_LOGS + 1:
            logger.warning("more skipped samples on stream %d; see the loader stats for counts", self.stream)

    def _sequence(self, ref: ShardRef, pos: int, sample, epoch: int, counts: dict) -> MMSequence | None:
        # Choices are keyed by the sample's identity, so they do not depend on the stream layout.
        rng = random.Random(f"megadual-sample:{self.cfg.seed}:{epoch}:{ref.uid}:{pos}")
        task = GENERATION if rng.random() < self.cfg.generation_fraction else UNDERSTANDING
        drop = task == GENERATION and rng.random() < self.cfg.cfg_drop_rate
        seq = build_sequence(sample, task, drop, self.tokens, meta=(epoch, ref.uid, pos, sample.key, task, drop))
        if len(seq) > self.cfg.seq_len:
            if self.cfg.too_long == "raise":
                raise ValueError(
                    f"sample {sample.key!r} of {ref.path} lays out to {len(seq)} tokens ({task}), more than "
                    f"loader.seq_len={self.cfg.seq_len}; raise seq_len or set loader.too_long='drop'"
                )
            counts["dropped_too_long"] += 1
            return None
        counts["samples"] += 1
        counts[task] += 1
        counts["caption_dropped"] += drop
        return seq

    def window_rows(self, epoch: int, window: int, plan) -> list[list[MMSequence]]:
        """Read, lay out and pack one window; adds its sample counts to the state."""
        counts = self.state["counts"]
        w = self.cfg.pack_window
        seqs: list[MMSequence] = []
        for shard, positions in plan.slice(window * w, (window + 1) * w):
            ref = self.shards[shard]
            for pos, key, got in self._read(shard, positions):
                try:
                    if isinstance(got, TokenShardError):
                        raise got
                    sample = decode_sample(got, ref.path, key, ref.manifest)
                except TokenShardError as err:
                    self._on_error(err, counts)
                    continue
                seq = self._sequence(ref, pos, sample, epoch, counts)
                if seq is not None:
                    seqs.append(seq)
        rng = random.Random(f"megadual-window:{self.cfg.seed}:{epoch}:{self.stream}:{window}")
        rng.shuffle(seqs)
        rows = [[seqs[i] for i in row] for row in pack_rows([len(s) for s in seqs], self.cfg.seq_len)]
        rng.shuffle(rows)
        return rows

    # ----------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        st = self.state
        epoch, window, skip = st["epoch"], st["window"], st["row"]
        # Sample counts restart from their value before the current window, which is read again.
        st["counts"].update(st["counts_base"])
        pending: list[list[MMSequence]] = []
        while True:
            plan = plan_epoch(
                [s.num_samples for s in self.shards], self.cfg.seed, epoch, self.stream, self.num_streams,
                self.cfg.split, self.cfg.mode,
            )
            num_windows = -(-plan.num_samples // self.cfg.pack_window)
            emitted_in_epoch = window > 0 or skip > 0
            while window < num_windows:
                base = {k: st["counts"][k] for k in SAMPLE_COUNTERS}
                rows = self.window_rows(epoch, window, plan)
                for i in range(skip, len(rows)):
                    pending.append(rows[i])
                    emitted_in_epoch = True
                    used = sum(len(s) for s in rows[i])
                    st["counts"]["rows"] += 1
                    st["counts"]["tokens"] += used
                    st["counts"]["padding"] += self.cfg.seq_len - used
                    if len(pending) == self.cfg.batch_size:
                        st.update(epoch=epoch, window=window, row=i + 1, counts_base=base)
                        batch = collate_rows(pending, self.cfg.seq_len, self.depth, self.tokens)
                        pending = []
                        yield batch, copy_state(st)
                window, skip = window + 1, 0
            if not emitted_in_epoch:
                raise ValueError(
                    f"loader stream {self.stream} of {self.num_streams} got no usable sample in epoch {epoch} "
                    f"({plan.num_samples} planned, counts so far {st['counts']}); check the shards and "
                    "loader.seq_len, or use fewer streams"
                )
            epoch, window = epoch + 1, 0


def copy_state(state: dict) -> dict:
    """A copy of a stream state that shares no dicts with it."""
    return {**state, "counts_base": dict(state["counts_base"]), "counts": dict(state["counts"])}
