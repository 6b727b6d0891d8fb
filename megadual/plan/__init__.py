"""`megadual plan`: per-rank memory and throughput of training layouts, before any GPU is booked.

The models a command trains are built on the meta device (exact parameter counts, no memory);
one decoder layer and the step's heads are traced there at full size (megadual.plan.trace);
DeepSpeed's layout of model states per ZeRO stage (megadual.plan.memory) and the 1F1B pipeline
schedule (megadual.plan.layouts) turn them into bytes per rank and seconds per step.

What the plan counts is what a training process allocates for the run: it leaves out the
process's own baseline (the framework, the CUDA context, loaded libraries), which a GPU
plan covers with `reserve_bytes` and which the CPU checks subtract as measured before the
model is built. Unified-model samples are taken to be one image and a caption of
`caption_tokens` tokens; packed documents of `doc_len` tokens set the attention FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megadual.config.schema import Config

from .layouts import (Cluster, Layout, LayoutEstimate, candidate_layouts, config_layout, estimate, global_batch,
                      refusal)
from .parts import Part, build_meta_models, count_parts
from .workload import MicroBatchWork, backbone_work, tokenizer_work

__all__ = ["Cluster", "Layout", "LayoutEstimate", "Plan", "command_of", "make_plan"]


def command_of(cfg: Config) -> str:
    """The training command a config is for: the unified model, the tokenizer or the backbone."""
    if cfg.mllm is not None:
        return "train"
    if cfg.tokenizer_train is not None:
        return "train-tokenizer"
    if cfg.backbone is not None and cfg.train is not None:
        return "train-lm"
    raise ValueError("plan: the config has no 'mllm:', 'tokenizer_train:' or 'backbone:' + 'train:' section; "
                     "pass a training config (configs/qwen2.5-3b.yaml, configs/debug/mllm.yaml, ...)")


@dataclass
class Plan:
    command: str
    cluster: Cluster
    parts: list[Part]
    layouts: list[LayoutEstimate]  # best first: fitting layouts by tokens/s, then the rest by memory
    refusals: list[tuple[Layout, str]]
    assumptions: dict

    @property
    def num_parameters(self) -> int:
        return sum(p.params for p in self.parts if p.trainable)

    def as_dict(self) -> dict:
        return {"command": self.command, "num_parameters": self.num_parameters,
                "parts": {p.name: p.params for p in self.parts},
                "frozen_parts": [p.name for p in self.parts if not p.trainable],
                "cluster": vars(self.cluster), "assumptions": self.assumptions,
                "layouts": [e.as_dict() for e in self.layouts],
                "refusals": [{**vars(layout), "reason": reason} for layout, reason in self.refusals]}


def make_plan(cfg: Config, cluster: Cluster, search: bool = False, caption_tokens: int = 64,
              doc_len: Optional[int] = None) -> Plan:
    """Estimate the config's own layout on `cluster`, or every layout when `search`.

    Raises:
        ValueError: the config is not a training config, or --gpus does not fit its layout.
    """
    command = command_of(cfg)
    cfg.validate()
    models = build_meta_models(cfg, command)
    parts = count_parts(cfg, command, models)
    global_batch(cfg, command, cluster.gpus)  # raises when --gpus does not fit the config's tp x pp
    layouts = candidate_layouts(cfg, command, cluster) if search else [config_layout(cfg, command, cluster.gpus)]
    if not search:
        reason = refusal(cfg, command, layouts[0], cluster)
        if reason:
            lay = layouts[0]
            raise ValueError(f"the config's layout (tp={lay.tp}, pp={lay.pp}, dp={lay.dp}, "
                             f"zero_stage={lay.zero_stage}) cannot run: {reason}")
    if doc_len is None:
        doc_len = cfg.mllm.num_positions + caption_tokens + 3 if command == "train" else _seq_len(cfg, command)
    tied = bool(cfg.backbone and cfg.backbone.tie_embeddings)
    works: dict[tuple[int, int], MicroBatchWork] = {}
    estimates, refusals = [], []
    for layout in layouts:
        reason = refusal(cfg, command, layout, cluster)
        if reason:
            refusals.append((layout, reason))
            continue
        key = (layout.tp, layout.micro_batch_size)
        if key not in works:
            works[key] = (tokenizer_work(cfg, models, layout.micro_batch_size) if command == "train-tokenizer"
                          else backbone_work(cfg, command, models, layout.tp, layout.micro_batch_size,
                                             caption_tokens, doc_len))
        estimates.append(estimate(cfg, command, parts, works[key], layout, cluster, tied))
    estimates.sort(key=lambda e: (not e.fits, -e.tokens_per_s if e.fits else e.memory_per_rank_bytes["total"]))
    assumptions = {"doc_len": doc_len, "seq_len": _seq_len(cfg, command),
                   "caption_tokens": caption_tokens if command == "train" else None,
                   "process_baseline": "not counted (reserve_bytes covers it on GPUs)"}
    return Plan(command, cluster, parts, estimates, refusals, assumptions)


def _seq_len(cfg: Config, command: str) -> int:
    if command == "train-tokenizer":
        return cfg.tokenizer.tower.grid_size ** 2
    return cfg.train.seq_len
