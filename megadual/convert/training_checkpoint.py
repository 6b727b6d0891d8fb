"""Read a DeepSpeed training checkpoint of any layout as the single-process model's tensors.

The model is the backbone alone (`megadual train-lm`) or the unified model (`megadual train`,
whose run config has an mllm section); `CheckpointModel` says which and knows its names.
Layouts and where the weights are (t = tensor-parallel rank, i = pipeline layer):
- pipeline (pp > 1): layer_{i:02d}-model_{t:02d}-model_states.pt, one per layer and tp rank;
- ZeRO-1/2/3 without pipeline: fp32 partitions in zero_pp_rank_*_mp_rank_{t:02d}_*, merged
  over data-parallel ranks with DeepSpeed's own `zero_to_fp32`, one tp rank at a time;
- ZeRO-0 without pipeline: mp_rank_{t:02d}_model_states.pt ("module").
Tensor-parallel shards are then merged along the dimension their layer type splits.
The run's config.yaml (written by every trainer) says which layout it is.
"""

from __future__ import annotations

import glob
import os
import tempfile
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from torch import nn

from megadual.config import Config, load_config
from megadual.config.schema import BackboneConfig, MLLMConfig
from megadual.distributed.pipeline import pipeline_to_model_name
from megadual.distributed.pipeline_mllm import (
    mllm_pipeline_num_layers,
    mllm_pipeline_to_model_name,
    mllm_text_head_layer,
)
from megadual.models.mllm import DualTokenMLLM
from megadual.models.qwen2 import Qwen2ForCausalLM
from megadual.train.checkpoint import checkpoint_tag_dir

from .sharding import StateDict, merge_tensor_parallel, partition_dims


class CheckpointError(ValueError):
    """A directory that is not a readable MegaDual checkpoint (message says what is wrong)."""


@dataclass(frozen=True)
class CheckpointModel:
    """The model whose tensors a checkpoint holds: `Qwen2ForCausalLM` (mllm None) or
    `DualTokenMLLM`, which keeps the backbone's causal LM under `lm.`."""

    backbone: BackboneConfig
    mllm: Optional[MLLMConfig] = None

    @property
    def prefix(self) -> str:
        return "lm." if self.mllm is not None else ""

    @property
    def embedding(self) -> str:
        return f"{self.prefix}backbone.embed_tokens.weight"

    @property
    def tied_head(self) -> Optional[str]:
        """The head's name when it is the embedding (tied; stored once, with the embedding)."""
        return f"{self.prefix}lm_head.weight" if self.backbone.tie_embeddings else None

    def build_meta(self) -> nn.Module:
        """The single-process model on the meta device (names, shapes, split dims; no memory)."""
        with torch.device("meta"):
            if self.mllm is not None:
                return DualTokenMLLM(self.backbone, self.mllm)
            return Qwen2ForCausalLM(self.backbone)

    # Pipeline layer lists: megadual.distributed.pipeline (backbone), pipeline_mllm (unified).

    def pipeline_layers(self) -> int:
        n = self.backbone.num_layers
        return mllm_pipeline_num_layers(n) if self.mllm is not None else n + 3

    def pipeline_text_head_layer(self) -> int:
        n = self.backbone.num_layers
        return mllm_text_head_layer(n) if self.mllm is not None else n + 2

    def pipeline_name(self, layer: int, key: str) -> str:
        n = self.backbone.num_layers
        return mllm_pipeline_to_model_name(layer, key, n) if self.mllm is not None else pipeline_to_model_name(layer, key, n)

    def describe(self) -> str:
        return "unified model" if self.mllm is not None else "backbone"


@dataclass
class TrainingCheckpoint:
    """A located checkpoint: its run config and tag directory."""

    cfg: Config
    path: str

    @property
    def tp(self) -> int:
        return self.cfg.parallel.tp

    @property
    def pp(self) -> int:
        return self.cfg.parallel.pp

    @property
    def model(self) -> CheckpointModel:
        """A run with an mllm section is a `megadual train` run of the unified model."""
        return CheckpointModel(self.cfg.backbone, self.cfg.mllm)


def open_training_checkpoint(run_dir: str, tag: Optional[str] = None) -> TrainingCheckpoint:
    """Find the run's config and checkpoint `tag` (default: the newest complete one).

    Raises:
        CheckpointError: no config.yaml, or no backbone section in it.
        FileNotFoundError: no such checkpoint.
    """
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{run_dir} is not a MegaDual run directory: it has no config.yaml")
    cfg = load_config(config_path)
    if cfg.backbone is None:
        raise CheckpointError(f"{config_path} has no backbone section")
    return TrainingCheckpoint(cfg=cfg, path=checkpoint_tag_dir(run_dir, tag))


def _load(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint shard {path} is missing")
    # mmap: tensors stay on disk until read, so merging streams instead of holding every rank.
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def _pipeline_rank_state(ckpt: TrainingCheckpoint, tp_rank: int) -> StateDict:
    model = ckpt.model
    state: StateDict = {}
    for layer in range(model.pipeline_layers()):
        path = os.path.join(ckpt.path, f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt")
        if layer == model.pipeline_text_head_layer() and model.tied_head is not None:
            continue  # the tied head is saved once, with the embedding
        for key, tensor in _load(path).items():
            state[model.pipeline_name(layer, key)] = tensor
    return state


def _zero_rank_state(ckpt: TrainingCheckpoint, tp_rank: int) -> StateDict:
    """DeepSpeed's zero_to_fp32 on the files of one tensor-parallel rank (it globs every
    *_model_states.pt / *_optim_states.pt in a directory, so give it a directory of one rank)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    files = glob.glob(os.path.join(ckpt.path, f"*mp_rank_{tp_rank:02d}_*states.pt"))
    if not any(f.endswith("_optim_states.pt") for f in files):
        raise FileNotFoundError(f"{ckpt.path} has no optimizer partitions for tensor-parallel rank {tp_rank}")
    with tempfile.TemporaryDirectory() as tmp:
        tag_dir = os.path.join(tmp, "tag")
        os.makedirs(tag_dir)
        for f in files:
            os.symlink(os.path.abspath(f), os.path.join(tag_dir, os.path.basename(f)))
        return dict(get_fp32_state_dict_from_zero_checkpoint(tmp, tag="tag"))


def _plain_rank_state(ckpt: TrainingCheckpoint, tp_rank: int) -> StateDict:
    return dict(_load(os.path.join(ckpt.path, f"mp_rank_{tp_rank:02d}_model_states.pt"))["module"])


def read_rank_states(ckpt: TrainingCheckpoint) -> list[StateDict]:
    """One state dict per tensor-parallel rank, in single-process names (shards not merged)."""
    if ckpt.pp > 1:
        reader = _pipeline_rank_state
    elif ckpt.cfg.parallel.zero_stage > 0:
        reader = _zero_rank_state
    else:
        reader = _plain_rank_state
    return [reader(ckpt, t) for t in range(ckpt.tp)]


def expected_tensors(model: CheckpointModel) -> dict[str, torch.Size]:
    """Names and full shapes of the single-process model."""
    return {name: t.shape for name, t in model.build_meta().state_dict().items()}


class TensorSource:
    """The full tensors of a checkpoint, merged across tensor-parallel ranks one at a time.

    Conversions stream through `items()`, so memory holds one merged tensor at a time (rank
    files are memory-mapped or read lazily; ZeRO partitions are the exception: DeepSpeed's
    zero_to_fp32 returns whole state dicts). A tied output head is not listed: it is the
    embedding (`state_dict()` adds it back for loading into a model).

    Args:
        model: the model (and architecture) the tensors must match.
        rank_tensors: per tensor-parallel rank, a mapping name -> tensor (may be lazy).
    """

    def __init__(self, model: CheckpointModel, rank_tensors: list, trainer_state=None, description: str = ""):
        self.model = model
        self.trainer_state = trainer_state
        self.description = description
        self._ranks = rank_tensors
        meta = model.build_meta()
        self._dims = partition_dims(meta)
        self._expected = {name: t.shape for name, t in meta.state_dict().items()}
        if model.tied_head is not None:
            self._expected.pop(model.tied_head)
        # Training checkpoints of a tied model also list the head: it is the embedding.
        present = set(rank_tensors[0].keys()) - {model.tied_head}
        missing, unexpected = sorted(set(self._expected) - present), sorted(present - set(self._expected))
        if missing or unexpected:
            raise CheckpointError(f"{description}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")

    @property
    def backbone(self) -> BackboneConfig:
        return self.model.backbone

    def names(self) -> list[str]:
        """Stable order: embedding, layers by index, norm, head."""
        return sorted(self._expected, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")])

    def get(self, name: str) -> torch.Tensor:
        tensor = merge_tensor_parallel([{name: rank[name]} for rank in self._ranks], self._dims)[name]
        if tuple(tensor.shape) != tuple(self._expected[name]):
            raise CheckpointError(
                f"{self.description}: {name!r} has shape {tuple(tensor.shape)}, the run's config implies "
                f"{tuple(self._expected[name])}"
            )
        return tensor

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get(name)

    def state_dict(self) -> StateDict:
        """Every tensor in memory, tied head included (for loading into a model)."""
        state = dict(self.items())
        if self.model.tied_head is not None:
            state[self.model.tied_head] = state[self.model.embedding]
        return state


def check_against_config(state: StateDict, model: CheckpointModel, where: str) -> None:
    """Raise CheckpointError unless `state` holds exactly the model's tensors and shapes."""
    expected = expected_tensors(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise CheckpointError(f"{where}: {name!r} has shape {tuple(state[name].shape)}, config.json implies {tuple(shape)}")


def training_checkpoint_source(ckpt: TrainingCheckpoint, trainer_state=None) -> TensorSource:
    description = (f"training checkpoint {ckpt.path} ({ckpt.model.describe()}, tp={ckpt.tp}, pp={ckpt.pp}, "
                   f"zero={ckpt.cfg.parallel.zero_stage})")
    return TensorSource(ckpt.model, read_rank_states(ckpt), trainer_state, description)
