"""Training layouts of a cluster, what each costs per rank, and how fast it runs.

A layout is tp x pp x dp (= GPUs) with a ZeRO stage, a micro-batch size, gradient
accumulation (micro-batches per step and data-parallel rank) and activation checkpointing.
The global batch (sequences per optimizer step) stays the config's, so layouts compare at
equal optimisation; a layout whose dp x micro-batch does not divide it is not one.

Memory is per rank of the worst pipeline stage. Under DeepSpeed's 1F1B schedule a stage holds
the activations of up to max(2, pp - its index) micro-batches (`_in_flight`); the last stage
also holds the head and its loss; the tied embedding lives on both ends (DeepSpeed's
TiedLayerSpec).

Time: every rank does 3x its forward FLOPs per micro-batch (backward = 2x forward), 4x for
the layers it recomputes under activation checkpointing. A step takes micro-batches + pp - 1
slots of the slowest stage (the 1F1B bubble), at `mfu` x the GPU's peak; tensor-parallel
all-reduces and ZeRO-3 gathers are taken to be inside that efficiency.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from megadual.config.errors import ConfigError
from megadual.config.schema import Config

from .memory import buffer_bytes, model_state_bytes
from .parts import Part
from .workload import MicroBatchWork

# "activations": the decoder layers (and the visual embedding); "heads": what the step's heads
# keep for backward (text logits, the depth heads, their losses) plus the losses' backward peak.
MEMORY_PARTS = ("parameters", "gradients", "optimizer", "activations", "heads", "buffers")


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpus_per_node: int
    gpu_memory_bytes: float
    peak_tflops: float
    mfu: float
    reserve_bytes: float  # CUDA context, NCCL and allocator slack a run cannot use


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero_stage: int
    micro_batch_size: int
    grad_accum: int
    activation_checkpointing: bool


@dataclass
class LayoutEstimate:
    layout: Layout
    memory_per_rank_bytes: dict[str, float] = field(default_factory=dict)
    fits: bool = False
    step_time_s: float = 0.0
    tokens_per_s: float = 0.0
    bubble: float = 0.0
    flops_per_step: dict[str, float] = field(default_factory=dict)
    worst_stage: str = "only"

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self.layout), "memory_per_rank_bytes": self.memory_per_rank_bytes,
                "fits": self.fits, "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
                "pipeline_bubble": self.bubble, "flops_per_step": self.flops_per_step,
                "worst_stage": self.worst_stage}


def global_batch(cfg: Config, command: str, gpus: int) -> int:
    """Sequences (images for the tokenizer) per optimizer step, from the config's own layout."""
    if command == "train-tokenizer":
        t = cfg.tokenizer_train
        return t.micro_batch_size * t.grad_accum * gpus
    ranks = cfg.parallel.tp * cfg.parallel.pp
    if gpus % ranks:
        raise ValueError(f"--gpus {gpus}: not a multiple of parallel.tp x parallel.pp = {ranks}; "
                         f"pick a multiple of {ranks} or change the layout with --set")
    return cfg.train.micro_batch_size * cfg.train.grad_accum * (gpus // ranks)


def config_layout(cfg: Config, command: str, gpus: int) -> Layout:
    if command == "train-tokenizer":
        t = cfg.tokenizer_train
        return Layout(1, 1, gpus, t.zero_stage, t.micro_batch_size, t.grad_accum, t.gradient_checkpointing)
    p, t = cfg.parallel, cfg.train
    return Layout(p.tp, p.pp, gpus // (p.tp * p.pp), p.zero_stage, t.micro_batch_size, t.grad_accum,
                  t.activation_checkpointing)


def refusal(cfg: Config, command: str, layout: Layout, cluster: Cluster) -> Optional[str]:
    """Why MegaDual would not run `layout` (the config check's own words), or None."""
    if layout.tp > cluster.gpus_per_node or cluster.gpus_per_node % layout.tp:
        return (f"tp={layout.tp} would span nodes of {cluster.gpus_per_node} GPUs (tensor-parallel peers "
                "talk every layer: keep a tp group inside one node)")
    try:
        with_layout(cfg, command, layout).validate()
    except ConfigError as exc:
        return str(exc)
    return None


def with_layout(cfg: Config, command: str, layout: Layout) -> Config:
    """`cfg` with the layout's degrees, ZeRO stage and batch split written in."""
    if command == "train-tokenizer":
        t = dataclasses.replace(cfg.tokenizer_train, zero_stage=layout.zero_stage,
                                micro_batch_size=layout.micro_batch_size, grad_accum=layout.grad_accum,
                                gradient_checkpointing=layout.activation_checkpointing)
        return dataclasses.replace(cfg, tokenizer_train=t)
    parallel = dataclasses.replace(cfg.parallel, tp=layout.tp, pp=layout.pp, zero_stage=layout.zero_stage)
    train = dataclasses.replace(cfg.train, micro_batch_size=layout.micro_batch_size, grad_accum=layout.grad_accum,
                                activation_checkpointing=layout.activation_checkpointing)
    return dataclasses.replace(cfg, parallel=parallel, train=train)


def candidate_layouts(cfg: Config, command: str, cluster: Cluster, micro_batches=(1, 2, 4, 8)) -> list[Layout]:
    """Every tp x pp x dp x ZeRO x micro-batch x checkpointing split of the cluster that keeps
    the config's global batch (refusals included: `refusal` says which)."""
    batch = global_batch(cfg, command, cluster.gpus)
    if command == "train-tokenizer":
        shapes, stages = [(1, 1)], (0, 1, 2)
    else:
        shapes = [(tp, pp) for tp in _divisors(cluster.gpus) for pp in _divisors(cluster.gpus // tp)
                  if pp <= cfg.backbone.num_layers]
        stages = (0, 1, 2, 3)
    layouts = []
    for tp, pp in shapes:
        dp = cluster.gpus // (tp * pp)
        for mbs in micro_batches:
            if batch % (dp * mbs):
                continue
            for zero in stages:
                for checkpointing in (False, True):
                    layouts.append(Layout(tp, pp, dp, zero, mbs, batch // (dp * mbs), checkpointing))
    return layouts


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _in_flight(layout: Layout, stage: str) -> int:
    """Micro-batches whose activations a stage holds at once: DeepSpeed's TrainSchedule keeps
    max(2, pp - stage index) pipeline buffers (`num_pipe_buffers`), at most one per micro-batch;
    measured on CPU, its last stage does hold two micro-batches' activations."""
    if layout.pp == 1:
        return 1
    index = 0 if stage == "first" else layout.pp - 1
    return min(max(2, layout.pp - index), layout.grad_accum)


def _stage_params(parts: list[Part], layout: Layout, stage: str, num_layers: int, tied: bool):
    """(trainable, frozen, largest module) parameters on one rank of `stage` ("first"/"last"/"only")."""
    trainable = frozen = largest = 0
    for part in parts:
        here = (part.stage in ("layers", "all") or stage == "only" or part.stage == stage
                or (tied and part.name == "embedding" and stage == "last"))
        if not here:
            continue
        count = part.per_rank(layout.tp, layout.pp, num_layers)
        if part.trainable:
            trainable += count
        else:
            frozen += count
        largest = max(largest, part.largest_module // (layout.tp if part.sharded else 1))
    return trainable, frozen, largest


def _stage_memory(cfg: Config, parts: list[Part], work: MicroBatchWork, layout: Layout, stage: str,
                  dtype: str, tied: bool) -> dict[str, float]:
    """Bytes per rank of one stage ("only" when pp = 1), by MEMORY_PARTS, and their total."""
    sides = ("first", "last") if stage == "only" else (stage,)
    trainable, frozen, largest = _stage_params(parts, layout, stage, work.num_layers, tied)
    states = model_state_bytes(trainable, largest, layout.dp, layout.zero_stage, dtype, frozen)
    per_layer = work.layer_input_bytes if layout.activation_checkpointing else work.layer.saved_bytes
    recompute = work.layer.saved_bytes if layout.activation_checkpointing else 0  # one layer at a time
    first = sum(t.saved_bytes for t in work.first.values()) if "first" in sides else 0
    last = sum(t.saved_bytes for t in work.last.values()) + work.head_transient_bytes if "last" in sides else 0
    layers_here = math.ceil(work.num_layers / layout.pp)
    memory = {
        "parameters": states.parameters, "gradients": states.gradients, "optimizer": states.optimizer,
        "activations": _in_flight(layout, stage) * (layers_here * per_layer + first) + recompute,
        "heads": last,
        "buffers": buffer_bytes(trainable, layout.dp, layout.zero_stage, dtype, cfg.deepspeed),
    }
    memory["total"] = sum(memory[k] for k in MEMORY_PARTS)
    return memory


def _stage_hardware_flops(work: MicroBatchWork, layout: Layout, stage: str) -> float:
    """FLOPs one rank of the stage runs per micro-batch: forward + backward (+ recompute)."""
    sides = ("first", "last") if stage == "only" else (stage,)
    layers = math.ceil(work.num_layers / layout.pp) * work.layer.forward_flops
    others = sum(t.forward_flops for side in sides for t in (work.first if side == "first" else work.last).values())
    return 3 * (layers + others) + (layers if layout.activation_checkpointing else 0)


def _flops_per_step(work: MicroBatchWork, layout: Layout) -> dict[str, float]:
    """Model FLOPs per optimizer step by part, once per model replica: tensor-parallel shards
    add up, replicated parts count once."""
    forward = {"decoder layers": work.num_layers * work.layer.forward_flops * layout.tp}
    for name, t in [*work.first.items(), *work.last.items()]:
        forward[name] = t.forward_flops * (layout.tp if name in work.split_by_tp else 1)
    return {name: 3 * f * layout.grad_accum * layout.dp for name, f in forward.items()}


def estimate(cfg: Config, command: str, parts: list[Part], work: MicroBatchWork, layout: Layout,
             cluster: Cluster, tied: bool) -> LayoutEstimate:
    """Memory per rank, step time and throughput of one layout (module docstring)."""
    dtype = "fp32" if command == "train-tokenizer" else cfg.train.dtype
    stages = ("only",) if layout.pp == 1 else ("first", "last")
    memories = {stage: _stage_memory(cfg, parts, work, layout, stage, dtype, tied) for stage in stages}
    worst = max(stages, key=lambda stage: memories[stage]["total"])
    slots = layout.grad_accum + layout.pp - 1  # 1F1B: the bubble is pp - 1 slots of the slowest stage
    step_time = slots * max(_stage_hardware_flops(work, layout, s) for s in stages) / (
        cluster.peak_tflops * 1e12 * cluster.mfu)
    return LayoutEstimate(
        layout, memory_per_rank_bytes=memories[worst], worst_stage=worst,
        fits=memories[worst]["total"] + cluster.reserve_bytes <= cluster.gpu_memory_bytes,
        step_time_s=step_time, tokens_per_s=work.tokens * layout.grad_accum * layout.dp / step_time,
        bubble=(layout.pp - 1) / slots, flops_per_step=_flops_per_step(work, layout))
