"""Token shards whose codes follow their captions, so a model can learn both directions.

Each sample is a synthetic scene: its caption is the byte-tokenized description, its pixel
codes depend on the colour and the side, its semantic codes on the shape. Real
token shards come from the tokenizer; these need none and still give losses that fall.
"""

from __future__ import annotations

import numpy as np

from megadual.data.scenes import COLOURS, SHAPES, SIDES, describe, sample_scene
from megadual.data.shard_writer import TokenShardWriter
from megadual.data.text_lm import ByteTokenizer
from megadual.data.token_shards import Manifest, TokenSample


def scene_codes(scene, num_positions: int, depth: int, codebook: int) -> tuple[np.ndarray, np.ndarray]:
    colour, shape, side = sorted(COLOURS).index(scene.colour), SHAPES.index(scene.shape), SIDES.index(scene.side)
    p = np.arange(num_positions)[:, None]
    d = np.arange(depth)[None, :]
    pixel = (colour * 7 + (p % 2 == side) * 3 + d) % codebook
    semantic = (shape * 5 + d) % codebook
    return pixel.astype(np.uint16), np.broadcast_to(semantic, (num_positions, depth)).astype(np.uint16)


def write_scene_token_shards(directory: str, num_samples: int, num_positions: int = 64, depth: int = 2,
                             codebook: int = 128, per_shard: int = 64, seed: int = 0) -> None:
    """Shards sized like the debug tokenizer's output (configs/debug/mllm.yaml)."""
    manifest = Manifest(tokenizer_checkpoint_sha256="0" * 64, text_tokenizer="megadual-bytes",
                        pixel_codebook_size=codebook, semantic_codebook_size=codebook,
                        num_positions=num_positions, depth=depth)
    writer = TokenShardWriter(directory, manifest, samples_per_shard=per_shard)
    tokenizer = ByteTokenizer()
    for i in range(num_samples):
        scene = sample_scene(seed, i)
        caption = describe(scene)
        pixel, semantic = scene_codes(scene, num_positions, depth, codebook)
        writer.add(TokenSample(
            key=f"scene{i:06d}", caption=caption,
            text_ids=np.array(tokenizer.encode(caption, bos=False, eos=False), dtype=np.int32),
            pixel_codes=pixel, semantic_codes=semantic, image_size=(64, 64), source_key=f"synthetic/{i}",
        ))
    writer.close()
