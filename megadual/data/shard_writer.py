"""Writing token shards and their manifest atomically.

Legend: T visual positions, R residual depth.

Every file is written to a temporary name in the same directory, flushed to disk and then
renamed over the final name (`os.replace` is atomic on POSIX), so a crash leaves either the
finished file or none, never half of one: a rerun can trust any shard whose name exists.
Tar members carry fixed metadata (mtime 0, uid/gid 0, mode 0444), so the same samples give
byte-identical shards on every run.
"""

from __future__ import annotations

import io
import os
import tarfile
from typing import Iterable

from .token_shards import MANIFEST_NAME, Manifest, ShardEntry, TokenSample, check_key, encode_sample


def write_atomic(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename (never a partial file)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def tar_bytes(samples: Iterable[tuple[str, dict[str, bytes]]]) -> bytes:
    """A webdataset tar of (key, {field: payload}) samples, members in the given order.

    Fields are written in sorted order so a sample's files are consecutive and the bytes do
    not depend on dict order.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for key, files in samples:
            check_key(key)
            for name in sorted(files):
                payload = files[name]
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o444
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def write_shard(path: str, samples: list[TokenSample]) -> ShardEntry:
    """Encode `samples` into one tar at `path`, atomically.

    Returns:
        The manifest entry (file name and sample count).

    Raises:
        ValueError: a duplicate or malformed key, or codes that do not fit uint16.
    """
    keys = [s.key for s in samples]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"shard {path}: key {dup!r} appears twice; keys must be unique within a shard")
    write_atomic(path, tar_bytes((s.key, encode_sample(s)) for s in samples))
    return ShardEntry(name=os.path.basename(path), num_samples=len(samples))


def write_manifest(directory: str, manifest: Manifest) -> str:
    """Write `<directory>/manifest.json` atomically; returns its path."""
    path = os.path.join(directory, MANIFEST_NAME)
    write_atomic(path, manifest.to_json().encode("utf-8"))
    return path


class TokenShardWriter:
    """Writes samples into numbered shards of `samples_per_shard`, then the manifest.

        writer = TokenShardWriter(out_dir, manifest_template, samples_per_shard=1000)
        for sample in samples: writer.add(sample)
        writer.skip(source="raw-0003.tar", key="img_17", reason="cannot decode JPEG")
        manifest = writer.close()

    Args:
        directory: output directory (created).
        template: a Manifest giving tokenizer hash, text tokenizer, codebook sizes and the
            [T, R] code shape; its `shards` and `skipped` are filled in here.
        samples_per_shard: samples per tar.
        prefix: shard file names are `<prefix>-000000.tar`, ...
    """

    def __init__(self, directory: str, template: Manifest, samples_per_shard: int = 1000, prefix: str = "shard"):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
        os.makedirs(directory, exist_ok=True)
        self.directory, self.samples_per_shard, self.prefix = directory, samples_per_shard, prefix
        self.manifest = Manifest(**{**template.__dict__, "shards": [], "skipped": list(template.skipped)})
        self._pending: list[TokenSample] = []

    def add(self, sample: TokenSample) -> None:
        """Queue a sample; a full shard is written at once."""
        shape = (self.manifest.num_positions, self.manifest.depth)
        for name in ("pixel_codes", "semantic_codes"):
            if tuple(getattr(sample, name).shape) != shape:
                raise ValueError(
                    f"sample {sample.key!r}: {name} has shape {tuple(getattr(sample, name).shape)}, "
                    f"the manifest says {shape}"
                )
        self._pending.append(sample)
        if len(self._pending) == self.samples_per_shard:
            self._flush()

    def skip(self, source: str, reason: str, key: str | None = None) -> None:
        """Record an input that could not be used (listed in the manifest)."""
        self.manifest.skipped.append({"source": source, "reason": reason, **({"key": key} if key else {})})

    def _flush(self) -> None:
        if self._pending:
            name = f"{self.prefix}-{len(self.manifest.shards):06d}.tar"
            self.manifest.shards.append(write_shard(os.path.join(self.directory, name), self._pending))
            self._pending = []

    def close(self) -> Manifest:
        """Write the last partial shard and the manifest; returns the manifest."""
        self._flush()
        write_manifest(self.directory, self.manifest)
        return self.manifest
