"""The demo's semantic teacher: SigLIP's loss, the colour augmentation, and a saved tower."""

from __future__ import annotations

import os

import numpy as np
import torch
from transformers import SiglipVisionModel

from megadual.config import load_config
from megadual.data.scenes import COLOURS
from megadual.data.synthetic_images import synthetic_sample
from megadual.demo.teacher import BagOfWords, TeacherPlan, recolour, sigmoid_loss, train_teacher

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sigmoid_loss_rewards_matching_pairs():
    torch.manual_seed(0)
    text = torch.randn(4, 8)
    match = torch.eye(4, dtype=torch.bool)
    scale, bias = torch.tensor(2.3), torch.tensor(-2.0)
    aligned = sigmoid_loss(text.clone(), text, match, scale, bias)
    shuffled = sigmoid_loss(text[[1, 2, 3, 0]], text, match, scale, bias)
    assert aligned < shuffled


def test_augmentation_recolours_the_shape_keeps_the_grey_and_drops_the_colour_word():
    image, caption, _ = synthetic_sample(0, 3, 32)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    out, words = recolour(pixels, [caption.split()], fraction=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(out, pixels)
    corner = pixels[0, :, 0, 0]
    assert torch.allclose(out[0, :, 0, 0].sort().values, corner.sort().values)  # channels permuted, not changed
    assert not any(w in COLOURS for w in words[0]) and len(words[0]) == len(caption.split()) - 1
    same, kept = recolour(pixels, [caption.split()], fraction=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same, pixels) and kept == [caption.split()]


def test_bag_of_words_ignores_word_order():
    bag = BagOfWords(["a", "red", "star"], dim=4)
    a, b = bag([["a", "red", "star"], ["star", "a", "red"]])
    assert torch.allclose(a, b)


def test_training_lowers_the_loss_and_saves_a_tower_the_tokenizer_can_load(tmp_path):
    tower_cfg = load_config(os.path.join(REPO, "configs/demo/tokenizer.yaml")).tokenizer.tower
    samples = [synthetic_sample(0, i, 32) for i in range(64)]
    figures = train_teacher(tower_cfg, [s[0] for s in samples], [s[1] for s in samples],
                            TeacherPlan(steps=30, batch_size=32), str(tmp_path / "tower"))
    assert figures["last_loss"] < figures["first_loss"]
    loaded = SiglipVisionModel.from_pretrained(str(tmp_path / "tower"))
    assert loaded.config.hidden_size == tower_cfg.hidden_size and loaded.config.patch_size == tower_cfg.patch_size
