"""Qwen2/Qwen2.5 decoder: the backbone of the unified model.

`Qwen2ForCausalLM(cfg).forward(input_ids, position_ids=None, cu_seqlens=None)` returns
logits [B, T, V] as a plain tensor. `load_hf(path, **overrides)` builds one from a local
Hugging Face Qwen2 directory. `KVCache(num_layers)` passed as `kv_cache=` decodes incrementally.
"""

from .cache import KVCache
from .hf_adapter import config_from_hf, config_to_hf, load_hf
from .model import Qwen2ForCausalLM, Qwen2Model, build_qwen2

__all__ = ["KVCache", "Qwen2ForCausalLM", "Qwen2Model", "build_qwen2", "config_from_hf", "config_to_hf", "load_hf"]
