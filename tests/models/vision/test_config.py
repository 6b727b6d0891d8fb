"""Tokenizer config sections: the shipped configs load; impossible combinations are named."""

import os

import pytest

from megadual.config import ConfigError, load_config

from .fixtures import REPO, debug_config


def test_shipped_configs_load():
    so400m = load_config([os.path.join(REPO, "configs", "dualtoken-so400m-384.yaml")])
    tower = so400m.tokenizer.tower
    assert (tower.hidden_size, tower.num_layers, tower.grid_size) == (1152, 27, 27)
    assert so400m.tokenizer.pixel_quantizer.codebook_size == 16384
    assert so400m.tokenizer.semantic_quantizer.depth == 8
    assert debug_config().tokenizer.tower.grid_size == 8


@pytest.mark.parametrize("override, key", [
    ("tokenizer.decoder.latent_size=16", "tokenizer.decoder.latent_size"),
    ("tokenizer.tower.semantic_layer=5", "tokenizer.tower.semantic_layer"),
    ("tokenizer.tower.shortcut_layer=3", "tokenizer.tower.shortcut_layer"),
    ("tokenizer.decoder.num_groups=5", "tokenizer.decoder.num_groups"),
    ("tokenizer.pixel_quantizer.decay=1.0", "tokenizer.pixel_quantizer.decay"),
    ("images.source=folder", "images.paths"),
    ("tokenizer.loss.adaptive_weight_min=20.0", "tokenizer.loss.adaptive_weight_min"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as info:
        debug_config(override)
    assert info.value.key == key
