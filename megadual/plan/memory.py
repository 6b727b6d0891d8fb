"""Bytes of model state and communication buffers on one rank, as DeepSpeed lays them out.

Per parameter P held by a rank's (tensor-parallel, pipeline) shard, with b bytes per weight in
the training dtype (2 for bf16, 4 for fp32) and d data-parallel ranks:

| ZeRO | parameters | gradients                     | optimizer (fp32 master + 2 moments) |
|------|------------|-------------------------------|-------------------------------------|
| 0    | b P        | b P (+ 4 P fp32 copy in bf16) | 8 P (+ 4 P master in bf16)          |
| 1, 2 | b P        | (b + 4) P / d  (4 P / d fp32) | 12 P / d                            |
| 3    | b P / d    | 4 P / d                       | 12 P / d                            |

ZeRO-3 also holds the module it is computing, gathered, with its gradients: 2 b x the
largest module. In bf16 these are DeepSpeed's own estimates (`estimate_zero2_model_states_mem_needs`:
2 P + 18 P / d; `estimate_zero3_model_states_mem_needs`: 4 x largest + 18 P / d), which
DeepSpeed applies to ZeRO-1 as well (one optimizer class runs both). In fp32 the ZeRO
optimizers still keep a cloned fp32 master partition, and the 16-bit and fp32 gradient
partitions are one tensor. Frozen parts hold their weights only.

Buffers: DeepSpeed's gradient-reduction bucket (`reduce_bucket_size` elements, 5e8 by
default, two with `overlap_comm`) for ZeRO-1/2, and the reduce plus prefetch buckets for
ZeRO-3; the all-reduce bucket under plain data parallelism. A bucket never outgrows the
gradients that fill it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
_DEFAULT_BUCKET = 500_000_000
_DEFAULT_PREFETCH = 50_000_000


@dataclass(frozen=True)
class ModelStates:
    parameters: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer


def model_state_bytes(trainable: int, largest_module: int, dp: int, zero_stage: int, dtype: str,
                      frozen: int = 0) -> ModelStates:
    """Bytes per rank of the trainable parameters' states (table above) plus frozen weights."""
    b = DTYPE_BYTES[dtype]
    p = float(trainable)
    frozen_bytes = b * frozen
    if zero_stage == 0:
        fp32_extra = 4 * p if b != 4 else 0.0
        return ModelStates(b * p + frozen_bytes, b * p + fp32_extra, 8 * p + fp32_extra)
    partition = p / dp
    if zero_stage in (1, 2):
        grads = (b + 4) * partition if b != 4 else 4 * partition
        return ModelStates(b * p + frozen_bytes, grads, 12 * partition)
    gathered = 2 * b * largest_module  # the module in use, whole, with its gradients
    return ModelStates(b * partition + gathered + frozen_bytes, 4 * partition, 12 * partition)


def buffer_bytes(trainable: int, dp: int, zero_stage: int, dtype: str, deepspeed: dict[str, Any]) -> float:
    """DeepSpeed's communication buckets on one rank (module docstring)."""
    b = DTYPE_BYTES[dtype]
    zero = deepspeed.get("zero_optimization", {})
    reduce_bucket = min(float(zero.get("reduce_bucket_size", _DEFAULT_BUCKET)), trainable)
    if zero_stage == 0:
        return b * min(float(deepspeed.get("allreduce_bucket_size", _DEFAULT_BUCKET)), trainable) if dp > 1 else 0.0
    if zero_stage in (1, 2):
        return b * reduce_bucket * (2 if zero.get("overlap_comm", False) else 1)
    prefetch = min(float(zero.get("stage3_prefetch_bucket_size", _DEFAULT_PREFETCH)), trainable)
    return b * (reduce_bucket + prefetch)
