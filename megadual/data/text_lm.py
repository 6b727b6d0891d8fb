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
from .shares import Split, continue_split

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

    Epoch e shuffles the documents with (seed, e) and packs them into rows; the rows of epoch
    after epoch form one endless sequence that the data-parallel ranks share round-robin
    (`shares.Split`: rank r takes rows r, r + world_size, ...), so ranks never share a row and
    a batch may run across an epoch's end. `state_dict()` records the position; a loader
    restored from it yields exactly what the original would have yielded next, and
    `load_global_state` continues every rank's position on another number of ranks.
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
        self.split, self.taken = Split(), 0
        self._epoch, self._epoch_start, self._rows = 0, 0, self._epoch_rows(0)

    def _epoch_rows(self, epoch: int) -> list[PackedRow]:
        order = list(range(len(self.tokenized)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        rows, dropped = pack_rows([self.tokenized[i] for i in order], self.seq_len, self.tokenizer.pad_id)
        if dropped and epoch == 0:
            logger.warning("dropped %d documents longer than seq_len=%d", dropped, self.seq_len)
        if not rows:
            raise ValueError(f"no document fits in train.seq_len={self.seq_len} tokens; raise it or add shorter text")
        return rows

    def _row(self, g: int) -> PackedRow:
        """Row g of the endless sequence (rows are asked for in increasing order, so the
        current epoch is kept and later ones packed as they are reached)."""
        if g < self._epoch_start:
            self._epoch, self._epoch_start, self._rows = 0, 0, self._epoch_rows(0)
        while g >= self._epoch_start + len(self._rows):
            self._epoch, self._epoch_start = self._epoch + 1, self._epoch_start + len(self._rows)
            self._rows = self._epoch_rows(self._epoch)
        return self._rows[g - self._epoch_start]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = [self._row(self.split.item(self.rank, self.world_size, self.taken + j)) for j in range(self.batch_size)]
        self.taken += self.batch_size
        return collate_rows(rows, self.tokenizer.pad_id)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "split": self.split.to_state(), "world_size": self.world_size, "taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        """Continue from this rank's own `state_dict()` (same number of ranks)."""
        self._check_seed(state)
        if state["world_size"] != self.world_size:
            raise ValueError(f"loader state of a run with {state['world_size']} data-parallel ranks, this one has "
                             f"{self.world_size}; load every rank's state with load_global_state")
        self.split, self.taken = Split.from_state(state["split"]), state["taken"]

    def load_global_state(self, states: list[dict]) -> None:
        """Continue after the positions of every data-parallel rank of a run (dp-rank order),
        saved with any number of ranks: each row not yet read is read once, by one rank."""
        for state in states:
            self._check_seed(state)
        if "split" not in states[0]:  # written before the shared split: each rank's (epoch, next_row)
            if len({(s["epoch"], s["next_row"]) for s in states}) != 1:
                raise ValueError(f"the saved loader positions {states} are not one place in the data; resume on "
                                 "the MegaDual version that wrote them")
            epoch, next_row = states[0]["epoch"], states[0]["next_row"]
            start = sum(len(self._epoch_rows(e)) for e in range(epoch)) + next_row * len(states)
            self.split, self.taken = Split(start), 0
            return
        self.split, self.taken = continue_split(states), 0

    def _check_seed(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader uses {self.seed}")
