"""Writing token shards and their manifest atomically.

Legend: T visual positions, R residual depth.

Every file is written to a temporary name in the same directory, flushed to disk and then
renamed over the final name (`os.replace` is atomic on POSIX), so a crash leaves either the
finished file or none, never half of one: a rerun can trust any shard whose name exists.
Tar members carry fixed metadata (mtime 0, uid/gid 0, mode 0444), so the same samples give
byte-identical shards on every run.
"""

from __future__ import annotations

import os
import tarfile
from typing import Iterable

from megadual.fs import write_atomic

from .token_shards import MANIFEST_NAME, Manifest, ShardEntry, TokenSample, check_key, encode_sample


def _member_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


# A member's ustar header differs from every other's only in name (bytes 0..100), size
# (124..136) and checksum (148..156); the rest comes from one header tarfile made.
_TEMPLATE = _member_info("x", 0).tobuf(tarfile.PAX_FORMAT)  # one 512-byte ustar block
_MIDDLE, _TAIL = _TEMPLATE[100:124], _TEMPLATE[156:]
_FIXED_SUM = sum(_MIDDLE) + sum(_TEMPLATE[136:148]) + 8 * ord(" ") + sum(_TAIL)  # the checksum field counts as spaces
_MAX_SIZE = 8 ** 11  # sizes from here on need a pax record


def _ustar_header(name: bytes, size: int) -> bytes:
    size_field = b"%011o\0" % size
    checksum = _FIXED_SUM + sum(name) + sum(size_field)
    return b"".join((name.ljust(100, b"\0"), _MIDDLE, size_field, _TEMPLATE[136:148], b"%06o\0 " % checksum, _TAIL))


class TarBuilder:
    """A tar built in memory member by member: the bytes of `tarfile` in PAX format.

    Members carry fixed metadata (mtime 0, uid/gid 0, mode 0444), so equal members give equal
    bytes. Headers of short ASCII names are assembled from one template header, several
    times faster than `tarfile` (the hot path of extraction); any other name goes through
    `tarfile` itself. tests/data/test_token_shards.py checks the bytes against `tarfile`.
    """

    def __init__(self):
        self._chunks: list[bytes] = []
        self._size = 0

    def add(self, name: str, payload: bytes) -> None:
        if len(name) <= 100 and name.isascii() and len(payload) < _MAX_SIZE:
            header = _ustar_header(name.encode("ascii"), len(payload))
        else:
            header = _member_info(name, len(payload)).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
        pad = -len(payload) % tarfile.BLOCKSIZE
        self._chunks += (header, payload, bytes(pad))
        self._size += len(header) + len(payload) + pad

    def getvalue(self) -> bytes:
        """The finished archive: two zero blocks, then zeros up to a whole 10240-byte record."""
        end = 2 * tarfile.BLOCKSIZE
        end += -(self._size + end) % tarfile.RECORDSIZE
        return b"".join(self._chunks) + bytes(end)


def tar_bytes(samples: Iterable[tuple[str, dict[str, bytes]]]) -> bytes:
    """A webdataset tar of (key, {field: payload}) samples, members in the given order.

    Fields are written in sorted order so a sample's files are consecutive and the bytes do
    not depend on dict order.
    """
    tar = TarBuilder()
    for key, files in samples:
        check_key(key)
        for name in sorted(files):
            tar.add(f"{key}.{name}", files[name])
    return tar.getvalue()


class ShardBuilder:
    """One token shard assembled sample by sample, then written atomically.

        shard = ShardBuilder()
        for sample in samples: shard.add(sample)     # encodes now
        entry = shard.write("out/tokens-000003.tar")

    Raises (add):
        ValueError: a key already in the shard, a malformed key, or codes that do not fit uint16.
    """

    def __init__(self, shared_codes: bool = False):
        self._tar = TarBuilder()
        self._keys: set[str] = set()
        self.shared_codes = shared_codes  # store one index array per sample (see token_shards.py)

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, sample: TokenSample) -> None:
        if sample.key in self._keys:
            raise ValueError(f"key {sample.key!r} appears twice; keys must be unique within a shard")
        files = encode_sample(sample, self.shared_codes)
        self._keys.add(sample.key)
        for name in sorted(files):
            self._tar.add(f"{sample.key}.{name}", files[name])

    def write(self, path: str) -> ShardEntry:
        """Store the shard at `path` (temp file + rename); returns its manifest entry."""
        write_atomic(path, self._tar.getvalue())
        return ShardEntry(name=os.path.basename(path), num_samples=len(self))


def write_shard(path: str, samples: list[TokenSample], shared_codes: bool = False) -> ShardEntry:
    """Encode `samples` into one tar at `path`, atomically (one code array each with `shared_codes`).

    Returns:
        The manifest entry (file name and sample count).

    Raises:
        ValueError: a duplicate or malformed key, or codes that do not fit uint16.
    """
    shard = ShardBuilder(shared_codes)
    for sample in samples:
        try:
            shard.add(sample)
        except ValueError as exc:
            raise ValueError(f"shard {path}: {exc}") from None
    return shard.write(path)


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
            self.manifest.shards.append(write_shard(os.path.join(self.directory, name), self._pending,
                                                    self.manifest.shared_codes))
            self._pending = []

    def close(self) -> Manifest:
        """Write the last partial shard and the manifest; returns the manifest."""
        self._flush()
        write_manifest(self.directory, self.manifest)
        return self.manifest
