"""Decoded input batches of token extraction, made in DataLoader workers shard by shard.

Shapes: B batch, S image side; a batch of images is uint8 [B, S, S, 3] (RGB, resized and cropped).

`ShardBatches` is an IterableDataset over this rank's pending input shards: DataLoader worker w
of W takes shards w, w + W, ..., indexes each one (`extract_inputs.index`) and yields its
samples decoded, in input order, in batches of at most B that never cross shards. So the main
process only runs the tokenizer: indexing, reading, decoding and text tokenization all happen
in the workers, overlapped with the forward. The order in which the workers' batches arrive
does not matter: each batch names its shard, and a shard's batches come from one worker in
order, the last one marked `last`.

A sample that cannot be used comes back as an item with its reason (never an exception) and
no image row; the shard's samples that indexing found unusable ride on its first batch.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from megadual.data.images import ImageRecord, crop_uint8
from megadual.data.text_tokenizers import load_text_tokenizer

from .extract_inputs import InputShard, index


@dataclass
class InputItem:
    """A sample's text side and source, or an unusable sample (`reason` set); pixels go in the batch."""

    key: str
    source_key: str
    image_size: tuple[int, int]  # source (height, width)
    caption: str
    text_ids: np.ndarray  # int32 [L]
    reason: str = ""


_NO_IDS = np.zeros(0, dtype=np.int32)


@dataclass
class InputBatch:
    """One batch as a worker hands it over.

    Attributes:
        shard: position of its input shard in this rank's work list.
        items: every sample of the batch, unusable ones included.
        images: uint8 [B', S, S, 3], the usable samples' resized and cropped images in `items`
            order (None if there is none); `megadual.data.images.normalize` makes the model
            input, on the model's device. A pinned tensor after `pin_memory`.
        good: indices into `items` of the rows of `images`.
        skipped: on a shard's first batch, the {"source", "key", "reason"} entries of the
            samples indexing found unusable (or of the whole shard, if it cannot be read).
        last: the shard has no more batches.
    """

    shard: int
    items: list[InputItem]
    images: Union[np.ndarray, torch.Tensor, None]
    good: list[int]
    skipped: list[dict] = field(default_factory=list)
    last: bool = False

    def pin_memory(self) -> "InputBatch":
        """Called by the DataLoader's pin-memory thread (GPU runs): page-lock the images."""
        if self.images is not None:
            self.images = torch.as_tensor(self.images).pin_memory()
        return self


def _read(f: BinaryIO, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of an open tar."""
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise EOFError(f"member needs {size} bytes, the tar ends after {len(data)} (truncated shard)")
    return data


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _reproducible(exc: BaseException) -> str:
    """An error as a manifest reason that is the same on every run: PIL names the in-memory file
    it read ("<_io.BytesIO object at 0x7f...>"), whose address changes from run to run."""
    return f"{type(exc).__name__}: " + re.sub(r" object at 0x[0-9a-fA-F]+>", " object>", str(exc))


def _identity(batch: InputBatch) -> InputBatch:
    return batch


class ShardBatches(torch.utils.data.IterableDataset):
    """The batches of `shards`, split among DataLoader workers by shard (module docstring).

    Args:
        shards: this rank's pending input shards; a batch's `shard` is the position here.
        image_size: S, the tokenizer's input side.
        text_tokenizer: spec for `load_text_tokenizer` ("bytes" or a local HF directory);
            loaded lazily so each worker builds its own.
        batch_size: B.
    """

    collate_fn = staticmethod(_identity)  # batches are made here; the DataLoader passes them on

    def __init__(self, shards: Sequence[InputShard], image_size: int, text_tokenizer: str, batch_size: int):
        self.shards, self.image_size, self.text_spec = list(shards), image_size, text_tokenizer
        self.batch_size = batch_size
        self._text: Any = None

    def __iter__(self) -> Iterator[InputBatch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for pos in range(worker, len(self.shards), workers):
            yield from self._shard_batches(pos)

    def _shard_batches(self, pos: int) -> Iterator[InputBatch]:
        shard = self.shards[pos]
        try:
            samples, skipped = index(shard)
        except ValueError as exc:  # unreadable tar: the whole shard is skipped
            yield InputBatch(pos, [], None, [], [{"source": shard.source, "reason": str(exc)}], last=True)
            return
        if not samples:
            yield InputBatch(pos, [], None, [], skipped, last=True)
            return
        with contextlib.ExitStack() as files:  # one open handle per file for the whole shard
            opened: dict[str, BinaryIO] = {}

            def open_file(path: str) -> BinaryIO:
                if path not in opened:
                    opened[path] = files.enter_context(open(path, "rb"))
                return opened[path]

            for start in range(0, len(samples), self.batch_size):
                items, pixels = [], []
                for sample in samples[start:start + self.batch_size]:
                    item, pixels_uint8 = self._decode(*sample, open_file)
                    items.append(item)
                    if pixels_uint8 is not None:
                        pixels.append(pixels_uint8)
                good = [j for j, it in enumerate(items) if not it.reason]
                # uint8 crosses the process boundary (pickled: cheaper than a shared-memory
                # tensor's file-descriptor handshake at these sizes, 4x smaller than float).
                images = np.stack(pixels) if pixels else None
                yield InputBatch(pos, items, images, good, skipped if start == 0 else [],
                                 last=start + self.batch_size >= len(samples))

    def _decode(self, key: str, source_key: str, rec: ImageRecord,
                open_file: Callable[[str], BinaryIO]) -> tuple[InputItem, Optional[np.ndarray]]:
        """The item and its uint8 [S, S, 3] pixels, or the item with its `reason` and None."""
        # The caption first: it is cheap, and a sample without one is skipped undecoded.
        try:
            if rec.caption_member is not None:
                caption = _read(open_file(rec.path), *rec.caption_member).decode("utf-8", errors="replace").strip()
            else:
                assert rec.caption_path is not None, "index() lists samples without a caption as skipped"
                with open(rec.caption_path, encoding="utf-8", errors="replace") as f:
                    caption = f.read().strip()
        except (OSError, EOFError) as exc:
            return InputItem(key, source_key, (0, 0), "", _NO_IDS, f"caption unreadable: {exc}"), None
        if not caption:
            return InputItem(key, source_key, (0, 0), "", _NO_IDS, "empty caption: the .txt holds no text"), None
        try:
            data = _read(open_file(rec.path), rec.offset, rec.size) if rec.offset is not None else _read_file(rec.path)
            with Image.open(io.BytesIO(data)) as img:
                img.load()  # decode now: a truncated image fails here
                size = (img.height, img.width)
                pixels = crop_uint8(img, self.image_size)
        except Exception as exc:  # noqa: BLE001 - any decoder failure makes the sample unusable
            return InputItem(key, source_key, (0, 0), "", _NO_IDS, _reproducible(exc)), None
        if self._text is None:
            self._text = load_text_tokenizer(self.text_spec)
        text_ids = np.asarray(self._text.encode(caption), dtype=np.int32)  # one buffer to pickle, not a list
        return InputItem(key, source_key, size, caption, text_ids), pixels
