"""Linear and embedding layers that draw their initial weights inside their own constructor.

`deepspeed.zero.Init` partitions a module's parameters as soon as that module's __init__
returns, so a parent that re-initialises a child's weights afterwards writes into empty
placeholders and the ZeRO-3 model silently keeps torch's default init. Initialising in
`reset_parameters` (which nn.Linear / nn.Embedding call from their constructors) makes a
model built under ZeRO-3 equal the same model built plainly with the same seed.
"""

from __future__ import annotations

from torch import nn


class NormalLinear(nn.Linear):
    """nn.Linear with weight ~ N(0, std) and a zero bias."""

    def __init__(self, in_features: int, out_features: int, std: float, bias: bool = True):
        self.init_std = std
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class NormalEmbedding(nn.Embedding):
    """nn.Embedding with weight ~ N(0, std)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, std: float):
        self.init_std = std
        super().__init__(num_embeddings, embedding_dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, self.init_std)
