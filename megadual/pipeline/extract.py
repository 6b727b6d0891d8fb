"""Offline token extraction: raw image-caption shards -> token shards (`megadual extract`).

Shapes: B batch, S image side, T visual positions (grid^2), R residual depth.

    input shards -> index, decode, text ids (DataLoader workers, `extract_batches.py`)
    -> uint8 images [B,S,S,3] -> normalize + DualTokenizer.encode (this thread) -> pixel, semantic codes [B,T,R]
    -> token shards serialized and written on a writer thread (`extract_loop.py`), one output
       shard per input shard, then manifest.json

`extract_tokens(opts, timings)` also reports the fixed per-run costs (setup, tail) apart from
the steady-state images/s (`benchmarks/extract.py` compares the latter with bare encode).

Work and resume are per input shard. Input shard i (in `list_input_shards` order) becomes
`tokens-<i>.tar` and belongs to rank i % world_size, so ranks never share work and need no
collective but the final barrier. A finished shard leaves two files, each written atomically:
the tar, then its *part record* `.parts/tokens-<i>.json` (source, sample count, skipped inputs,
tokenizer hashes). The part record is the completion mark: a rerun skips shards that have one
and redoes any other (a tar without a record is rewritten, byte-identically). After the barrier
rank 0 merges every part record into `manifest.json`; since the manifest is derived from the
records alone, a run that died after the last shard is fixed by simply running again.

Batches never cross input shards and hold the same samples on every run, whatever the rank
count or the resume point, so the codes (and the tar bytes) are identical across reruns and
world sizes (at a fixed device and intra-op thread count).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from megadual.data.shard_writer import ShardBuilder, write_manifest
from megadual.data.text_tokenizers import BYTES
from megadual.data.token_shards import Manifest, ShardEntry
from megadual.data.workers import die_with_parent
from megadual.fs import write_atomic

from .extract_batches import ShardBatches
from .extract_inputs import InputShard, list_input_shards
from .extract_loop import encode_shards

logger = logging.getLogger(__name__)

PARTS_DIR = ".parts"
ON_CORRUPT = ("skip", "raise")


def directory_sha256(directory: str) -> str:
    """sha256 over a directory's files: each relative path and content, in sorted order.

    Raises:
        FileNotFoundError: `directory` is not a directory.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r} is not a directory")
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, directory).encode("utf-8") + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            digest.update(b"\0")
    return digest.hexdigest()


def text_tokenizer_id(spec: str) -> str:
    """The manifest's `text_tokenizer`: "bytes", or "<dir name>@sha256:<16 hex>" of a local HF directory."""
    if spec == BYTES:
        return BYTES
    return f"{os.path.basename(os.path.normpath(spec))}@sha256:{directory_sha256(spec)[:16]}"


@dataclass
class ExtractOptions:
    """What `megadual extract` does (one field per CLI flag).

    Args:
        inputs: tar shards, directories of tars, or image folders with sidecar NAME.txt captions.
        out: the output directory (token shards, .parts/, manifest.json).
        tokenizer: a DualTokenizer directory (save_pretrained); its files' sha256 goes in the manifest.
        text_tokenizer: "bytes" (debug) or a local Hugging Face tokenizer directory (never downloaded).
        fmt: "auto", "webdataset" or "folder".
        batch_size: images per tokenizer forward (batches never cross input shards).
        num_workers: DataLoader workers decoding images (0: decode in the main process).
        folder_shard_size: images per input shard when reading folders.
        on_corrupt: "skip" (list in the manifest and go on) or "raise" (stop with a ValueError).
        device: "cpu", "cuda", ... (default: this rank's GPU when there is one).
        show_progress: a progress bar (images/s) on rank 0.
    """

    inputs: Sequence[str]
    out: str
    tokenizer: str
    text_tokenizer: str = BYTES
    fmt: str = "auto"
    batch_size: int = 64
    num_workers: int = 2
    folder_shard_size: int = 1000
    on_corrupt: str = "skip"
    device: Optional[str] = None
    show_progress: bool = True

    def check(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"extract --batch-size must be positive, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"extract --num-workers must be >= 0, got {self.num_workers}")
        if self.on_corrupt not in ON_CORRUPT:
            raise ValueError(f"extract --on-corrupt: got {self.on_corrupt!r}, expected one of {ON_CORRUPT}")
        if not self.inputs:
            raise ValueError("extract --input: give at least one tar, directory of tars, or image folder")


def _rank_world() -> tuple[int, int, Optional[torch.device]]:
    """This process's place: an existing process group, a launcher's environment, or a world of one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from megadual.distributed.runtime import init_distributed

        info = init_distributed()
        return info.rank, info.world_size, info.device
    return 0, 1, None


def shard_name(i: int) -> str:
    return f"tokens-{i:06d}.tar"


def _part_path(out: str, i: int) -> str:
    return os.path.join(out, PARTS_DIR, shard_name(i)[: -len(".tar")] + ".json")


def _read_part(out: str, i: int, shard: InputShard, template: Manifest) -> Optional[dict[str, Any]]:
    """The part record of shard i, None if it is not finished.

    Raises:
        ValueError: the record was made from another input or with another tokenizer.
    """
    path = _part_path(out, i)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        part = json.load(f)
    for name, want in (("source", shard.source),
                       ("tokenizer_checkpoint_sha256", template.tokenizer_checkpoint_sha256),
                       ("text_tokenizer", template.text_tokenizer)):
        if part.get(name) != want:
            raise ValueError(
                f"{path}: {name} is {part.get(name)!r} but this run has {want!r}; the output directory "
                f"{out!r} was made from other inputs or tokenizers: use a new --out or delete it"
            )
    return part


def _finish_shard(out: str, i: int, shard: InputShard, samples: ShardBuilder, skipped: list[dict],
                  template: Manifest) -> None:
    """Write the tar (if any sample survived) and then, as the completion mark, the part record."""
    if len(samples):
        samples.write(os.path.join(out, shard_name(i)))
    part = {
        "source": shard.source, "shard": shard_name(i), "num_samples": len(samples), "skipped": skipped,
        "tokenizer_checkpoint_sha256": template.tokenizer_checkpoint_sha256,
        "text_tokenizer": template.text_tokenizer,
    }
    write_atomic(_part_path(out, i), (json.dumps(part, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def _remove_stale_temps(out: str, i: int) -> None:
    """Drop temp files a killed run left for shard i (write_atomic names them `.NAME.tmp-PID`)."""
    stem = shard_name(i)[: -len(".tar")]
    for directory, name in ((out, shard_name(i)), (os.path.join(out, PARTS_DIR), stem + ".json")):
        if os.path.isdir(directory):
            for f in os.listdir(directory):
                if f.startswith(f".{name}.tmp-"):
                    os.unlink(os.path.join(directory, f))


def merge_manifest(out: str, shards: Sequence[InputShard], template: Manifest) -> Manifest:
    """Build and write manifest.json from every shard's part record (input order).

    Raises:
        ValueError: a shard has no part record yet (run the extraction again to finish it).
    """
    manifest = Manifest(**{**template.__dict__, "shards": [], "skipped": []})
    missing = []
    for i, shard in enumerate(shards):
        part = _read_part(out, i, shard, template)
        if part is None:
            missing.append(shard.source)
            continue
        if part["num_samples"]:
            manifest.shards.append(ShardEntry(part["shard"], part["num_samples"]))
        manifest.skipped.extend(part["skipped"])
    if missing:
        raise ValueError(f"{len(missing)} input shard(s) are not extracted yet (first: {missing[0]!r}); "
                         "run the same extraction again to finish them")
    write_manifest(out, manifest)
    return manifest


def _skip(opts: ExtractOptions, entry: dict[str, str]) -> dict[str, str]:
    if opts.on_corrupt == "raise":
        where = entry["source"] + (f", sample {entry['key']!r}" if "key" in entry else "")
        raise ValueError(f"extract: unusable input {where}: {entry['reason']} "
                         "(pass --on-corrupt skip to skip and list such inputs in the manifest)")
    logger.warning("skipping %s%s: %s", entry["source"], f" sample {entry['key']}" if "key" in entry else "",
                   entry["reason"])
    return entry


def extract_tokens(opts: ExtractOptions, timings: Optional[dict] = None) -> Optional[Manifest]:
    """Run the extraction on this rank (all ranks of a launch call it).

    Args:
        timings: if given, filled with this rank's times in seconds (see `_timings`):
            setup_s, steady_s, steady_images, tail_s, total_s, images, steady_cpu_s, writer_cpu_s.

    Returns:
        The merged manifest on rank 0, None on the other ranks.

    Raises:
        ValueError: bad options, an output directory made by another run, or (with
            on_corrupt="raise") an unusable input.
        FileNotFoundError: a missing input or tokenizer directory.
    """
    from megadual.models.vision.tokenizer import DualTokenizer

    started = time.perf_counter()
    opts.check()
    rank, world, launch_device = _rank_world()
    device = torch.device(opts.device) if opts.device else (
        launch_device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    shards = list_input_shards(opts.inputs, opts.fmt, opts.folder_shard_size)
    tokenizer = DualTokenizer.from_pretrained(opts.tokenizer, map_location="cpu").to(device).eval()
    cfg = tokenizer.cfg
    if cfg.design == "dualtoken" and cfg.pixel_quantizer.depth != cfg.semantic_quantizer.depth:
        raise ValueError(f"token shards hold one depth R for both branches; this tokenizer has pixel depth "
                         f"{cfg.pixel_quantizer.depth} and semantic depth {cfg.semantic_quantizer.depth}")
    template = Manifest(
        tokenizer_checkpoint_sha256=directory_sha256(opts.tokenizer),
        text_tokenizer=text_tokenizer_id(opts.text_tokenizer),
        pixel_codebook_size=tokenizer.codebook("pixel").shape[-2],  # a "single" tokenizer's pixel codes are its one codebook's
        semantic_codebook_size=tokenizer.codebook("semantic").shape[-2],
        num_positions=tokenizer.grid_size ** 2,
        depth=cfg.semantic_quantizer.depth,
        shared_codes=cfg.design != "dualtoken",
    )
    os.makedirs(os.path.join(opts.out, PARTS_DIR), exist_ok=True)

    work: list[int] = []  # global index of each of this rank's unfinished shards
    for i in range(rank, len(shards), world):
        if _read_part(opts.out, i, shards[i], template) is None:
            _remove_stale_temps(opts.out, i)
            work.append(i)
    logger.info("rank %d/%d: %d input shard(s) to extract, %d already done", rank, world, len(work),
                len(range(rank, len(shards), world)) - len(work))
    loop = _run(opts, tokenizer, device, shards, work, template, rank, world) if work else None
    if world > 1:
        torch.distributed.barrier()
    manifest = merge_manifest(opts.out, shards, template) if rank == 0 else None
    if timings is not None:
        timings.update(_timings(started, loop, time.perf_counter()))
    if manifest is not None:
        logger.info("wrote %s: %d samples in %d shard(s), %d input(s) skipped", opts.out, manifest.num_samples,
                    len(manifest.shards), len(manifest.skipped))
    return manifest


def _timings(started: float, loop: Optional[dict], ended: float) -> dict:
    """Split a run's wall time into fixed costs and the steady state.

    setup_s: start -> first batch ready (model load, hashing, listing, worker start, first
    decode). steady_s / steady_images: from the first batch handed to the writer to the last,
    and the input samples encoded in between (the first batch's are not: its encode includes
    warm-up). tail_s: after the last encode (writing what is still queued, the barrier, the
    manifest). A run with nothing to do, or a single batch, has no steady state (steady_s 0).
    steady_cpu_s: the main thread's CPU seconds in the steady state (the forward and the
    hand-over of batches); writer_cpu_s: the writer thread's, whole run.
    """
    out = {"total_s": ended - started, "images": 0, "setup_s": ended - started, "steady_s": 0.0,
           "steady_images": 0, "tail_s": 0.0, "steady_cpu_s": 0.0, "writer_cpu_s": 0.0}
    if loop is None or loop["first_batch_at"] is None:
        return out
    out.update(images=loop["images"], setup_s=loop["first_batch_at"] - started,
               tail_s=ended - loop["last_encode_at"])
    if loop["images"] > loop["first_images"]:
        out.update(steady_s=loop["last_encode_at"] - loop["first_encoded_at"],
                   steady_images=loop["images"] - loop["first_images"], steady_cpu_s=loop["steady_cpu_s"])
    out["writer_cpu_s"] = loop["writer_cpu_s"]
    return out


def _run(opts: ExtractOptions, tokenizer, device: torch.device, shards: Sequence[InputShard], work: list[int],
         template: Manifest, rank: int, world: int) -> dict:
    """Index + decode (DataLoader workers) -> encode (here) -> write (writer thread); returns the loop's times."""
    from tqdm import tqdm

    dataset = ShardBatches([shards[i] for i in work], tokenizer.image_size, opts.text_tokenizer, opts.batch_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=opts.num_workers, collate_fn=ShardBatches.collate_fn,
        pin_memory=device.type == "cuda", prefetch_factor=4 if opts.num_workers else None,
        worker_init_fn=die_with_parent,
    )

    def finish(pos: int, samples, skipped: list[dict]) -> None:  # on the writer thread
        _finish_shard(opts.out, work[pos], shards[work[pos]], samples, skipped, template)

    bar = tqdm(unit="img", desc=f"extract (rank {rank}/{world})", disable=not opts.show_progress or rank != 0)
    try:
        times = encode_shards(loader, tokenizer, device, lambda entry: _skip(opts, entry), finish,
                              lambda pos: shards[work[pos]].source, bar.update)
    finally:
        bar.close()
    if times["first_batch_at"] is not None:
        elapsed = times["drained_at"] - times["first_batch_at"]
        logger.info("rank %d: %d images in %.1f s after the first batch (%.1f images/s)", rank, times["images"],
                    elapsed, times["images"] / max(elapsed, 1e-9))
    return times


def main(args) -> int:
    """`megadual extract --input PATH... --out DIR --tokenizer DIR [...]` (see megadual.cli)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opts = ExtractOptions(
        inputs=args.input, out=args.out, tokenizer=args.tokenizer, text_tokenizer=args.text_tokenizer,
        fmt=args.format, batch_size=args.batch_size, num_workers=args.num_workers,
        folder_shard_size=args.folder_shard_size, on_corrupt=args.on_corrupt, device=args.device,
        show_progress=not args.no_progress,
    )
    manifest = extract_tokens(opts)
    if manifest is not None:
        print(f"wrote {manifest.num_samples} samples in {len(manifest.shards)} shard(s) to {opts.out}; "
              f"{len(manifest.skipped)} input(s) skipped")
    return 0
