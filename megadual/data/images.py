"""Image input for tokenizer training: webdataset shards, image folders, or synthetic scenes.

Shapes: B batch, S image side; images are float32 [B, 3, S, S] in [-1, 1] (SigLIP's
normalisation: mean 0.5, std 0.5 per channel).

Every source becomes a map-style index of records, so a loader position is a few integers
(`shares.Split` and a count) and a resumed run reads exactly the batches an uninterrupted one would:

- webdataset shards (`.tar` files, or directories of them): members grouped by key (the name
  up to the first dot of the basename); an image member (jpg/jpeg/png/webp) makes a sample, a
  `.txt` its caption. Tars are read in place by member offset.
- folders: image files found recursively (sorted), captions from sidecar `NAME.txt`.
- synthetic: scenes rendered on the fly from (seed, index); no files.

Images are resized (shorter side to S, bicubic) and center-cropped to S x S. An image that
cannot be decoded is *corrupt*: by default it is skipped, counted and logged with its key (its
batch is then short by one); with `on_corrupt="raise"` it stops the run with a ValueError.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from megadual.config.schema import ImageDataConfig

from .shares import Split, continue_split
from .synthetic_images import synthetic_sample
from .workers import die_with_parent

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ImageRecord:
    """Where one sample's bytes live: a file, or a (tar, offset, size) member.

    Attributes:
        key: the sample's name in logs (shard path + key, or file path).
        path: the image file, or the tar holding it.
        offset, size: the member's data inside `path` (None for a plain file).
        caption: the caption, when already known.
        caption_member: (offset, size) of a `.txt` member to read lazily, or None.
        caption_path: a sidecar `.txt` file, or None.
    """

    key: str
    path: str
    offset: Optional[int] = None
    size: Optional[int] = None
    caption_member: Optional[tuple[int, int]] = None
    caption_path: Optional[str] = None


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's convention: key = directory + basename up to its first dot; ext = the rest."""
    directory, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return os.path.join(directory, stem) if directory else stem, ext.lower() if dot else ""


def _expand(paths: Sequence[str], suffixes: tuple[str, ...]) -> list[str]:
    out = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs.sort()
                out.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(suffixes))
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"images.paths: {p!r} does not exist")
    return out


class TarMember(NamedTuple):
    """A regular file inside a tar: its name and where its data lies."""

    name: str
    offset_data: int
    size: int


class TarDamage(NamedTuple):
    """Bytes of a tar shard that hold no readable member: the samples stored there are lost."""

    start: int
    end: int
    reason: str


_BLOCK = 512
_ZERO_CHUNK = bytes(1 << 16)
_USTAR_MAGIC = b"ustar\x0000"  # POSIX ustar magic + version, at bytes 257..264 of a header


def _padded(size: int) -> int:
    """A member's data size rounded up to whole tar blocks (where its next header starts)."""
    return -(-size // _BLOCK) * _BLOCK


def _plain_tar_members(f: BinaryIO, file_size: int) -> Optional[list[TarMember]]:
    """The members of a tar made only of POSIX ustar headers of files and directories, or None.

    The common case (tarfile, GNU tar and webdataset writers with short names) read in a few
    microseconds per member instead of tarfile's ~70. Anything else -- pax or GNU extension
    headers, other member types, a bad checksum, data past the end of the file -- returns
    None, and the caller asks tarfile, whose results (and errors) are then the answer.
    """
    members, offset = [], 0
    while True:
        f.seek(offset)
        header = f.read(_BLOCK)
        if len(header) < _BLOCK:
            return None
        if header == bytes(_BLOCK):
            # The end-of-archive blocks, if only zeros follow; a zeroed header inside: not plain.
            return members if _zeros_only(f, offset, file_size) and file_size - offset >= 2 * _BLOCK else None
        kind, magic = header[156:157], header[257:265]
        if magic != _USTAR_MAGIC or kind not in (b"0", b"5"):
            return None
        try:
            checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            return None
        if checksum != 256 + sum(header[:148]) + sum(header[156:]):  # the field counts as 8 spaces
            return None
        data = offset + _BLOCK
        if data + size > file_size:
            return None
        if kind == b"0":
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            members.append(TarMember(f"{prefix}/{name}" if prefix else name, data, size))
        offset = data + _padded(size)


def _zeros_only(f: BinaryIO, start: int, end: int) -> bool:
    """Whether bytes [start, end) of `f` are all zero (padding)."""
    f.seek(start)
    while start < end:
        chunk = f.read(min(len(_ZERO_CHUNK), end - start))
        if not chunk:
            return True
        if chunk != _ZERO_CHUNK[: len(chunk)]:
            return False
        start += len(chunk)
    return True


def _tolerant_tar_members(f: BinaryIO, file_size: int) -> tuple[list[TarMember], list[TarDamage]]:
    """Every member tarfile can read, past unreadable blocks (it skips them one at a time and
    resumes at the next valid header), and the ranges between members that held something.

    Raises:
        tarfile.ReadError: not a tar at all (no readable header anywhere).
    """
    members, damage = [], []
    expected = 0  # where the next header should start
    f.seek(0)
    tar = tarfile.open(fileobj=f, mode="r:", ignore_zeros=True)
    try:
        for m in tar:
            if m.offset > expected and not _zeros_only(f, expected, m.offset):
                damage.append(TarDamage(expected, m.offset, "unreadable tar header blocks (garbled)"))
            if m.offset_data + m.size > file_size:
                damage.append(TarDamage(m.offset, file_size, f"member {m.name!r} is cut short: "
                                        f"{file_size - m.offset_data} of its {m.size} bytes are there"))
                return members, damage
            if m.isfile():
                members.append(TarMember(m.name, m.offset_data, m.size))
            expected = m.offset_data + _padded(m.size) if m.isfile() else m.offset_data
    except tarfile.ReadError as exc:  # a broken extension header: nothing after it can be placed
        damage.append(TarDamage(expected, file_size, f"unreadable tar header ({exc})"))
        return members, damage
    finally:
        tar.close()
    if not _zeros_only(f, expected, file_size):
        if expected == 0:  # not one header anywhere: not a tar
            raise tarfile.ReadError(f"no readable tar header in its {file_size} bytes")
        damage.append(TarDamage(expected, file_size, "unreadable tar header blocks (garbled or cut)"))
    elif file_size - expected < 2 * _BLOCK:  # every tar writer ends with two zero blocks
        damage.append(TarDamage(expected, file_size, "the tar ends without its end-of-archive blocks (cut short)"))
    return members, damage


def tar_samples(shard: str) -> tuple[list[tuple[str, dict[str, TarMember]]], list[TarDamage]]:
    """Every readable sample of one tar shard, (key, {extension: member}) in member order, and
    the byte ranges of the shard that held members that could not be read (cut or garbled).

    Raises:
        ValueError: the file is not a tar at all.
    """
    with open(shard, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        members, damage = _plain_tar_members(f, size), []
        if members is None:
            try:
                members, damage = _tolerant_tar_members(f, size)
            except tarfile.TarError as exc:
                raise ValueError(f"images.paths: {shard} is not a readable tar shard ({exc}); "
                                 "remove or rebuild it") from exc
    samples: dict[str, dict[str, TarMember]] = {}
    for member in members:
        key, ext = _split_name(member.name)
        samples.setdefault(key, {})[ext] = member
    return list(samples.items()), damage  # dicts keep first-seen order


def image_member(parts: dict[str, TarMember]) -> Optional[TarMember]:
    """The sample's image member (the first of IMAGE_EXTENSIONS present), or None."""
    return next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)


def index_shards(paths: Sequence[str]) -> list[ImageRecord]:
    """Records of every image sample in the given tar shards (files or directories of *.tar).

    Samples without an image member are left out (tokenizer training needs no caption);
    `megadual.pipeline.extract_inputs` lists such samples instead.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a shard is not a readable tar, or the paths hold no image sample.
    """
    records: list[ImageRecord] = []
    for shard in _expand(paths, (".tar",)):
        samples, damage = tar_samples(shard)
        for lost in damage:
            logger.warning("images.paths: %s, bytes %d-%d: %s; the samples stored there are left out",
                           shard, lost.start, lost.end, lost.reason)
        for key, parts in samples:
            image = image_member(parts)
            if image is None:
                continue
            txt = parts.get("txt")
            records.append(ImageRecord(
                key=f"{shard}:{key}", path=shard, offset=image.offset_data, size=image.size,
                caption_member=(txt.offset_data, txt.size) if txt is not None else None,
            ))
    if not records:
        raise ValueError(f"images.paths: no image samples ({'/'.join(IMAGE_EXTENSIONS)}) in the shards under {list(paths)}")
    return records


def index_folder(paths: Sequence[str]) -> list[ImageRecord]:
    """Records of every image file under `paths` (recursive, sorted), with sidecar captions.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: no image files were found.
    """
    records = []
    for path in _expand(paths, tuple("." + e for e in IMAGE_EXTENSIONS)):
        sidecar = os.path.splitext(path)[0] + ".txt"
        records.append(ImageRecord(key=path, path=path, caption_path=sidecar if os.path.isfile(sidecar) else None))
    if not records:
        raise ValueError(f"images.paths: no image files ({'/'.join(IMAGE_EXTENSIONS)}) under {list(paths)}")
    return records


# --------------------------------------------------------------------------- decoding


def crop_uint8(image: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (bicubic) and center-crop: uint8 [size, size, 3] RGB."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    if (w, h) != (size, size):
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


def normalize(images: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """uint8 [..., S, S, 3] -> float32 [..., 3, S, S] in [-1, 1], on the input's device.

    A whole batch in one call is cheaper than image by image; on a GPU, moving uint8 there
    first also moves 4x fewer bytes.
    """
    if isinstance(images, np.ndarray):
        if not (images.flags.writeable and images.flags.c_contiguous):  # PIL's arrays are read-only views
            images = np.array(images, order="C")
        images = torch.from_numpy(images)
    return images.movedim(-1, -3).float().div_(127.5).sub_(1.0)


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` (bicubic), center-crop, scale to [-1, 1].

    Returns:
        float32 [3, size, size].
    """
    return normalize(crop_uint8(image, size))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float [..., 3, H, W] -> uint8 [..., H, W, 3] (clamped), for saving or metrics."""
    return images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).movedim(-3, -1)


class CorruptSample(NamedTuple):
    """A sample whose image could not be decoded."""

    key: str
    reason: str


class ImageSample(NamedTuple):
    image: torch.Tensor  # [3, S, S] float32 in [-1, 1]
    caption: str
    key: str


def read_image_bytes(rec: ImageRecord) -> bytes:
    """The encoded image bytes of a record (a whole file, or one member of a tar shard)."""
    return _read(rec.path, rec.offset, rec.size)


def _read(path: str, offset: Optional[int], size: Optional[int]) -> bytes:
    with open(path, "rb") as f:
        if offset is None:
            return f.read()
        f.seek(offset)
        return f.read(size)


class RecordDataset(torch.utils.data.Dataset):
    """Decodes records into `ImageSample`s, or `CorruptSample`s for unreadable images."""

    def __init__(self, records: Sequence[ImageRecord], image_size: int):
        self.records = list(records)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Union[ImageSample, CorruptSample]:
        rec = self.records[i]
        try:
            with Image.open(io.BytesIO(read_image_bytes(rec))) as img:
                img.load()  # decode now: a truncated file fails here, not later
                tensor = preprocess(img, self.image_size)
        except Exception as exc:  # noqa: BLE001 - any decoder failure makes the sample corrupt
            return CorruptSample(rec.key, f"{type(exc).__name__}: {exc}")
        caption = ""
        if rec.caption_member is not None:
            caption = _read(rec.path, *rec.caption_member).decode("utf-8", errors="replace").strip()
        elif rec.caption_path is not None:
            with open(rec.caption_path, encoding="utf-8", errors="replace") as f:
                caption = f.read().strip()
        return ImageSample(tensor, caption, rec.key)


class SyntheticDataset(torch.utils.data.Dataset):
    """The synthetic scenes (seed, 0..num-1) rendered at `image_size`."""

    def __init__(self, seed: int, num: int, image_size: int):
        self.seed, self.num, self.image_size = seed, num, image_size

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> ImageSample:
        image, caption, _ = synthetic_sample(self.seed, i, self.image_size)
        return ImageSample(preprocess(image, self.image_size), caption, f"synthetic:{self.seed}:{i}")


def build_image_dataset(cfg: ImageDataConfig, image_size: int) -> torch.utils.data.Dataset:
    """The dataset the `images` section describes, at `image_size` pixels."""
    if cfg.source == "synthetic":
        return SyntheticDataset(cfg.seed, cfg.num_samples, image_size)
    records = index_shards(cfg.paths) if cfg.source == "webdataset" else index_folder(cfg.paths)
    return RecordDataset(records, image_size)


def _collate(items: list) -> dict[str, Any]:
    good = [it for it in items if isinstance(it, ImageSample)]
    bad = [it for it in items if isinstance(it, CorruptSample)]
    return {
        "images": torch.stack([it.image for it in good]) if good else None,
        "captions": [it.caption for it in good],
        "keys": [it.key for it in good],
        "corrupt": [(it.key, it.reason) for it in bad],
    }


# --------------------------------------------------------------------------- the loader


class ImageBatchLoader:
    """Endless, resumable batches of one data-parallel rank's share of a dataset.

    Each epoch is a permutation drawn from (seed, epoch); the permutations of epoch after
    epoch form one endless sequence of samples that the ranks share round-robin
    (`shares.Split`: rank r takes samples r, r + world_size, ...). So the ranks' batches are
    disjoint, their union is what one process with world_size x batch_size would read, and a
    batch may run across an epoch's end.

    Args:
        dataset: a map-style dataset of `ImageSample` / `CorruptSample`.
        batch_size: images per batch on this rank (before corrupt ones are dropped).
        rank, world_size: this rank's place in the data-parallel group.
        seed: the shuffle seed.
        shuffle: permute each epoch (else dataset order).
        num_workers: DataLoader worker processes (0: decode here).
        on_corrupt: "skip" (count and log) or "raise" (ValueError naming the key).

    State (`state_dict`): the split, the samples this rank took from it, and the corrupt
    count so far; `load_global_state` continues every rank's position on another number of ranks.
    """

    def __init__(self, dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, num_workers: int = 0, on_corrupt: str = "skip"):
        if len(dataset) < batch_size * world_size:
            raise ValueError(
                f"the image dataset has {len(dataset)} samples, fewer than one global batch "
                f"({world_size} ranks x {batch_size}); add images or lower the micro batch size"
            )
        if on_corrupt not in ("skip", "raise"):
            raise ValueError(f"on_corrupt: got {on_corrupt!r}, expected 'skip' or 'raise'")
        self.dataset, self.batch_size = dataset, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.num_workers, self.on_corrupt = num_workers, on_corrupt
        self.split, self.taken, self.num_corrupt = Split(), 0, 0
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, its permutation)
        self._iter: Optional[Iterator] = None

    def _sample(self, g: int) -> int:
        """The dataset index of sample g of the endless sequence."""
        epoch, i = divmod(g, len(self.dataset))
        if self._order[0] != epoch:
            n = len(self.dataset)
            order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)).tolist()
                     if self.shuffle else list(range(n)))
            self._order = (epoch, order)
        return self._order[1][i]

    def _batches(self, split: Split, taken: int) -> Iterator[list[int]]:
        """This rank's batches of dataset indices, from its `taken`-th sample of `split` on."""
        while True:
            yield [self._sample(split.item(self.rank, self.world_size, taken + j)) for j in range(self.batch_size)]
            taken += self.batch_size

    def _start(self) -> Iterator:
        batches = self._batches(self.split, self.taken)
        if self.num_workers == 0:
            return (_collate([self.dataset[i] for i in b]) for b in batches)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches, num_workers=self.num_workers, collate_fn=_collate,
            persistent_workers=False, worker_init_fn=die_with_parent,
        )
        return iter(loader)

    def __iter__(self) -> "ImageBatchLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        """The next batch with at least one decodable image: images [B, 3, S, S], captions, keys,
        and `corrupt` [(key, reason)] of the images skipped in it."""
        skipped: list[tuple[str, str]] = []
        while True:
            if self._iter is None:
                self._iter = self._start()
            batch = next(self._iter)
            self.taken += self.batch_size
            for key, reason in batch["corrupt"]:
                if self.on_corrupt == "raise":
                    raise ValueError(f"corrupt image {key}: {reason} (set images.on_corrupt=skip to skip such images)")
                self.num_corrupt += 1
                logger.warning("skipping corrupt image %s: %s (%d skipped so far)", key, reason, self.num_corrupt)
            skipped.extend(batch["corrupt"])
            if batch["images"] is not None:
                batch["corrupt"] = skipped
                return batch

    def state_dict(self) -> dict:
        return {"split": self.split.to_state(), "world_size": self.world_size, "taken": self.taken,
                "num_corrupt": self.num_corrupt}

    def load_state_dict(self, state: dict) -> None:
        """Continue from this rank's own `state_dict()` (same number of ranks)."""
        if state["world_size"] != self.world_size:
            raise ValueError(f"loader state of a run with {state['world_size']} data-parallel ranks, this one has "
                             f"{self.world_size}; load every rank's state with load_global_state")
        self.split, self.taken, self.num_corrupt = Split.from_state(state["split"]), state["taken"], state["num_corrupt"]
        self._iter = None

    def load_global_state(self, states: list[dict]) -> None:
        """Continue after the positions of every data-parallel rank of a run (dp-rank order),
        saved with any number of ranks: each sample not yet read is read once, by one rank.
        The run's corrupt count goes to rank 0 (the trainer logs the sum over ranks)."""
        if "split" in states[0]:
            self.split = continue_split(states)
        else:  # written before the shared split: (epoch, batch) of every rank, the epoch cut to whole global batches
            epoch, position = max((s["epoch"], s["position"]) for s in states)
            self.split = Split(epoch * len(self.dataset) + position * self.batch_size * len(states))
        self.taken = 0
        self.num_corrupt = sum(s["num_corrupt"] for s in states) if self.rank == 0 else 0
        self._iter = None
