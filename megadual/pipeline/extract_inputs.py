"""Raw inputs of token extraction: which input shards there are, and decoding their samples.

Shapes: S image side; an image is float32 [3, S, S] in [-1, 1] (see megadual.data.images).

An *input shard* is the unit of work and of resume: one webdataset tar, or one chunk of
`folder_shard_size` consecutive (sorted) image files of a folder. Each input shard becomes
exactly one output token shard. Decoding happens in DataLoader workers (`InputDataset`), so
the tokenizer forward in the main process is the bottleneck; a sample that cannot be decoded
comes back as an item with `image=None` and the reason, never an exception.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from megadual.data.images import IMAGE_EXTENSIONS, ImageRecord, index_folder, index_shards, preprocess
from megadual.data.text_tokenizers import load_text_tokenizer

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
            for start in range(0, len(records), folder_shard_size):
                chunk = tuple(records[start:start + folder_shard_size])
                name = os.path.basename(os.path.normpath(root))
                shards.append(InputShard(
                    source=f"{name}[{_rel(chunk[0].path, root)}..{_rel(chunk[-1].path, root)}]", records=chunk,
                    root=root if os.path.isdir(root) else os.path.dirname(root)))
    if not shards:
        raise ValueError(f"extract --input: no .tar shards or image files ({'/'.join(IMAGE_EXTENSIONS)}) under {list(paths)}")
    return shards


def sample_key(name: str) -> str:
    """A webdataset-safe key for an input sample name ('.' and '/' split names there)."""
    return name.replace("/", "__").replace(".", "_") or "_"


def index(shard: InputShard) -> list[tuple[str, str, ImageRecord]]:
    """(output key, source key, record) of every image sample of `shard`.

    The source key is relative to the input (tar basename + key, or the file path relative to
    its folder), so it does not depend on where the inputs were mounted.

    Raises:
        ValueError: the tar cannot be read or holds no image sample (the caller lists the
            whole shard as skipped).
    """
    out = []
    if shard.path is not None:
        for rec in index_shards([shard.path]):
            name = rec.key[len(shard.path) + 1:]  # index_shards names a sample "<shard>:<key>"
            out.append((sample_key(name), f"{os.path.basename(shard.path)}:{name}", rec))
    else:
        assert shard.records is not None and shard.root is not None
        base = shard.root
        for rec in shard.records:
            name = os.path.splitext(os.path.relpath(rec.path, base))[0]
            out.append((sample_key(name), os.path.relpath(rec.path, base), rec))
    seen: dict[str, int] = {}
    unique = []
    for key, source, rec in out:  # two names can sanitise to one key: keep both, numbered
        n = seen.get(key, 0)
        seen[key] = n + 1
        unique.append((key if n == 0 else f"{key}_{n}", source, rec))
    return unique


@dataclass
class InputItem:
    """A decoded sample, or a corrupt one (image None, `reason` set)."""

    shard: int  # position of its shard in this rank's work list
    key: str
    source_key: str
    image: Optional[torch.Tensor]  # [3, S, S] float32 in [-1, 1]
    image_size: tuple[int, int]  # source (height, width)
    caption: str
    text_ids: list[int]
    reason: str = ""


def _read(path: str, offset: Optional[int], size: Optional[int]) -> bytes:
    with open(path, "rb") as f:
        if offset is None:
            return f.read()
        f.seek(offset)
        data = f.read(size)
    if size is not None and len(data) != size:
        raise EOFError(f"member needs {size} bytes, the tar ends after {len(data)} (truncated shard)")
    return data


class InputDataset(torch.utils.data.Dataset):
    """Flat list of (shard position, key, source key, record): decodes image, caption and text ids.

    Args:
        items: the samples of this rank's pending shards, in output order.
        image_size: S, the tokenizer's input side.
        text_tokenizer: spec for `load_text_tokenizer` ("bytes" or a local HF directory);
            loaded lazily so each DataLoader worker builds its own.
    """

    def __init__(self, items: Sequence[tuple[int, str, str, ImageRecord]], image_size: int, text_tokenizer: str):
        self.items, self.image_size, self.text_spec = list(items), image_size, text_tokenizer
        self._text: Any = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> InputItem:
        shard, key, source_key, rec = self.items[i]
        try:
            with Image.open(io.BytesIO(_read(rec.path, rec.offset, rec.size))) as img:
                img.load()  # decode now: a truncated image fails here
                size = (img.height, img.width)
                image = preprocess(img, self.image_size)
        except Exception as exc:  # noqa: BLE001 - any decoder failure makes the sample corrupt
            return InputItem(shard, key, source_key, None, (0, 0), "", [], f"{type(exc).__name__}: {exc}")
        caption = ""
        try:
            if rec.caption_member is not None:
                caption = _read(rec.path, *rec.caption_member).decode("utf-8", errors="replace").strip()
            elif rec.caption_path is not None:
                with open(rec.caption_path, encoding="utf-8", errors="replace") as f:
                    caption = f.read().strip()
        except OSError as exc:
            return InputItem(shard, key, source_key, None, size, "", [], f"caption unreadable: {exc}")
        if self._text is None:
            self._text = load_text_tokenizer(self.text_spec)
        return InputItem(shard, key, source_key, image, size, caption, self._text.encode(caption))


@dataclass
class InputBatch:
    """One batch as a worker hands it over.

    Attributes:
        items: every sample of the batch, corrupt ones included, their `image` cleared.
        images: [B', 3, S, S] the decodable images, in `items` order (None if there is none):
            stacked in the worker so one shared-memory tensor crosses the process boundary.
        good: indices into `items` of the rows of `images`.
    """

    items: list[InputItem]
    images: Optional[torch.Tensor]
    good: list[int]


def collate(items: list[InputItem]) -> InputBatch:
    """Stack the decodable images of a batch (runs in the DataLoader worker)."""
    good = [j for j, it in enumerate(items) if it.image is not None]
    images = torch.stack([items[j].image for j in good]) if good else None
    for it in items:
        it.image = None
    return InputBatch(items, images, good)
