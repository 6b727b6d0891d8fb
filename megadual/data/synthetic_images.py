"""Render the embedded synthetic scenes as images, and write them as webdataset shards.

Shapes: S image side in pixels; images are uint8 RGB [S, S, 3] (PIL) on disk.

A scene (megadual.data.scenes) names one shape, its colour and its side; `render_scene` draws
exactly that: the shape in the colour's RGB, centred in the left or right half, on the grey
background as a gentle gradient. A small per-index jitter of centre, size and gradient direction keeps any two
images of the same caption apart. Everything is a pure function of (seed, index, size):
`megadual synth-data` run twice writes byte-identical shards.

Shard layout (webdataset: members grouped by key, the part of the name before the first dot):

    OUT/shapes-000000.tar   00000000.png  00000000.txt  00000000.json  00000001.png ...
    OUT/manifest.json       {"num": N, "size": S, "seed": ..., "shards": [...]}

`.txt` is the caption, `.json` the labels (shape, colour, side) plus `unseen` (a combination training
never shows), the caption, seed, index and image_size: held-out checkers read them.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import tarfile
from typing import Optional

from PIL import Image, ImageDraw

from .scenes import BACKGROUND_RGB, COLOURS, SHAPES, Scene, describe, sample_scene

logger = logging.getLogger(__name__)

# Half-extent of a shape, fraction of the image side: 7-8 px at 32 px, so a shape spans four
# 4x4-pixel tokens and keeps its corners (smaller shapes blurred into blobs: docs/demo_tuning.md).
RADIUS = (0.22, 0.25)  # drawn uniformly per image
# Centre x of each side, fraction of the side: 10 and 22 px at 32 px, three tokens apart.
SIDE_X = {"left": 0.3125, "right": 0.6875}
JITTER = 0.03  # centre jitter, fraction of the side
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges
GRADIENT = 24  # background brightness swing across the image, in 8-bit levels


def _clip(v: float) -> int:
    return max(0, min(255, int(round(v))))


def _background(size: int, rgb: tuple[int, int, int], rng: random.Random) -> Image.Image:
    """A linear brightness gradient around `rgb` in a random direction."""
    angle = rng.uniform(0.0, 2.0 * math.pi)
    dx, dy = math.cos(angle), math.sin(angle)
    # A 2x2 image stretched bilinearly is a linear gradient at any size, cheaply.
    corners = Image.new("RGB", (2, 2))
    for y in range(2):
        for x in range(2):
            shift = GRADIENT * ((x - 0.5) * dx + (y - 0.5) * dy)
            corners.putpixel((x, y), tuple(_clip(c + shift) for c in rgb))
    return corners.resize((size, size), Image.BILINEAR)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> Optional[list[tuple[float, float]]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
        return points
    if shape == "cross":
        t = r * 0.38
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    return None


def shape_placement(scene: Scene, size: int, seed: int, index: int) -> tuple[float, float, float]:
    """Pixel centre (x, y) and half-extent of the shape `render_scene(scene, size, seed, index)` draws."""
    rng = random.Random(f"render:{seed}:{index}")
    jx, jy = rng.uniform(-JITTER, JITTER), rng.uniform(-JITTER, JITTER)
    return (SIDE_X[scene.side] + jx) * size, (0.5 + jy) * size, rng.uniform(*RADIUS) * size


def render_scene(scene: Scene, size: int, seed: int = 0, index: int = 0) -> Image.Image:
    """Draw `scene` as an RGB image of `size` x `size` pixels.

    Args:
        scene: what to draw.
        size: S, the side in pixels (>= 8).
        seed, index: pick the jitter and background gradient (deterministic).

    Returns:
        A PIL RGB image [S, S].
    """
    if size < 8:
        raise ValueError(f"render_scene: size must be at least 8 pixels, got {size}")
    cx, cy, r = shape_placement(scene, size, seed, index)
    rng = random.Random(f"gradient:{seed}:{index}")
    image = _background(size * SUPERSAMPLE, BACKGROUND_RGB, rng)
    draw_shape(ImageDraw.Draw(image), scene.shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, r * SUPERSAMPLE,
               COLOURS[scene.colour])
    return image.resize((size, size), Image.BOX)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw `shape` centred at (cx, cy) with half-extent `r` (pixels of `draw`'s image)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.85  # same visual weight as the circle
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:
        polygon = _shape_polygon(shape, cx, cy, r)
        if polygon is None:
            raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
        draw.polygon(polygon, fill=fill)


def shape_coverage(shape: str, size: int, cx: float, cy: float, r: float) -> Image.Image:
    """The fraction of each pixel `shape` covers, as `render_scene` anti-aliases it ("L", 0-255).

    (cx, cy) and r are in pixels of the `size` x `size` image.
    """
    big = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    draw_shape(ImageDraw.Draw(big), shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, r * SUPERSAMPLE, 255)
    return big.resize((size, size), Image.BOX)


def synthetic_sample(seed: int, index: int, size: int, combinations: str = "seen") -> tuple[Image.Image, str, dict]:
    """(image, caption, labels) of sample `index` of the synthetic set drawn with `seed`
    (`combinations` as in `scenes.sample_scene`)."""
    scene = sample_scene(seed, index, combinations)
    caption = describe(scene)
    labels = dict(scene.labels(), unseen=scene.unseen, caption=caption, seed=seed, index=index, image_size=size)
    return render_scene(scene, size, seed, index), caption, labels


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata (mtime, owner, mode): the same inputs give byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_synthetic_shards(out_dir: str, num: int, size: int, seed: int = 0, shard_size: int = 1000,
                           combinations: str = "seen", show_progress: bool = False) -> list[str]:
    """Write `num` synthetic samples as webdataset shards in `out_dir`.

    Args:
        out_dir: created if missing; existing shards of the same names are overwritten.
        num: number of samples (indices 0..num-1 of the set drawn with `seed`).
        size: image side in pixels.
        seed: the scene seed (use a different one for a held-out set).
        shard_size: samples per tar file.
        combinations: "seen" (a training set) or "all" (a held-out set that also holds the
            combinations training never shows); see `scenes.sample_scene`.

    Returns:
        The shard paths, in order.
    """
    for name, value in (("num", num), ("size", size), ("shard_size", shard_size)):
        if value < 1:
            raise ValueError(f"synth-data: --{name.replace('_', '-')} must be a positive integer, got {value}")
    if size < 8:
        raise ValueError(f"synth-data: --size must be at least 8 pixels, got {size}")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    progress = None
    if show_progress:
        from tqdm import tqdm

        progress = tqdm(total=num, desc="synth-data", unit="img")
    for shard, start in enumerate(range(0, num, shard_size)):
        path = os.path.join(out_dir, f"shapes-{shard:06d}.tar")
        tmp = path + ".tmp"
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(start, min(num, start + shard_size)):
                image, caption, labels = synthetic_sample(seed, index, size, combinations)
                key = f"{index:08d}"
                _add_member(tar, f"{key}.png", _png_bytes(image))
                _add_member(tar, f"{key}.txt", caption.encode("utf-8"))
                _add_member(tar, f"{key}.json", json.dumps(labels, sort_keys=True).encode("utf-8"))
                if progress is not None:
                    progress.update(1)
        os.replace(tmp, path)  # a reader never sees a half-written shard
        paths.append(path)
    if progress is not None:
        progress.close()
    manifest = {"num": num, "size": size, "seed": seed, "shard_size": shard_size, "combinations": combinations,
                "shards": [os.path.basename(p) for p in paths]}
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return paths


def main(args) -> int:
    """`megadual synth-data --out DIR --num N --size S [--seed K] [--shard-size M] [--combinations seen|all]`."""
    paths = write_synthetic_shards(args.out, args.num, args.size, seed=args.seed, shard_size=args.shard_size,
                                   combinations=args.combinations, show_progress=True)
    print(f"wrote {args.num} images ({args.size}x{args.size}) in {len(paths)} shard(s) to {args.out}")
    return 0
