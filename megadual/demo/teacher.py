"""The demo's semantic teacher: a small SigLIP vision tower pre-trained on the scene captions.

Legend: B images, W caption words, D embedding dim.

DualToken starts its tokenizer from a pre-trained SigLIP and distils the semantic codes from
a frozen copy of it, so the semantic codes carry what the teacher learned from text. Offline
there is no pre-trained SigLIP, and the demo's random tower knows nothing: its deep features
mix shape with colour, and no reader of those codes recognises a shape in a colour-side
combination it never saw (the probe stage measures it). This stage makes the teacher the demo
needs, the way SigLIP is made, in miniature:

- image side: the tokenizer's own tower (`tokenizer.tower`, pooling head on), random init;
- text side: a bag of caption words (a mean of word embeddings): captions here are a few
  independent words, so word order carries nothing;
- loss: SigLIP's pairwise sigmoid loss, every image against every caption of the batch, with a
  learned temperature and bias; captions that are equal count as matches;
- colour augmentation: every image gets its RGB channels permuted (the background grey stays
  grey, the shape changes colour) and is paired with its caption minus its colour word: the
  teacher learns shape and place, never colour. Colour is the pixel codes' to carry; semantic
  features that held it too were snapped by the quantizer onto the (shape, colour, side)
  combinations training shows, and no reader of the codes recognised a shape in a new
  combination (docs/demo_tuning.md: unseen shapes 56% from the semantic codes with half of the
  images recoloured, 88% with all).

The result is saved as a transformers SiglipVisionModel directory; the tokenizer starts from it
(`tokenizer.tower.hf_path`) and distils its semantic codes from a frozen copy.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from megadual.config.schema import VisionTowerConfig
from megadual.data.scenes import COLOURS
from megadual.inference.mllm import from_pil
from megadual.models.vision.tower import build_siglip

# The 5 channel orders other than the identity.
_PERMUTATIONS = [list(p) for p in itertools.permutations(range(3))][1:]


@dataclass(frozen=True)
class TeacherPlan:
    steps: int
    batch_size: int = 128
    lr: float = 1e-3
    augment_fraction: float = 1.0  # share of a batch whose colours are permuted (and colour word dropped)
    seed: int = 0


class BagOfWords(nn.Module):
    """Caption -> [D]: the mean of its words' embeddings (the teacher's text tower)."""

    def __init__(self, vocabulary: list[str], dim: int):
        super().__init__()
        self.index = {w: i for i, w in enumerate(vocabulary)}
        self.embed = nn.EmbeddingBag(len(vocabulary), dim, mode="mean")

    def forward(self, captions: list[list[str]]) -> torch.Tensor:
        ids = [torch.tensor([self.index[w] for w in words]) for words in captions]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        return self.embed(torch.cat(ids), offsets)  # [B, D]


def sigmoid_loss(image: torch.Tensor, text: torch.Tensor, match: torch.Tensor, log_scale: torch.Tensor,
                 bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss: -mean over images of sum over captions of log sigmoid(+-(s * cos + b)).

    Args:
        image, text: [B, D] embeddings; match: bool [B, B], True where image i goes with caption j.
    """
    logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T * log_scale.exp() + bias
    signs = match.float() * 2 - 1
    return -F.logsigmoid(signs * logits).sum() / image.shape[0]


def recolour(pixels: torch.Tensor, words: list[list[str]], fraction: float,
             generator: torch.Generator) -> tuple[torch.Tensor, list[list[str]]]:
    """Permute the channels of a `fraction` of the images and drop their captions' colour words."""
    pixels, words = pixels.clone(), [list(w) for w in words]
    for i in torch.nonzero(torch.rand(len(words), generator=generator) < fraction).flatten().tolist():
        order = _PERMUTATIONS[int(torch.randint(len(_PERMUTATIONS), (1,), generator=generator))]
        pixels[i] = pixels[i, order]
        words[i] = [w for w in words[i] if w not in COLOURS]
    return pixels, words


def train_teacher(tower_cfg: VisionTowerConfig, images: list[Image.Image], captions: list[str], plan: TeacherPlan,
                  out_dir: str) -> dict:
    """Pre-train the tower on (image, caption) pairs and save it to `out_dir` (SiglipVisionModel).

    Returns:
        first and last loss (mean of the first and last tenth of the steps), steps, images seen.
    """
    torch.manual_seed(plan.seed)
    tower = build_siglip(tower_cfg, plan.seed, prefix="teacher")
    words = [c.split() for c in captions]
    text = BagOfWords(sorted({w for ws in words for w in ws}), tower_cfg.hidden_size)
    log_scale, bias = nn.Parameter(torch.tensor(math.log(10.0))), nn.Parameter(torch.tensor(-10.0))
    params = [*tower.parameters(), *text.parameters(), log_scale, bias]
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=1e-4)
    pixels = from_pil(images, tower_cfg.image_size)  # [N, 3, H, W] in [-1, 1]
    generator = torch.Generator().manual_seed(plan.seed)
    captions_seen: dict[str, int] = {}  # caption (after recolouring) -> an id, so matches compare ints
    losses = []
    for _ in tqdm(range(plan.steps), desc="teacher", unit="step"):
        batch = torch.randint(0, len(words), (plan.batch_size,), generator=generator)
        x, w = recolour(pixels[batch], [words[i] for i in batch.tolist()], plan.augment_fraction, generator)
        caption_ids = torch.tensor([captions_seen.setdefault(" ".join(ws), len(captions_seen)) for ws in w])
        match = caption_ids[:, None] == caption_ids[None, :]  # equal captions match
        loss = sigmoid_loss(tower(pixel_values=x).pooler_output, text(w), match, log_scale, bias)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    os.makedirs(out_dir, exist_ok=True)
    tower.save_pretrained(out_dir)
    tenth = max(1, len(losses) // 10)
    return {"steps": plan.steps, "images": plan.steps * plan.batch_size,
            "first_loss": sum(losses[:tenth]) / tenth, "last_loss": sum(losses[-tenth:]) / tenth}
