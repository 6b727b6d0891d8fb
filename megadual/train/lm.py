"""Backbone-only language-model training on DeepSpeed (`megadual train-lm`).

One entry for every layout: a plain `python` process (a world of one), or 2..N ranks from
`deepspeed` / `torchrun`, in tp x dp (ZeRO 0-3) or tp x pp x dp (ZeRO-1). The loop, the
run directory and resume are `megadual.train.loop`'s: config.yaml, metrics.jsonl,
checkpoints/step_N/, ranks/rank_N.json. The run has no dropout, so a resumed run follows
the uninterrupted loss trajectory without any RNG state.
"""

from __future__ import annotations

import logging

from megadual.config import Config
from megadual.data.text_lm import ByteTokenizer, PackedTextLoader, load_documents

from .engine import build_lm_engine, train_step
from .loop import LoopSettings, RunResult, TrainingJob, latest_step, run_loop, start_run, trainer_main

logger = logging.getLogger(__name__)

__all__ = ["RunResult", "latest_step", "train_lm"]


def train_lm(cfg: Config, resume: bool = False, show_progress: bool = True) -> RunResult:
    """Train the backbone on packed text as the config says, in the launched layout.

    Args:
        cfg: the root config; needs the `backbone` and `train` sections.
        resume: continue from the latest checkpoint in `run.out_dir` if there is one.

    Raises:
        ConfigError: a bad layout, found before any process-group work.
    """
    cfg.require("backbone", "train", command="train-lm")
    tokenizer = ByteTokenizer()
    if tokenizer.vocab_size > cfg.backbone.vocab_size:
        raise ValueError(
            f"backbone.vocab_size: got {cfg.backbone.vocab_size}, expected at least {tokenizer.vocab_size} "
            "(the byte tokenizer's vocabulary)"
        )
    info, topology = start_run(cfg)
    loader = PackedTextLoader(
        load_documents(cfg.data, cfg.run.seed),
        cfg.train.seq_len,
        cfg.train.micro_batch_size,
        seed=cfg.run.seed,
        rank=topology.dp_rank,
        world_size=topology.layout.dp,
    )
    lm = build_lm_engine(cfg, topology)
    job = TrainingJob(
        engine=lm.engine,
        loader=loader,
        step=lambda batches: train_step(lm, batches, topology),
        tokens_per_step=cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.seq_len * topology.layout.dp,
        name="train-lm",
        settings=LoopSettings.of_train(cfg),
        dp_rank=topology.dp_rank,
        dp_size=topology.layout.dp,
        dp_group=topology.dp_group,
    )
    return run_loop(cfg, job, info, resume, show_progress)


def main(args) -> int:
    """`megadual train-lm`: the parsed arguments carry --config/--set and --resume."""
    return trainer_main(train_lm, args)
