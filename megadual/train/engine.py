"""Build the DeepSpeed engine for the backbone LM in any supported layout.

- tp x dp, ZeRO 0-3: the single-process `Qwen2ForCausalLM` with tensor-parallel layers,
  constructed under `deepspeed.zero.Init` for ZeRO-3 (each parameter partitioned over the
  data-parallel group as soon as it is built), wrapped with our `mpu`.
- tp x pp x dp, ZeRO 0/1: the `PipelineModule` of the same blocks and DeepSpeed's 1F1B engine.

The loss is the mean next-token NLL over the labelled tokens of a micro-batch, computed
from vocabulary-sharded logits; DeepSpeed averages it over accumulation steps and
data-parallel ranks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import deepspeed
import torch

from megadual.config.errors import ConfigError
from megadual.config.schema import Config
from megadual.data.text_lm import IGNORE_INDEX
from megadual.distributed.comm import ProcessGroup
from megadual.distributed.deepspeed_config import build_deepspeed_config
from megadual.distributed.pipeline import build_pipeline_module
from megadual.distributed.tensor_parallel import vocab_parallel_cross_entropy
from megadual.distributed.topology import Topology
from megadual.models.qwen2 import Qwen2ForCausalLM, load_hf

from .init_checkpoint import check_compatible, open_init_checkpoint, pipeline_state_names, read_rank_tensors
from .loop import StepResult
from .schedule import lr_at


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, tp_group: ProcessGroup = None) -> torch.Tensor:
    """Mean next-token NLL over labelled positions (fp32).

    Shapes: logits [B, T, V/p] (this rank's vocabulary slice), labels [B, T] with
    IGNORE_INDEX where there is no target.
    """
    per_token = vocab_parallel_cross_entropy(logits, labels, tp_group, IGNORE_INDEX)
    return per_token.sum() / (labels != IGNORE_INDEX).sum().clamp(min=1)


def load_init_weights(module: torch.nn.Module, cfg: Config, topology: Topology) -> None:
    """Copy an init checkpoint's weights into the freshly built module, in any layout.

    The module holds what the checkpoint holds: the causal LM (or its pipeline) for a backbone
    checkpoint, the whole unified model (or its pipeline) for a unified-model checkpoint.
    ZeRO-3 parameters are partitioned placeholders: each is gathered, written on the
    data-parallel group's first rank and re-partitioned (one parameter at a time, so memory
    stays near the largest tensor).
    """
    ckpt = open_init_checkpoint(cfg.train.init_from)
    check_compatible(ckpt, cfg.backbone, topology.layout.tp, cfg.mllm)
    if topology.layout.pp > 1:
        names = pipeline_state_names(module, cfg.backbone.num_layers, unified=ckpt.mllm is not None)
        tensors = read_rank_tensors(ckpt, topology.tp_rank, set(names.values()))
        module.load_state_dict({key: tensors[name] for key, name in names.items()}, strict=True)
        return
    tensors = read_rank_tensors(ckpt, topology.tp_rank)
    if cfg.parallel.zero_stage < 3:
        module.load_state_dict(tensors, strict=True)
        return
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if topology.dp_rank == 0:
                param.data.copy_(tensors[name])


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only. ZeRO-3 parameters are flat placeholders: use `ds_shape`."""

    def ndim(p):
        return len(getattr(p, "ds_shape", p.shape))

    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if ndim(p) >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if ndim(p) < 2], "weight_decay": 0.0},
    ]


@dataclass
class LMEngine:
    """A DeepSpeed engine and how to feed it."""

    engine: Any  # deepspeed.DeepSpeedEngine or deepspeed.PipelineEngine
    is_pipeline: bool
    ds_config: dict[str, Any]


def construction_context(cfg: Config, topology: Topology, ds_config: dict[str, Any]):
    """Where to build a non-pipeline model: under ZeRO-3 each parameter is partitioned over
    the data-parallel group as soon as its module is built (`deepspeed.zero.Init`)."""
    return deepspeed.zero.Init(
        data_parallel_group=topology.dp_group,
        config_dict_or_path=ds_config,
        mpu=topology.mpu(),
        enabled=cfg.parallel.zero_stage == 3,
    )


def initialize_engine(cfg: Config, module: torch.nn.Module, ds_config: dict[str, Any], mpu) -> Any:
    """`deepspeed.initialize` with torch AdamW over the trainable parameters (decay on matrices
    only) and the config's LR schedule as a LambdaLR that DeepSpeed steps and checkpoints."""

    def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_at(step, cfg.optim, cfg.train.steps) / cfg.optim.lr
        )

    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=param_groups(module, cfg.optim.weight_decay),
        config=ds_config,
        mpu=mpu,
        lr_scheduler=schedule,
    )
    return engine


def build_lm_engine(cfg: Config, topology: Topology) -> LMEngine:
    """Model, optimizer (torch AdamW via DeepSpeed), LR schedule and engine for `cfg`.

    Raises:
        ConfigError: a layout this trainer cannot build (e.g. HF initialisation with tp/pp > 1,
            which needs the checkpoint converter's from-hf output).
    """
    layout = topology.layout
    backbone = cfg.backbone
    ds_config = build_deepspeed_config(cfg, layout)
    if backbone.hf_path and (layout.tp > 1 or layout.pp > 1 or cfg.parallel.zero_stage == 3):
        raise ConfigError(
            "backbone.hf_path",
            backbone.hf_path,
            "use with parallel.tp=1, parallel.pp=1 and zero_stage<3; for other layouts convert the "
            "HF directory into a MegaDual checkpoint of that layout first",
        )

    if layout.pp > 1:
        module = build_pipeline_module(
            backbone,
            topology,
            loss_fn=functools.partial(lm_loss, tp_group=topology.tp_group),
            seed=cfg.run.seed,
            activation_checkpoint_interval=1 if cfg.train.activation_checkpointing else 0,
        )
        mpu = None  # the pipeline module carries DeepSpeed's own grid
    else:
        mpu = topology.mpu()
        with construction_context(cfg, topology, ds_config):
            if backbone.hf_path:
                module = load_hf(backbone.hf_path, attn_impl=backbone.attn_impl)
            else:
                module = Qwen2ForCausalLM(backbone, topology.tp_group, seed=cfg.run.seed)
        module.backbone.activation_checkpointing = cfg.train.activation_checkpointing
    if cfg.train.init_from:
        load_init_weights(module, cfg, topology)
    engine = initialize_engine(cfg, module, ds_config, mpu)
    return LMEngine(engine=engine, is_pipeline=layout.pp > 1, ds_config=ds_config)


def unsharded_grad_norm(module: torch.nn.Module, tp_group: ProcessGroup) -> float:
    """Global gradient 2-norm of a ZeRO-0 model: tensor-parallel shards count on every rank,
    replicated parameters once (on tp rank 0)."""
    first = tp_group is None or torch.distributed.get_rank(tp_group) == 0
    # On the gradients' device: NCCL reduces CUDA tensors only, and one sync at the end
    # beats one per parameter.
    device = next((p.grad.device for p in module.parameters() if p.grad is not None), torch.device("cpu"))
    total = torch.zeros((), dtype=torch.float32, device=device)
    for p in module.parameters():
        if p.grad is not None and (first or getattr(p, "tensor_model_parallel", False)):
            total += p.grad.detach().float().pow(2).sum()
    if tp_group is not None:
        torch.distributed.all_reduce(total, group=tp_group)
    return float(total.sqrt())


def train_step(lm: LMEngine, batches: list[dict[str, torch.Tensor]], topology: Topology) -> StepResult:
    """One optimizer step over `batches` (one micro-batch per accumulation step)."""
    engine = lm.engine
    if lm.is_pipeline:
        from megadual.distributed.pipeline import pad_cu_seqlens

        def stream():
            for b in batches:
                num_tokens = b["input_ids"].numel()
                yield (b["input_ids"], b["position_ids"], pad_cu_seqlens(b["cu_seqlens"], num_tokens)), b["labels"]

        loss = float(engine.train_batch(data_iter=stream()))
        return StepResult(loss, _engine_grad_norm(engine))

    device = engine.device
    total = torch.zeros((), device=device)
    grad_norm = None
    for i, b in enumerate(batches):
        logits = engine(b["input_ids"].to(device), b["position_ids"].to(device), b["cu_seqlens"].to(device))
        loss = lm_loss(logits, b["labels"].to(device), topology.tp_group)
        engine.backward(loss)
        if i == len(batches) - 1 and engine.zero_optimization_stage() == 0:
            # DeepSpeed reports no norm without ZeRO; after the boundary backward the gradients
            # are averaged over data-parallel ranks and not yet clipped.
            grad_norm = unsharded_grad_norm(engine.module, topology.tp_group)
        engine.step()
        total += loss.detach()
    total /= len(batches)
    if topology.layout.dp > 1:
        torch.distributed.all_reduce(total, group=topology.dp_group)
        total /= topology.layout.dp
    return StepResult(float(total), grad_norm if grad_norm is not None else _engine_grad_norm(engine))


def _engine_grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)
