"""Text completion with a causal LM (greedy or sampled), for checks and demos.

Recomputes the whole prefix at every step: the backbone has no KV cache yet, and the
captions this serves are a few dozen tokens.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


@torch.no_grad()
def complete(
    model: Callable[[torch.Tensor], torch.Tensor],
    prompt_ids: list[int],
    max_new_tokens: int,
    stop_id: int,
    temperature: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> list[int]:
    """Extend `prompt_ids` until `stop_id` or `max_new_tokens`; returns only the new ids.

    Args:
        model: maps int64 ids [1, T] to logits [1, T, V].
        temperature: 0 for greedy decoding, otherwise softmax sampling at this temperature.
    """
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids)[0, -1].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        else:
            next_id = int(logits.argmax())
        new.append(next_id)
        if next_id == stop_id:
            break
        ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    return new
