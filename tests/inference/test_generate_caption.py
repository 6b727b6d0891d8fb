"""`megadual generate` / `megadual caption` on a briefly trained debug unified model and a random
debug tokenizer: the outputs have the right form, follow the seed, and batch like single calls."""

from __future__ import annotations

import os

import deepspeed  # noqa: F401  (imported once so forked ranks inherit it)
import numpy as np
import pytest
import torch
from PIL import Image

from megadual.cli import main
from megadual.config import load_config
from megadual.inference.mllm import caption_images, generate_images, load_for_inference
from megadual.models.vision.tokenizer import DualTokenizer
from megadual.train.mllm import train_mllm
from tests._dist import run_distributed
from tests.train.mm_fixtures import write_scene_token_shards

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _train(rank, world_size, overrides):
    cfg = load_config(os.path.join(ROOT, "configs", "debug", "mllm.yaml"), overrides)
    train_mllm(cfg, show_progress=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    tok_cfg = load_config(os.path.join(ROOT, "configs", "debug", "tokenizer.yaml"))
    DualTokenizer(tok_cfg.tokenizer, seed=0).save_pretrained(str(root / "tokenizer"))
    write_scene_token_shards(str(root / "tokens"), num_samples=64)
    overrides = [f"run.out_dir={root / 'run'}", f"loader.paths=[{root / 'tokens'}]", "train.steps=2",
                 f"mllm.tokenizer_path={root / 'tokenizer'}", "mllm.code_init=tokenizer"]
    run_distributed(_train, world_size=1, timeout=300, args=(overrides,))
    return str(root / "run")


def test_code_tables_start_from_the_tokenizer(run_dir):
    loaded = load_for_inference(run_dir)
    for table, branch in ((loaded.model.visual_embed.pixel.codebook, loaded.visual.pixel_branch),
                          (loaded.model.visual_embed.semantic.codebook, loaded.visual.semantic_branch)):
        # Two warm-up steps (lr <= 3e-4) move an entry by well under 1e-2; a fresh table is ~N(0, 0.02).
        assert (table - branch.rq.codebook).abs().max() < 1e-2


def test_code_tables_must_match_the_tokenizer(run_dir):
    from megadual.config.errors import ConfigError
    from megadual.train.mllm import tokenizer_code_tables

    cfg = load_config(os.path.join(run_dir, "config.yaml"), ["mllm.depth=3"])
    with pytest.raises(ConfigError, match="mllm.depth: got 3, expected 2"):
        tokenizer_code_tables(cfg)


def test_generate_images(run_dir):
    loaded = load_for_inference(run_dir)
    prompts = ["a red circle on the left", "a green star on the right"]
    images = generate_images(loaded, prompts, cfg_scale=3.0, temperature=1.0, seed=7)
    assert [im.size for im in images] == [(32, 32)] * 2
    again = generate_images(loaded, prompts, cfg_scale=3.0, temperature=1.0, seed=7)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))
    other = generate_images(loaded, prompts, cfg_scale=3.0, temperature=1.0, seed=8)
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, other))


def test_caption_images(run_dir):
    loaded = load_for_inference(run_dir)
    images = [Image.new("RGB", (40, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (20, 20, 220))]
    captions = caption_images(loaded, images, max_new_tokens=12)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert caption_images(loaded, images, max_new_tokens=12) == captions  # greedy: deterministic


def test_cli(run_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "--ckpt", run_dir, "--prompt", "a red circle on the left",
                 "--out", str(out), "--seed", "1"]) == 0
    assert Image.open(out).size == (32, 32)
    assert main(["caption", "--ckpt", run_dir, "--image", str(out), "--max-new-tokens", "8"]) == 0
    assert str(out) in capsys.readouterr().out
    assert main(["caption", "--ckpt", run_dir, "--image", str(tmp_path / "missing.png")]) == 2
    assert main(["generate", "--ckpt", str(tmp_path), "--prompt", "x", "--out", str(out)]) == 2
    assert torch.distributed.is_initialized() is False


def test_bad_images_and_devices_are_one_line_errors(run_dir, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (100, 100, 100)).save(good)
    (tmp_path / "not_an_image.png").write_text("hello")
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:40])
    cases = {
        str(tmp_path / "not_an_image.png"): "not_an_image.png cannot be decoded",
        str(tmp_path / "truncated.png"): "truncated.png cannot be decoded",
        str(tmp_path): "is a directory; pass image files",
        str(tmp_path / "missing.png"): "missing.png does not exist",
    }
    for path, message in cases.items():
        assert main(["caption", "--ckpt", run_dir, "--image", str(good), "--image", path]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    if not torch.cuda.is_available():
        assert main(["generate", "--ckpt", run_dir, "--prompt", "x", "--out", str(good), "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "this torch has no usable CUDA" in err and len(err.strip().splitlines()) == 1, err
    assert main(["generate", "--ckpt", run_dir, "--prompt", "x", "--out", str(good), "--device", "tpu9"]) == 2
    assert "is not a device torch knows" in capsys.readouterr().err
    assert Image.open(good).size == (32, 32)  # nothing written over
