"""What the visual codes carry: small classifiers that read each caption attribute from codes.

Legend: N images, P = g x g visual positions, R residual depth, C code-embedding channels.

The unified model can only caption (and draw) what the tokenizer's codes keep. Before
blaming the unified model, the demo measures that ceiling: for each code branch (pixel,
semantic, both) an image's codes become a grid of code embeddings, the tokenizer's codebook
vectors summed over depth, [N, C, g, g] (both: the two grids stacked along C). Two probes
read every attribute from that grid at once, one output head per attribute:

- linear: softmax regression on the flattened grid;
- conv: two 3x3 convolutions, ReLU, global average pooling, then a linear head per attribute.

Probes train on the token shards (the training images) and are scored on the held-out images'
codes, the very images the captioning figure is measured on. A probe that reads an attribute
well shows the codes carry it; one that cannot, that the tokenizer side must change first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from megadual.data.scenes import ATTRIBUTES, COLOURS, SHAPES, SIDES, UNSEEN_COMBINATIONS, parse_caption
from megadual.data.shard_reader import ShardCursor
from megadual.data.token_shards import TokenShardError, decode_sample, read_manifest
from megadual.inference.mllm import from_pil
from megadual.models.vision.tokenizer import DualTokenizer

BRANCHES = ("pixel", "semantic", "both")
PROBES = ("linear", "conv")
# Each attribute's values, in a fixed order: a probe's class index.
ATTRIBUTE_VALUES = {"shape": tuple(SHAPES), "colour": tuple(COLOURS), "side": tuple(SIDES)}
assert tuple(ATTRIBUTE_VALUES) == ATTRIBUTES


@dataclass
class CodeSet:
    """Codes and attribute labels of N images.

    Shapes: pixel, semantic int64 [N, P, R]; labels[attribute] int64 [N] (index into
    ATTRIBUTE_VALUES[attribute]); unseen bool [N] (a combination training never shows).
    """

    pixel: torch.Tensor
    semantic: torch.Tensor
    labels: dict[str, torch.Tensor]
    unseen: torch.Tensor

    def __len__(self) -> int:
        return self.pixel.shape[0]


def code_set(pixel: torch.Tensor, semantic: torch.Tensor, scenes: list[dict]) -> CodeSet:
    """A CodeSet labelled by `scenes` (dicts with every attribute)."""
    labels = {a: torch.tensor([ATTRIBUTE_VALUES[a].index(s[a]) for s in scenes]) for a in ATTRIBUTES}
    unseen = torch.tensor([tuple(s[a] for a in ATTRIBUTES) in UNSEEN_COMBINATIONS for s in scenes])
    return CodeSet(pixel, semantic, labels, unseen)


def read_token_codes(directory: str, limit: int | None = None) -> CodeSet:
    """Every sample of a token shard directory (`megadual extract`), labelled from its caption.

    Raises:
        ValueError: a caption that does not follow the scene grammar (not the demo's shards).
    """
    manifest = read_manifest(directory)
    pixel, semantic, scenes = [], [], []
    for entry in manifest.shards:
        wanted = entry.num_samples if limit is None else min(entry.num_samples, limit - len(scenes))
        if wanted <= 0:
            break
        path = os.path.join(directory, entry.name)
        cursor = ShardCursor(path, path, entry.num_samples)
        try:
            for _, key, files in cursor.read(list(range(wanted))):
                if isinstance(files, TokenShardError):
                    raise files
                sample = decode_sample(files, path, key, manifest)
                scene = parse_caption(sample.caption)
                if scene is None:
                    raise ValueError(f"{path}, sample {key!r}: caption {sample.caption!r} is not a scene caption; "
                                     "probe token shards of the demo's synthetic scenes")
                pixel.append(sample.pixel_codes.astype(np.int64))
                semantic.append(sample.semantic_codes.astype(np.int64))
                scenes.append(scene.labels())
        finally:
            cursor.close()
    return code_set(torch.from_numpy(np.stack(pixel)), torch.from_numpy(np.stack(semantic)), scenes)


@torch.no_grad()
def encode_code_set(tokenizer: DualTokenizer, images: list[Image.Image], scenes: list[dict],
                    batch_size: int = 64) -> CodeSet:
    """Codes of `images` under `tokenizer`, labelled by `scenes` (dicts with every attribute)."""
    pixels = from_pil(images, tokenizer.image_size)
    pixel, semantic = zip(*(tokenizer.encode(pixels[i:i + batch_size]) for i in range(0, len(images), batch_size)))
    return code_set(torch.cat(pixel), torch.cat(semantic), scenes)


@torch.no_grad()
def code_grid(tokenizer: DualTokenizer, codes: CodeSet, branch: str) -> torch.Tensor:
    """[N, C, g, g] code embeddings of one branch ("pixel", "semantic" or "both")."""
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    pixel, semantic = tokenizer.embed_codes(codes.pixel if branch != "semantic" else None,
                                            codes.semantic if branch != "pixel" else None)
    vectors = torch.cat([v for v in (pixel, semantic) if v is not None], dim=-1)  # [N, P, C]
    n, p, c = vectors.shape
    g = int(round(p**0.5))
    assert g * g == p, f"{p} positions do not form a square grid"
    return vectors.transpose(1, 2).reshape(n, c, g, g).float()


class _Probe(nn.Module):
    """A body that turns code grids into features [N, F], and one linear head per attribute."""

    def __init__(self, body: nn.Module, features: int, classes: dict[str, int]):
        super().__init__()
        self.body = body
        self.heads = nn.ModuleDict({a: nn.Linear(features, k) for a, k in classes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(x)
        return {a: head(features) for a, head in self.heads.items()}


def _build_probe(kind: str, grid_shape: torch.Size, classes: dict[str, int], width: int = 32) -> _Probe:
    """linear: the flattened grid; conv: two 3x3 convolutions, ReLU, global average pooling."""
    channels = grid_shape[0]
    if kind == "conv":
        body = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return _Probe(body, width, classes)
    return _Probe(nn.Flatten(), grid_shape.numel(), classes)


def fit_probe(kind: str, train_x: torch.Tensor, train_y: dict[str, torch.Tensor], test_x: torch.Tensor,
              steps: int = 300, batch_size: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    """Train one probe of `kind` ("linear" or "conv") on every attribute at once.

    Args:
        train_x, test_x: [N, C, g, g] code grids; train_y: attribute -> int64 [N].

    Returns:
        attribute -> int64 [N_test] predicted class indices of the test grids.
    """
    if kind not in PROBES:
        raise ValueError(f"probe kind must be one of {PROBES}, got {kind!r}")
    # Standardise with the training statistics: codebook vectors of the two branches differ in scale.
    mean, std = train_x.mean(dim=(0, 2, 3), keepdim=True), train_x.std(dim=(0, 2, 3), keepdim=True) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = {a: len(ATTRIBUTE_VALUES[a]) for a in train_y}
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _build_probe(kind, train_x.shape[1:], classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    for _ in range(steps):
        batch = torch.randint(0, train_x.shape[0], (batch_size,), generator=generator)
        logits = model(train_x[batch])
        loss = sum(F.cross_entropy(logits[a], train_y[a][batch]) for a in classes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = model(test_x)
    return {a: logits[a].argmax(-1) for a in classes}


def chance_levels() -> dict[str, float]:
    """Attribute -> accuracy of a uniform guess (held-out scenes draw every combination alike)."""
    return {a: 1.0 / len(values) for a, values in ATTRIBUTE_VALUES.items()}


def probe_codes(tokenizer: DualTokenizer, train: CodeSet, test: CodeSet, steps: int = 300) -> dict:
    """Every probe on every branch.

    Returns:
        {attribute: {branch: cell}}, a cell {"linear": acc, "conv": acc, "best": the larger, and
        "linear_unseen", "conv_unseen": the same on the test scenes whose combination training
        never shows (None when there are none)}, accuracies in [0, 1].
    """
    tokenizer.eval()
    table: dict = {a: {} for a in ATTRIBUTES}
    for branch in BRANCHES:
        train_x, test_x = code_grid(tokenizer, train, branch), code_grid(tokenizer, test, branch)
        predicted = {kind: fit_probe(kind, train_x, train.labels, test_x, steps) for kind in PROBES}
        for a in ATTRIBUTES:
            right = {kind: (predicted[kind][a] == test.labels[a]).float() for kind in PROBES}
            cell = {kind: float(right[kind].mean()) for kind in PROBES}
            cell["best"] = max(cell.values())
            for kind in PROBES:
                cell[f"{kind}_unseen"] = float(right[kind][test.unseen].mean()) if test.unseen.any() else None
            table[a][branch] = cell
    return table
