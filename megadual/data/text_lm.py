"""Packed text batches for backbone-only language-model training.

Legend: B rows per batch, T tokens per row.

Documents (captions, lines of text files) are tokenized, shuffled per epoch with a seed,
and packed in order into rows of exactly T tokens: a document that does not fit in the
current row starts the next one, the rest of the row is padding in its own segment, and
a document longer than T is dropped and counted (never cut). Each row carries
`position_ids` restarting per document and the batch carries `cu_seqlens`, so the
backbone's attention never crosses a document.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Iterator

import torch

from megadual.config.schema import TextDataConfig

from .scenes import describe, sample_scene

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class ByteTokenizer:
    """UTF-8 bytes plus BOS, EOS and PAD: needs no vocabulary file, covers any text."""

    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        """Text of the byte ids, stopping at the first EOS; BOS and PAD are dropped."""
        out = bytearray()
        for i in ids:
            if i == self.eos_id:
                break
            if i < 256:
                out.append(i)
        return out.decode("utf-8", errors="replace")


def load_documents(cfg: TextDataConfig, seed: int) -> list[str]:
    """The training texts the data section names."""
    if cfg.source == "synthetic-captions":
        return [describe(sample_scene(seed, i)) for i in range(cfg.num_samples)]
    docs: list[str] = []
    for path in cfg.paths:
        with open(path, encoding="utf-8") as f:
            docs.extend(line.strip() for line in f if line.strip())
    if not docs:
        raise ValueError(f"data.paths {cfg.paths} hold no non-empty lines")
    return docs[: cfg.num_samples]


@dataclass
class PackedRow:
    """One row of T tokens: `segments` are the lengths of its documents (padding last)."""

    tokens: list[int]
    segments: list[int]


def pack_rows(docs: list[list[int]], seq_len: int, pad_id: int) -> tuple[list[PackedRow], int]:
    """Pack tokenized documents, in order, into rows of exactly `seq_len` tokens.

    Returns:
        (rows, number of documents dropped for being longer than `seq_len`).
    """
    rows: list[PackedRow] = []
    tokens: list[int] = []
    segments: list[int] = []
    dropped = 0

    def close_row():
        if tokens:
            pad = seq_len - len(tokens)
            rows.append(PackedRow(tokens + [pad_id] * pad, segments + ([pad] if pad else [])))

    for doc in docs:
        if len(doc) > seq_len:
            dropped += 1
            continue
        if len(tokens) + len(doc) > seq_len:
            close_row()
            tokens, segments = [], []
        tokens = tokens + doc
        segments.append(len(doc))
    close_row()
    return rows, dropped


def collate_rows(rows: list[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack rows into a batch.

    Returns:
        input_ids, labels, position_ids: int64 [B, T]; labels are the next token inside the
        same document and IGNORE_INDEX at document ends and on padding.
        cu_seqlens: int64 [num_segments + 1] offsets over the B*T flattened tokens.
    """
    seq_len = len(rows[0].tokens)
    input_ids = torch.tensor([r.tokens for r in rows], dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    position_ids = torch.zeros_like(input_ids)
    offsets = [0]
    for b, row in enumerate(rows):
        start = 0
        for length in row.segments:
            position_ids[b, start : start + length] = torch.arange(length)
            is_padding = row.tokens[start] == pad_id
            if length > 1 and not is_padding:
                labels[b, start : start + length - 1] = input_ids[b, start + 1 : start + length]
            start += length
            offsets.append(b * seq_len + start)
        assert start == seq_len, "segments must cover the row"
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": torch.tensor(offsets, dtype=torch.long),
    }


class PackedTextLoader:
    """Endless, deterministic stream of packed batches for one data-parallel rank.

    Epoch e shuffles the documents with (seed, e); rank r of `world_size` takes rows
    r, r + world_size, ... so ranks never share a row. `state_dict()` records the position;
    a loader restored from it yields exactly what the original would have yielded next.
    """

    def __init__(
        self,
        documents: list[str],
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        tokenizer: ByteTokenizer | None = None,
    ):
        self.tokenizer = tokenizer or ByteTokenizer()
        self.tokenized = [self.tokenizer.encode(d) for d in documents]
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.next_row = 0, 0
        self._rows = self._epoch_rows(0)

    def _epoch_rows(self, epoch: int) -> list[PackedRow]:
        order = list(range(len(self.tokenized)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        rows, dropped = pack_rows([self.tokenized[i] for i in order], self.seq_len, self.tokenizer.pad_id)
        if dropped and epoch == 0:
            logger.warning("dropped %d documents longer than seq_len=%d", dropped, self.seq_len)
        mine = rows[self.rank :: self.world_size]
        if len(mine) < self.batch_size:
            raise ValueError(
                f"an epoch packs into {len(rows)} rows, fewer than {self.batch_size} per rank x {self.world_size} "
                "ranks; add data (data.num_samples) or lower train.micro_batch_size"
            )
        return mine

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.next_row + self.batch_size > len(self._rows):
            self.epoch, self.next_row = self.epoch + 1, 0
            self._rows = self._epoch_rows(self.epoch)
        batch = self._rows[self.next_row : self.next_row + self.batch_size]
        self.next_row += self.batch_size
        return collate_rows(batch, self.tokenizer.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "next_row": self.next_row, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader uses {self.seed}")
        self.epoch, self.next_row = state["epoch"], state["next_row"]
        self._rows = self._epoch_rows(self.epoch)
