"""What the demo's models learned, judged on held-out synthetic scenes.

Legend: B images, H x W pixels.

- reconstruction: PSNR / SSIM of the tokenizer's decode(encode(x)) against x;
- generation: an image per held-out caption, read back with `read_scene` (pixels only); right
  when every attribute the caption names (shape, colour, side) is read back;
- captioning: a caption per held-out image; right when it parses and names every attribute of
  the image.

Every verdict is also split by whether its combination of attributes ever appeared in
training (`Verdicts.summary`): the unseen ones measure compositional generalisation.

The image reader itself is scored on the held-out originals and on their reconstructions
(`read_back`): the ceilings the generation figure is measured against.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Optional

import torch
from PIL import Image

from megadual.data.scene_reader import read_scene
from megadual.data.scenes import ATTRIBUTES, parse_caption
from megadual.inference.mllm import LoadedMLLM, caption_images, from_pil, generate_images
from megadual.losses import psnr, ssim
from megadual.models.vision.tokenizer import DualTokenizer


@dataclass
class SceneSamples:
    """Scenes as `megadual synth-data` wrote them (sorted by key): a held-out set, or the training set."""

    images: list[Image.Image]
    captions: list[str]
    labels: list[dict]


def load_scene_shards(shard_dir: str, limit: Optional[int] = None) -> SceneSamples:
    """Read the .png / .txt / .json members of every shard in `shard_dir`."""
    members: dict[str, dict[str, bytes]] = {}
    for name in sorted(os.listdir(shard_dir)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(shard_dir, name)) as tar:
            for info in tar.getmembers():
                key, _, ext = info.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(info).read()
    keys = sorted(members)[:limit]
    missing = [k for k in keys if not {"png", "txt", "json"} <= members[k].keys()]
    if missing:
        raise ValueError(f"{shard_dir}: samples {missing[:3]} lack a .png, .txt or .json member")
    return SceneSamples(
        images=[Image.open(io.BytesIO(members[k]["png"])).convert("RGB") for k in keys],
        captions=[members[k]["txt"].decode("utf-8") for k in keys],
        labels=[json.loads(members[k]["json"]) for k in keys],
    )


@dataclass
class Reconstruction:
    psnr: float  # dB, mean over images
    ssim: float
    originals: torch.Tensor  # [B, 3, H, W] in [-1, 1]
    reconstructions: torch.Tensor


@torch.no_grad()
def reconstruction_quality(tokenizer: DualTokenizer, images: list[Image.Image], batch_size: int = 64) -> Reconstruction:
    """PSNR / SSIM of decode(pixel codes of encode(image)) on the [0, 1] scale."""
    tokenizer.eval()
    originals = from_pil(images, tokenizer.image_size)
    outs = []
    for start in range(0, len(images), batch_size):
        pixel_codes, _ = tokenizer.encode(originals[start:start + batch_size])
        outs.append(tokenizer.decode(pixel_codes).clamp(-1, 1))
    recon = torch.cat(outs)
    return Reconstruction(float(psnr(recon, originals)), float(ssim(recon, originals)), originals, recon)


@dataclass
class Judged:
    """One model output against the held-out labels it should match."""

    expected: dict  # every attribute, the caption, and `unseen` (a combination training never showed)
    seen: dict  # what was read back: every attribute (None when unreadable)
    correct: bool


@dataclass
class Verdicts:
    items: list[Judged] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(j.correct for j in self.items) / max(1, len(self.items))

    def share_right(self, key: str) -> float:
        """How often one attribute (one of scenes.ATTRIBUTES) alone was right."""
        return sum(j.seen[key] == j.expected[key] for j in self.items) / max(1, len(self.items))

    def where(self, unseen: bool) -> "Verdicts":
        """The verdicts on scenes whose combination training did (not) show."""
        return Verdicts([j for j in self.items if j.expected["unseen"] == unseen])

    def summary(self) -> dict:
        """`both` (every attribute right), each attribute alone, and `both` on the unseen and seen
        combinations, as fractions in [0, 1] (None for a subset with no scene); counts under `num*`."""
        unseen, seen = self.where(True), self.where(False)
        return {"both": self.accuracy, **{a: self.share_right(a) for a in ATTRIBUTES},
                "unseen_combinations_both": unseen.accuracy if unseen.items else None,
                "seen_combinations_both": seen.accuracy if seen.items else None,
                "num": len(self.items), "num_unseen": len(unseen.items)}


def _attributes(labels: dict) -> dict:
    return {a: labels[a] for a in ATTRIBUTES}


def _judge(expected_labels: dict, seen: dict) -> Judged:
    """Right when `seen` names every attribute of the labels; the caption and `unseen` ride along."""
    expected = _attributes(expected_labels)
    return Judged({**expected, "caption": expected_labels["caption"], "unseen": bool(expected_labels["unseen"])},
                  seen, _attributes(seen) == expected)


def read_back(images: list[Image.Image], held_out: SceneSamples) -> Verdicts:
    """`read_scene` on `images` (originals, reconstructions or generations) against the held-out labels.

    On the originals it scores the checker itself; on reconstructions, whether the tokenizer
    keeps every attribute (which PSNR, dominated by the background, does not show).
    """
    out = Verdicts()
    for image, labels in zip(images, held_out.labels):
        reading = read_scene(image)
        out.items.append(_judge(labels, {a: getattr(reading, a) for a in ATTRIBUTES}))
    return out


def judge_generation(loaded: LoadedMLLM, held_out: SceneSamples, batch_size: int = 16,
                     seed: int = 0) -> tuple[Verdicts, list[Image.Image]]:
    """Generate one image per held-out caption; right when `read_scene` finds every attribute it names."""
    images: list[Image.Image] = []
    for start in range(0, len(held_out.captions), batch_size):
        prompts = held_out.captions[start:start + batch_size]
        images += generate_images(loaded, prompts, seed=seed + start)
    return read_back(images, held_out), images


def judge_captions(loaded: LoadedMLLM, held_out: SceneSamples, batch_size: int = 32) -> Verdicts:
    """Caption every held-out image (greedy); right when the caption parses and names every attribute."""
    out = Verdicts()
    texts: list[str] = []
    for start in range(0, len(held_out.images), batch_size):
        texts += caption_images(loaded, held_out.images[start:start + batch_size])
    for text, labels in zip(texts, held_out.labels):
        scene = parse_caption(text)
        seen = scene.labels() if scene else dict.fromkeys(ATTRIBUTES)
        out.items.append(_judge(labels, {**seen, "caption": text}))
    return out
