"""The tower's taps and tail equal transformers' SiglipVisionModel (random and loaded from disk)."""

import dataclasses

import pytest
import torch

from megadual.models.vision.tower import SiglipTower, build_siglip, frozen_copy

from .fixtures import debug_config


def _randomise_(model, seed=0):
    # Random norms and biases too, so a tap taken one layer off or a skipped norm cannot match.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if ("norm" in name and name.endswith("weight")) else p + 0.05 * noise)


def _check_against_hf(model, cfg):
    tower = SiglipTower(model, cfg).eval()
    images = torch.rand(3, 3, cfg.image_size, cfg.image_size) * 2 - 1
    with torch.no_grad():
        ref = model(images, output_hidden_states=True)
        hs = ref.hidden_states  # hs[i] = output of layer i (hs[0]: embeddings)
        taps = tower.taps(images)
        last, pooled = tower.tail(taps.semantic)
    # Same modules, same order of operations: exact except the shortcut's extra add.
    torch.testing.assert_close(taps.semantic, hs[cfg.semantic_layer], rtol=0, atol=0)
    torch.testing.assert_close(taps.pixel, hs[cfg.pixel_layer] + cfg.shortcut_weight * hs[cfg.shortcut_layer])
    torch.testing.assert_close(last, ref.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref.pooler_output, rtol=0, atol=0)


def test_taps_and_tail_equal_hf_hidden_states():
    cfg = debug_config().tokenizer.tower
    model = build_siglip(cfg, seed=3)
    _randomise_(model)
    _check_against_hf(model, cfg)


def test_local_hf_directory_loads_and_matches(tmp_path):
    cfg = debug_config().tokenizer.tower
    source = build_siglip(cfg, seed=4)
    _randomise_(source, seed=1)
    source.save_pretrained(tmp_path / "siglip")
    loaded = build_siglip(dataclasses.replace(cfg, hf_path=str(tmp_path / "siglip")))
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    _check_against_hf(loaded, cfg)


def test_local_hf_directory_with_other_sizes_is_named(tmp_path):
    cfg = debug_config().tokenizer.tower
    build_siglip(dataclasses.replace(cfg, num_layers=5), seed=0).save_pretrained(tmp_path / "siglip")
    with pytest.raises(ValueError, match=r"tokenizer\.tower\.num_layers: got 4.*num_hidden_layers=5"):
        build_siglip(dataclasses.replace(cfg, hf_path=str(tmp_path / "siglip")))
    with pytest.raises(FileNotFoundError, match="hf_path"):
        build_siglip(dataclasses.replace(cfg, hf_path=str(tmp_path / "missing")))


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = debug_config().tokenizer.tower
    images = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
    grads = []
    for ckpt in (False, True):
        tower = SiglipTower(build_siglip(cfg, seed=5), cfg).train()
        tower.gradient_checkpointing = ckpt
        taps = tower.taps(images)
        (taps.pixel.square().mean() + tower.tail(taps.semantic)[1].sum()).backward()
        grads.append([p.grad.clone() for p in tower.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # recomputation reorders nothing; fp32 noise only


def test_frozen_copy_is_a_constant_teacher():
    cfg = debug_config().tokenizer.tower
    tower = SiglipTower(build_siglip(cfg, seed=6), cfg)
    teacher = frozen_copy(tower)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        next(tower.parameters()).add_(1.0)  # training the student must not move the teacher
    assert not torch.equal(next(tower.parameters()), next(teacher.parameters()))
