"""The demo's probes say which code branch carries which attribute, and train on real token shards."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from megadual.config import load_config
from megadual.data.scenes import COLOURS, SHAPES, describe, sample_scene
from megadual.data.shard_writer import TokenShardWriter
from megadual.data.text_lm import ByteTokenizer
from megadual.data.token_shards import Manifest, TokenSample
from megadual.demo.probe import chance_levels, code_grid, code_set, probe_codes, read_token_codes
from megadual.models.vision.tokenizer import DualTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_POSITIONS, DEPTH, CODEBOOK = 64, 2, 128  # configs/debug/tokenizer.yaml: 32 px, patch 4, 128 codes


@pytest.fixture(scope="module")
def tokenizer():
    cfg = load_config(os.path.join(REPO, "configs/debug/tokenizer.yaml"))
    return DualTokenizer(cfg.tokenizer, seed=0).eval()


def _codes(scenes: list[dict], seed: int):
    """Pixel codes that spell the colour in grid row 3 and the shape in row 5; semantic codes pure noise."""
    g = torch.Generator().manual_seed(seed)
    n = len(scenes)
    pixel = torch.randint(0, CODEBOOK, (n, NUM_POSITIONS, DEPTH), generator=g)
    semantic = torch.randint(0, CODEBOOK, (n, NUM_POSITIONS, DEPTH), generator=g)
    codes = code_set(pixel, semantic, scenes)
    pixel[:, 24:32, :] = codes.labels["colour"][:, None, None] * 10
    pixel[:, 40:48, :] = codes.labels["shape"][:, None, None] * 10 + 5
    return codes


def test_probes_find_the_attributes_only_in_the_branch_that_holds_them(tokenizer):
    train = _codes([sample_scene(0, i).labels() for i in range(1024)], seed=0)
    test = _codes([sample_scene(1, i, "all").labels() for i in range(256)], seed=1)
    table = probe_codes(tokenizer, train, test, steps=150)
    chance = chance_levels()
    for attribute in ("shape", "colour"):
        assert table[attribute]["pixel"]["best"] >= 0.9, table
        assert table[attribute]["both"]["best"] >= 0.9, table
        # These codes spell each attribute alone, so unseen combinations read as well as seen ones.
        assert table[attribute]["pixel"]["linear_unseen"] >= 0.9, table
        # Noise codes: nothing above chance beyond what 256 test scenes can wobble.
        assert table[attribute]["semantic"]["best"] <= chance[attribute] + 0.12, table


def test_code_grid_stacks_the_branches_as_channels(tokenizer):
    codes = _codes([sample_scene(0, i, "all").labels() for i in range(3)], seed=0)
    pixel, semantic = code_grid(tokenizer, codes, "pixel"), code_grid(tokenizer, codes, "semantic")
    both = code_grid(tokenizer, codes, "both")
    assert pixel.shape == (3, pixel.shape[1], 8, 8) and both.shape[1] == pixel.shape[1] + semantic.shape[1]
    assert torch.equal(both, torch.cat([pixel, semantic], dim=1))
    # Row-major positions: position 8 * row + column lands at grid[row, column].
    vectors, _ = tokenizer.embed_codes(codes.pixel, None)
    assert torch.equal(pixel[:, :, 3, 5], vectors[:, 8 * 3 + 5])
    with pytest.raises(ValueError, match="branch must be one of"):
        code_grid(tokenizer, codes, "text")


def test_reads_token_shards_and_labels_them_from_their_captions(tmp_path):
    manifest = Manifest(tokenizer_checkpoint_sha256="0" * 64, text_tokenizer="megadual-bytes",
                        pixel_codebook_size=CODEBOOK, semantic_codebook_size=CODEBOOK,
                        num_positions=NUM_POSITIONS, depth=DEPTH)
    writer = TokenShardWriter(str(tmp_path), manifest, samples_per_shard=4)
    rng = np.random.default_rng(0)
    scenes = [sample_scene(0, i) for i in range(10)]
    for i, scene in enumerate(scenes):
        caption = describe(scene)
        writer.add(TokenSample(
            key=f"s{i:04d}", caption=caption,
            text_ids=np.array(ByteTokenizer().encode(caption, bos=False, eos=False), dtype=np.int32),
            pixel_codes=rng.integers(0, CODEBOOK, (NUM_POSITIONS, DEPTH)).astype(np.uint16),
            semantic_codes=rng.integers(0, CODEBOOK, (NUM_POSITIONS, DEPTH)).astype(np.uint16),
            image_size=(32, 32), source_key=f"synthetic/{i}"))
    writer.close()
    codes = read_token_codes(str(tmp_path))
    assert codes.pixel.shape == (10, NUM_POSITIONS, DEPTH) and codes.pixel.dtype == torch.int64
    assert [SHAPES[k] for k in codes.labels["shape"]] == [s.shape for s in scenes]
    assert [list(COLOURS)[k] for k in codes.labels["colour"]] == [s.colour for s in scenes]
    assert len(read_token_codes(str(tmp_path), limit=5).labels["shape"]) == 5
