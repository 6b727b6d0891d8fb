"""Token shards of the "tokenflow" and "single" tokenizer designs: extraction stores the one index
array per sample (codes.npy, `shared_codes` in the manifest), the packed loader hands it out as
both code streams, and the unified model trains on such shards."""

from __future__ import annotations

import json
import os
import tarfile

import pytest
import torch

from megadual.config import load_config
from megadual.data.packed_loader import PackedMultimodalLoader
from megadual.data.synthetic_images import write_synthetic_shards
from megadual.data.token_shards import read_manifest
from megadual.models.vision.tokenizer import DualTokenizer
from megadual.pipeline.extract import ExtractOptions, extract_tokens
from megadual.train.mllm import train_mllm
from tests._dist import run_distributed
from tests.data.token_fixtures import TOKENS, loader_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "debug")


def _train(rank, world_size, run_dir, shards):
    cfg = load_config(os.path.join(CONFIGS, "mllm.yaml"),
                      [f"run.out_dir={run_dir}", f"loader.paths=[{shards}]", "train.steps=3"])
    train_mllm(cfg, show_progress=False)


@pytest.mark.parametrize("design", ["tokenflow", "single"])
def test_one_index_per_sample_from_extraction_to_the_unified_model(design, tmp_path):
    tok = DualTokenizer(load_config(os.path.join(CONFIGS, f"tokenizer-{design}.yaml")).tokenizer, seed=0)
    tok.save_pretrained(str(tmp_path / "tok"))
    write_synthetic_shards(str(tmp_path / "raw"), num=24, size=32, seed=3, shard_size=12)
    out = str(tmp_path / "tokens")
    extract_tokens(ExtractOptions(inputs=[str(tmp_path / "raw")], out=out, tokenizer=str(tmp_path / "tok"),
                                  batch_size=8, num_workers=0, show_progress=False))
    manifest = read_manifest(out)
    assert manifest.shared_codes and manifest.num_samples == 24
    assert (manifest.pixel_codebook_size, manifest.semantic_codebook_size, manifest.depth) == (128, 128, 2)
    with tarfile.open(os.path.join(out, manifest.shards[0].name)) as tar:
        fields = {name.split(".", 1)[1] for name in tar.getnames()}
    assert fields == {"txt", "text_ids.npy", "codes.npy", "json"}  # one index array, not two

    batch = next(PackedMultimodalLoader(loader_config(out, seq_len=96, batch_size=2), TOKENS))
    visual = batch["pixel_codes"] >= 0
    assert visual.any() and torch.equal(batch["pixel_codes"], batch["semantic_codes"])

    run_distributed(_train, world_size=1, timeout=300, args=(str(tmp_path / "run"), out))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 3 and all(loss == loss and loss > 0 for loss in losses)
