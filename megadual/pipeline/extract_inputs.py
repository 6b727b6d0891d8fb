"""Raw inputs of token extraction: which input shards there are, and which samples each holds.

An *input shard* is the unit of work and of resume: one webdataset tar, or one chunk of
`folder_shard_size` consecutive (sorted) image files of a folder. Each input shard becomes
exactly one output token shard. Indexing a shard (`index`) and decoding its samples happen in
DataLoader workers (`extract_batches.py`), so the tokenizer forward in the main process is the
bottleneck.

A usable sample has an image and a non-empty caption. Samples that lack one (a caption with no
image, an image with no caption, a key with neither) are found while indexing and returned as
*skipped* entries {"source", "key", "reason"}; an empty caption is found when it is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

from megadual.data.images import IMAGE_EXTENSIONS, ImageRecord, image_member, index_folder, tar_samples

FORMATS = ("auto", "webdataset", "folder")


@dataclass(frozen=True)
class InputShard:
    """One unit of work.

    Attributes:
        source: how the manifest names it (tar path relative to its input root, or
            "<folder>[first..last]").
        path: the tar file (None for a folder chunk).
        records: the folder chunk's records (None for a tar: indexed lazily by `index`).
    """

    source: str
    path: Optional[str] = None
    records: Optional[tuple[ImageRecord, ...]] = None
    root: Optional[str] = None  # the folder a chunk's records are named relative to
    orphan_captions: tuple[str, ...] = ()  # a folder chunk's NAME.txt files with no image NAME.<ext>


def _is_tar_input(path: str) -> bool:
    if os.path.isfile(path):
        return path.endswith(".tar")
    for _, _, files in os.walk(path):
        if any(f.endswith(".tar") for f in files):
            return True
    return False


def _rel(path: str, root: str) -> str:
    base = root if os.path.isdir(root) else os.path.dirname(root)
    return os.path.relpath(path, base) if base else path


def list_input_shards(paths: Sequence[str], fmt: str = "auto", folder_shard_size: int = 1000) -> list[InputShard]:
    """Every input shard under `paths`, in a deterministic order (the order of `paths`, then sorted).

    Args:
        paths: tar files, directories of tars, or image folders (with sidecar NAME.txt captions).
        fmt: "webdataset", "folder", or "auto" (webdataset when a path is or holds a .tar).
        folder_shard_size: images per input shard of a folder.

    Raises:
        ValueError: an unknown format, a non-positive shard size, or no inputs.
        FileNotFoundError: a path does not exist.
    """
    if fmt not in FORMATS:
        raise ValueError(f"extract --format: got {fmt!r}, expected one of {FORMATS}")
    if folder_shard_size < 1:
        raise ValueError(f"extract --folder-shard-size must be positive, got {folder_shard_size}")
    shards: list[InputShard] = []
    for root in paths:
        if not os.path.exists(root):
            raise FileNotFoundError(f"extract --input: {root!r} does not exist")
        kind = fmt if fmt != "auto" else ("webdataset" if _is_tar_input(root) else "folder")
        if kind == "webdataset":
            tars = [root] if os.path.isfile(root) else sorted(
                os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".tar"))
            shards.extend(InputShard(source=_rel(t, root), path=t) for t in tars)
        else:
            records = index_folder([root])
            orphans = _orphan_captions(root, records, folder_shard_size)
            starts = list(range(0, len(records), folder_shard_size))
            for start in starts:
                chunk = tuple(records[start:start + folder_shard_size])
                name = os.path.basename(os.path.normpath(root))
                shards.append(InputShard(
                    source=f"{name}[{_rel(chunk[0].path, root)}..{_rel(chunk[-1].path, root)}]", records=chunk,
                    root=root if os.path.isdir(root) else os.path.dirname(root),
                    orphan_captions=tuple(orphans.get(start, ()))))
    if not shards:
        raise ValueError(f"extract --input: no .tar shards or image files ({'/'.join(IMAGE_EXTENSIONS)}) under {list(paths)}")
    return shards


def sample_key(name: str) -> str:
    """A webdataset-safe key for an input sample name ('.' and '/' split names there)."""
    return name.replace("/", "__").replace(".", "_") or "_"


def _orphan_captions(root: str, records: Sequence[ImageRecord], chunk: int) -> dict[int, list[str]]:
    """Caption files under a folder with no image of the same name, by the chunk that lists them.

    The folder is walked in `index_folder`'s order; an orphan belongs to the chunk of the last
    image walked before it (the first chunk if none was), so each is listed exactly once.
    Returns {index of the chunk's first record: [caption paths]}.
    """
    if not os.path.isdir(root):
        return {}
    position = {r.path: i for i, r in enumerate(records)}
    stems = {os.path.splitext(r.path)[0] for r in records}
    last = 0
    out: dict[int, list[str]] = {}
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            path = os.path.join(d, f)
            if path in position:
                last = position[path]
            elif f.endswith(".txt") and os.path.splitext(path)[0] not in stems:
                out.setdefault(last - last % chunk, []).append(path)
    return out


def _members(parts: dict) -> str:
    return ", ".join("." + e if e else "(no extension)" for e in parts)


def _missing(parts: dict) -> str:
    """Why a tar sample is unusable, or "" if it has an image and a caption."""
    image, caption = image_member(parts) is not None, "txt" in parts
    if image and caption:
        return ""
    if image:
        return f"no caption: the sample has {_members(parts)} but no .txt member"
    if caption:
        return f"no image: the sample has {_members(parts)} but no {'/'.join(IMAGE_EXTENSIONS)} member"
    return f"no image and no caption: the sample has only {_members(parts)}"


def index(shard: InputShard) -> tuple[list[tuple[str, str, ImageRecord]], list[dict[str, str]]]:
    """The usable samples of `shard`, and the unusable ones.

    Returns:
        (samples, skipped): samples are (output key, source key, record), in input order;
        skipped are {"source", "key", "reason"} manifest entries for samples without an
        image or a caption, and for byte ranges of a cut or garbled tar (key "TAR:bytes A-B").
        The source key is relative to the input (tar basename + key, or the file path
        relative to its folder), so it does not depend on where the inputs were mounted.

    Raises:
        ValueError: the tar cannot be read or holds no sample at all (the caller lists the
            whole shard as skipped).
    """
    out, skipped = [], []
    if shard.path is not None:
        tar = os.path.basename(shard.path)
        groups, damage = tar_samples(shard.path)
        if not groups and not damage:
            raise ValueError(f"{shard.source} holds no samples (an empty tar)")
        for lost in damage:  # a range, not a key: what was stored there cannot be named
            skipped.append({"source": shard.source, "key": f"{tar}:bytes {lost.start}-{lost.end}",
                            "reason": f"{lost.reason}; the samples stored there are lost"})
        for name, parts in groups:
            reason = _missing(parts)
            if reason:
                skipped.append({"source": shard.source, "key": f"{tar}:{name}", "reason": reason})
                continue
            image, txt = image_member(parts), parts["txt"]
            rec = ImageRecord(key=f"{shard.path}:{name}", path=shard.path, offset=image.offset_data, size=image.size,
                              caption_member=(txt.offset_data, txt.size))
            out.append((sample_key(name), f"{tar}:{name}", rec))
    else:
        assert shard.records is not None and shard.root is not None
        base = shard.root
        unusable = [(rec.path, "no caption: no sidecar NAME.txt next to the image")
                    for rec in shard.records if rec.caption_path is None]
        unusable += [(path, f"no image: a caption file with no NAME.{'/'.join(IMAGE_EXTENSIONS)} next to it")
                     for path in shard.orphan_captions]
        for path, reason in sorted(unusable):
            skipped.append({"source": shard.source, "key": os.path.relpath(path, base), "reason": reason})
        for rec in shard.records:
            if rec.caption_path is not None:
                name = os.path.splitext(os.path.relpath(rec.path, base))[0]
                out.append((sample_key(name), os.path.relpath(rec.path, base), rec))
    seen: dict[str, int] = {}
    unique = []
    for key, source, rec in out:  # two names can sanitise to one key: keep both, numbered
        n = seen.get(key, 0)
        seen[key] = n + 1
        unique.append((key if n == 0 else f"{key}_{n}", source, rec))
    return unique, skipped
