"""Tiny random Hugging Face Qwen2 checkpoints written to disk, for parity tests.

Every parameter (biases and norm weights included) is drawn at random, so a mapping that
swaps or drops a tensor cannot hide behind zero biases or unit norms.
"""

from __future__ import annotations

import torch


def make_hf_qwen2(path, seed: int = 0, **config):
    """Save a random transformers Qwen2ForCausalLM to `path` and return it (fp32, eval mode)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    defaults = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_cache=False,  # transformers honours restarting position_ids (packing) only without a cache
        attn_implementation="sdpa",
    )
    defaults.update(config)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**defaults)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    return model
