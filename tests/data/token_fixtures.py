"""Small random token shards for the loader tests.

Legend: T visual positions (tiny here), R residual depth, K codebook size.
"""

from __future__ import annotations

import os

import numpy as np

from megadual.config.schema import PackedLoaderConfig
from megadual.data.mm_sequence import SpecialTokens
from megadual.data.shard_writer import TokenShardWriter
from megadual.data.token_shards import Manifest, TokenSample

NUM_POSITIONS, DEPTH, CODEBOOK = 6, 2, 32
TEXT_VOCAB = 40  # caption ids in [0, 40); specials above
TOKENS = SpecialTokens(
    image_start_id=41, image_end_id=42, eos_id=43, pad_id=44, generation_marker_id=45, visual_placeholder_id=46,
    uncond_prompt_ids=(47,),
)
VOCAB = 48


def template(num_positions: int = NUM_POSITIONS, depth: int = DEPTH, codebook: int = CODEBOOK) -> Manifest:
    return Manifest(
        tokenizer_checkpoint_sha256="0" * 64, text_tokenizer="test-bytes", pixel_codebook_size=codebook,
        semantic_codebook_size=codebook, num_positions=num_positions, depth=depth,
    )


def random_sample(rng: np.random.Generator, key: str, num_positions=NUM_POSITIONS, depth=DEPTH, codebook=CODEBOOK,
                  min_text: int = 1, max_text: int = 12) -> TokenSample:
    n = int(rng.integers(min_text, max_text + 1))
    return TokenSample(
        key=key,
        caption=f"caption of {key}",
        text_ids=rng.integers(0, TEXT_VOCAB, n).astype(np.int32),
        pixel_codes=rng.integers(0, codebook, (num_positions, depth)).astype(np.uint16),
        semantic_codes=rng.integers(0, codebook, (num_positions, depth)).astype(np.uint16),
        image_size=(24, 32),
        source_key=f"raw/{key}",
    )


def write_dataset(directory: str, num_samples: int, per_shard: int, seed: int = 0, **sample_kw) -> list[TokenSample]:
    """Write `num_samples` random samples into shards of `per_shard`; returns them in order."""
    rng = np.random.default_rng(seed)
    kw = {k: sample_kw[k] for k in ("num_positions", "depth", "codebook") if k in sample_kw}
    writer = TokenShardWriter(directory, template(**kw), samples_per_shard=per_shard)
    samples = [random_sample(rng, f"s{seed}x{i:05d}", **sample_kw) for i in range(num_samples)]
    for s in samples:
        writer.add(s)
    writer.close()
    return samples


def loader_config(directory: str | list[str], **kw) -> PackedLoaderConfig:
    paths = [directory] if isinstance(directory, (str, os.PathLike)) else list(directory)
    defaults = dict(paths=paths, seq_len=64, batch_size=2, pack_window=16, seed=3)
    defaults.update(kw)
    return PackedLoaderConfig(**defaults)
