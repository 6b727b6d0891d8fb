"""Token shard schema: one pre-tokenized image-caption sample, its tar encoding, the manifest.

Legend: T visual positions per image (27*27 = 729 at 384 px), R residual depth, K codebook size.

A token shard is a plain webdataset tar: the files of one sample are consecutive members
named `<key>.<field>`. The fields (SCHEMA_VERSION 1, documented in docs/token_shards.md):

    <key>.txt                 caption, UTF-8
    <key>.text_ids.npy        int32 [L] caption token ids, no special tokens
    <key>.pixel_codes.npy     uint16 [T, R] pixel RQ codes, each < manifest pixel_codebook_size
    <key>.semantic_codes.npy  uint16 [T, R] semantic RQ codes, each < manifest semantic_codebook_size
    <key>.codes.npy           uint16 [T, R], instead of the two above when the manifest says
                              `shared_codes` (a "tokenflow" tokenizer's shared index, or a "single"
                              one's codes): pixel and semantic codes are the same indices
    <key>.json                {"schema_version": 1, "image_size": [h, w], "source_key": "..."}

Each output directory holds `manifest.json` (see `Manifest`). This module is the schema and
its validation only; writing lives in `shard_writer.py`, sequential reading in `shard_reader.py`.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

FIELD_CAPTION = "txt"
FIELD_TEXT_IDS = "text_ids.npy"
FIELD_PIXEL = "pixel_codes.npy"
FIELD_SEMANTIC = "semantic_codes.npy"
FIELD_CODES = "codes.npy"
FIELD_META = "json"
FIELDS = (FIELD_CAPTION, FIELD_TEXT_IDS, FIELD_PIXEL, FIELD_SEMANTIC, FIELD_META)
SHARED_FIELDS = (FIELD_CAPTION, FIELD_TEXT_IDS, FIELD_CODES, FIELD_META)


class TokenShardError(ValueError):
    """A token shard or one of its samples is unusable.

    The message names the shard and (when known) the sample key, what is wrong, and the fix.
    The loader's `on_error` switch decides whether it is raised or counted and skipped.
    """

    def __init__(self, shard: str, key: str | None, problem: str, fix: str = "re-extract this shard"):
        self.shard, self.key, self.problem = shard, key, problem
        where = f"token shard {shard}" + (f", sample {key!r}" if key is not None else "")
        super().__init__(f"{where}: {problem}; {fix}")


@dataclass
class TokenSample:
    """One image-caption pair in token form.

    Shapes:
        text_ids: int32 [L]; pixel_codes, semantic_codes: uint16 [T, R].
    """

    key: str
    caption: str
    text_ids: np.ndarray
    pixel_codes: np.ndarray
    semantic_codes: np.ndarray
    image_size: tuple[int, int]  # (height, width) of the source image in pixels
    source_key: str


@dataclass
class ShardEntry:
    """One shard of a manifest: file name relative to the manifest's directory."""

    name: str
    num_samples: int


@dataclass
class Manifest:
    """What a token shard directory holds and how it was made.

    `skipped` lists inputs the extraction could not use: dicts with at least "source" and
    "reason" (and "key" when a single sample was bad).
    """

    tokenizer_checkpoint_sha256: str
    text_tokenizer: str
    pixel_codebook_size: int
    semantic_codebook_size: int
    num_positions: int  # T
    depth: int  # R
    shards: list[ShardEntry] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    shared_codes: bool = False  # one index array per sample (codes.npy) for both streams

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def to_json(self) -> str:
        data = asdict(self)
        data["num_samples"] = self.num_samples  # informative; recomputed on load
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        """Parse and check a manifest; `where` names it in errors.

        Raises:
            TokenShardError: unreadable JSON, a schema version other than SCHEMA_VERSION, or
                a missing / mistyped field. Always raised, whatever `on_error` says: a bad
                manifest makes the whole directory unusable.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TokenShardError(where, None, f"manifest is not valid JSON ({exc})") from None
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise TokenShardError(
                where,
                None,
                f"manifest schema_version is {version!r}, this reader understands {SCHEMA_VERSION}",
                "re-extract with this version of megadual or read it with the version that wrote it",
            )
        data.pop("num_samples", None)
        try:
            data["shards"] = [ShardEntry(**s) for s in data.get("shards", [])]
            manifest = cls(**data)
        except TypeError as exc:
            raise TokenShardError(where, None, f"manifest fields do not match schema {SCHEMA_VERSION} ({exc})") from None
        for name in ("pixel_codebook_size", "semantic_codebook_size", "num_positions", "depth"):
            value = getattr(manifest, name)
            if not isinstance(value, int) or value < 1:
                raise TokenShardError(where, None, f"manifest {name} is {value!r}, expected a positive integer")
        if max(manifest.pixel_codebook_size, manifest.semantic_codebook_size) > 65536:
            raise TokenShardError(where, None, "codebooks larger than 65536 do not fit the uint16 code arrays")
        return manifest


def read_manifest(directory: str) -> Manifest:
    """Load `<directory>/manifest.json`.

    Raises:
        TokenShardError: missing or invalid manifest (see `Manifest.from_json`).
    """
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isdir(directory):
        raise TokenShardError(directory, None, "does not exist" if not os.path.exists(directory) else "is not a directory",
                              "point the loader at an extraction output directory")
    if not os.path.exists(path):
        raise TokenShardError(
            directory, None, f"no {MANIFEST_NAME} in the directory", "point the loader at an extraction output directory"
        )
    with open(path, encoding="utf-8") as f:
        return Manifest.from_json(f.read(), path)


def check_key(key: str) -> None:
    """Raise ValueError if `key` cannot name a webdataset sample (a dot or slash would split it)."""
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'; webdataset splits names there")


_NPY_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}  # (dtype, shape) -> np.save's header
_MAX_NPY_HEADERS = 4096


def _npy_bytes(array: np.ndarray) -> bytes:
    """np.save's bytes of a C-contiguous array: the header depends on dtype and shape alone, so
    it is made by np.save once per (dtype, shape) and reused (extraction encodes ~5 arrays per image)."""
    key = (array.dtype.str, array.shape)
    header = _NPY_HEADERS.get(key)
    if header is not None and array.flags.c_contiguous:
        return header + array.tobytes()
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    data = buf.getvalue()
    if array.flags.c_contiguous and len(_NPY_HEADERS) < _MAX_NPY_HEADERS:
        _NPY_HEADERS[key] = data[: len(data) - array.nbytes]
    return data


def encode_sample(sample: TokenSample, shared_codes: bool = False) -> dict[str, bytes]:
    """The tar member payloads of one sample, keyed by field name (deterministic bytes).

    With `shared_codes` the sample's pixel and semantic codes are one index array, stored once
    (codes.npy).

    Raises:
        ValueError: a bad key, codes that are not 2-D / do not fit uint16, or (shared_codes)
            pixel and semantic codes that differ.
    """
    check_key(sample.key)
    codes = {}
    if shared_codes:
        if not np.array_equal(sample.pixel_codes, sample.semantic_codes):
            raise ValueError(f"sample {sample.key!r}: shared_codes needs equal pixel and semantic codes (one index)")
        pairs = ((FIELD_CODES, sample.pixel_codes),)
    else:
        pairs = ((FIELD_PIXEL, sample.pixel_codes), (FIELD_SEMANTIC, sample.semantic_codes))
    for name, array in pairs:
        array = np.asarray(array)
        if array.ndim != 2:
            raise ValueError(f"sample {sample.key!r}: {name} must be [T, R], got shape {array.shape}")
        if array.size and array.dtype != np.uint16 and (array.min() < 0 or array.max() > 65535):
            raise ValueError(f"sample {sample.key!r}: {name} holds values outside uint16 [0, 65535]")
        codes[name] = _npy_bytes(np.ascontiguousarray(array, dtype=np.uint16))
    meta = {
        "schema_version": SCHEMA_VERSION,
        "image_size": [int(sample.image_size[0]), int(sample.image_size[1])],
        "source_key": sample.source_key,
    }
    return {
        FIELD_CAPTION: sample.caption.encode("utf-8"),
        FIELD_TEXT_IDS: _npy_bytes(np.ascontiguousarray(np.asarray(sample.text_ids).reshape(-1), dtype=np.int32)),
        **codes,
        FIELD_META: json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def _load_npy(data: bytes, shard: str, key: str, name: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError/EOFError/... for a damaged header
        raise TokenShardError(shard, key, f"field {name} is not a readable .npy array ({exc})") from None


def decode_sample(files: dict[str, bytes], shard: str, key: str, manifest: Manifest) -> TokenSample:
    """Decode and validate one sample's files against the manifest.

    Args:
        files: field name -> payload, as read from the tar.
        shard, key: where the sample came from (named in every error).
        manifest: gives the codebook sizes and the [T, R] code shape.

    Returns:
        The sample, arrays as stored (codes uint16 [T, R], text ids int32 [L]).

    Raises:
        TokenShardError: missing field, wrong schema version, wrong shape or dtype, or a code
            >= its codebook size.
    """
    missing = [f for f in (SHARED_FIELDS if manifest.shared_codes else FIELDS) if f not in files]
    if missing:
        raise TokenShardError(shard, key, f"missing field(s) {missing} (present: {sorted(files)})")
    try:
        meta = json.loads(files[FIELD_META].decode("utf-8"))
        caption = files[FIELD_CAPTION].decode("utf-8")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenShardError(shard, key, f"caption or json field is not valid UTF-8/JSON ({exc})") from None
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise TokenShardError(
            shard,
            key,
            f"schema_version is {meta.get('schema_version')!r}, this reader understands {SCHEMA_VERSION}",
            "re-extract with this version of megadual",
        )
    try:
        image_size = (int(meta["image_size"][0]), int(meta["image_size"][1]))
        source_key = str(meta["source_key"])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise TokenShardError(shard, key, f"json field lacks image_size [h, w] or source_key ({exc!r})") from None

    text_ids = _load_npy(files[FIELD_TEXT_IDS], shard, key, FIELD_TEXT_IDS)
    if text_ids.ndim != 1 or not np.issubdtype(text_ids.dtype, np.integer):
        raise TokenShardError(shard, key, f"text_ids must be a 1-D integer array, got {text_ids.dtype} {text_ids.shape}")
    expected_shape = (manifest.num_positions, manifest.depth)
    arrays = {}
    if manifest.shared_codes:  # one index: bounded by both codebooks (equal for tokenflow and single)
        fields = ((FIELD_CODES, min(manifest.pixel_codebook_size, manifest.semantic_codebook_size)),)
    else:
        fields = ((FIELD_PIXEL, manifest.pixel_codebook_size), (FIELD_SEMANTIC, manifest.semantic_codebook_size))
    for name, size in fields:
        codes = _load_npy(files[name], shard, key, name)
        if codes.dtype != np.uint16 or codes.shape != expected_shape:
            raise TokenShardError(
                shard, key, f"{name} is {codes.dtype} {codes.shape}, the manifest says uint16 {expected_shape}"
            )
        top = int(codes.max()) if codes.size else 0
        if top >= size:
            raise TokenShardError(
                shard,
                key,
                f"{name} holds code {top}, outside the codebook of {size} codes",
                "the shard was extracted with another tokenizer or is corrupt; re-extract it",
            )
        arrays[name] = codes
    return TokenSample(
        key=key,
        caption=caption,
        text_ids=text_ids.astype(np.int32, copy=False),
        pixel_codes=arrays.get(FIELD_PIXEL, arrays.get(FIELD_CODES)),
        semantic_codes=arrays.get(FIELD_SEMANTIC, arrays.get(FIELD_CODES)),
        image_size=image_size,
        source_key=source_key,
    )
