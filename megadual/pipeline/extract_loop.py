"""The extraction loop: encode batches here, assemble and write token shards on a writer thread.

Shapes: B batch, T visual positions, R residual depth.

    worker processes: index + decode  ->  this thread: tokenizer.encode [B, T, R]  ->  writer thread:
    codes to uint16, TokenSamples, tar bytes (ShardBuilder), and at a shard's last batch the
    atomic tar + part record (the `finish` callback)

The writer thread takes jobs from a bounded queue (`JobThread`), so the forward of batch k+1
runs while batch k is serialized and at most `max_pending` batches wait. Jobs run in order, so
a shard's samples keep their input order and the bytes do not depend on the timing. On a GPU
the device-to-host copy of the codes also happens on the writer thread, so the next forward is
launched without waiting for it.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from megadual.data.images import normalize
from megadual.data.shard_writer import ShardBuilder
from megadual.data.token_shards import TokenSample

from .extract_batches import InputBatch, InputItem
from .job_thread import JobThread

Skip = Callable[[dict], dict]  # logs an unusable input (or raises, with on_corrupt="raise")
Finish = Callable[[int, ShardBuilder, list], None]  # (shard position, its samples, its skipped entries)


def _to_uint16(codes: torch.Tensor) -> np.ndarray:
    return codes.to(torch.int32).cpu().numpy().astype(np.uint16)


class _ShardAssembler:
    """Writer-thread state: the open shards' builders and skipped entries, by shard position."""

    def __init__(self, finish: Finish, shared_codes: bool = False):
        self.finish_fn, self.shared_codes = finish, shared_codes
        self.open: dict[int, tuple[ShardBuilder, list]] = {}

    def add(self, pos: int, items: list[InputItem], pixel: Optional[torch.Tensor],
            semantic: Optional[torch.Tensor], skipped: list[dict]) -> None:
        builder, skipped_so_far = self.open.setdefault(pos, (ShardBuilder(self.shared_codes), []))
        skipped_so_far.extend(skipped)
        if pixel is None:
            return
        pixel_np, semantic_np = _to_uint16(pixel), _to_uint16(semantic)
        for j, it in enumerate(items):
            builder.add(TokenSample(
                key=it.key, caption=it.caption, text_ids=it.text_ids,
                pixel_codes=pixel_np[j], semantic_codes=semantic_np[j], image_size=it.image_size,
                source_key=it.source_key,
            ))

    def finish(self, pos: int) -> None:
        builder, skipped = self.open.pop(pos, (ShardBuilder(self.shared_codes), []))
        self.finish_fn(pos, builder, skipped)


def encode_shards(batches: Iterable[InputBatch], tokenizer, device: torch.device, skip: Skip, finish: Finish,
                  source_of: Callable[[int], str], progress: Optional[Callable[[int], None]] = None,
                  max_pending: int = 8) -> dict:
    """Encode every batch and have its shard written once its last batch is in.

    Args:
        batches: `InputBatch`es (any shard order; a shard's batches in order, the last marked).
        tokenizer: a DualTokenizer on `device`, in eval mode.
        skip: called with each unusable input's entry, returns the entry to record.
        finish: called on the writer thread when a shard is complete.
        source_of: the manifest `source` of a shard position (for skipped entries).
        progress: called with the number of input samples of each batch.
        max_pending: batches that may wait for the writer thread.

    Returns:
        Times from `time.perf_counter()`: first_batch_at (the first batch is ready),
        first_encoded_at / last_encode_at (the first / last batch is handed to the writer),
        drained_at (every shard is written); images (input samples) and first_images (those
        of the first batch); steady_cpu_s, this thread's CPU seconds from the first to the last
        batch handed over, and writer_cpu_s, the writer thread's.

    Raises:
        Whatever `skip`, the tokenizer or the writer thread raised; the shards already
        complete are written first.
    """
    # A shared index ("tokenflow") or one codebook ("single"): the two code streams are one array.
    assembler = _ShardAssembler(finish, shared_codes=tokenizer.design != "dualtoken")
    jobs = JobThread(max_pending, name="extract-writer")
    times = {"first_batch_at": None, "first_encoded_at": None, "last_encode_at": None, "images": 0, "first_images": 0,
             "steady_cpu_s": 0.0}
    first_cpu = 0.0
    try:
        for batch in batches:
            if times["first_batch_at"] is None:
                times["first_batch_at"], times["first_images"] = time.perf_counter(), len(batch.items)
            skipped = [skip(e) for e in batch.skipped]
            skipped += [skip({"source": source_of(batch.shard), "key": it.source_key, "reason": it.reason})
                        for it in batch.items if it.reason]
            pixel = semantic = None
            if batch.good:
                with torch.no_grad():
                    images = normalize(torch.as_tensor(batch.images).to(device, non_blocking=True))  # [B', 3, S, S]
                    pixel, semantic = tokenizer.encode(images)  # [B', T, R]
            jobs.submit(assembler.add, batch.shard, [batch.items[j] for j in batch.good], pixel, semantic, skipped)
            if batch.last:
                jobs.submit(assembler.finish, batch.shard)
            times["images"] += len(batch.items)
            times["last_encode_at"], cpu = time.perf_counter(), time.thread_time()
            if times["first_encoded_at"] is None:
                times["first_encoded_at"], first_cpu = times["last_encode_at"], cpu
            times["steady_cpu_s"] = cpu - first_cpu
            if progress is not None:
                progress(len(batch.items))
    except BaseException:
        jobs.close(raise_errors=False)  # complete shards already queued still get written
        raise
    jobs.close()
    times["drained_at"], times["writer_cpu_s"] = time.perf_counter(), jobs.cpu_s
    return times
