"""Backbone-only language-model training on DeepSpeed (`megadual train-lm`).

One entry for every layout: a plain `python` process (a world of one), or 2..N ranks from
`deepspeed` / `torchrun`, in tp x dp (ZeRO 0-3) or tp x pp x dp (ZeRO 0/1).

Writes into `run.out_dir` (rank 0): config.yaml (the resolved config), metrics.jsonl (one
JSON object per optimizer step: step, loss, lr, grad_norm, tokens, step_time) and DeepSpeed
checkpoints under checkpoints/step_N/ (model, optimizer, LR schedule, loader position).
`resume=True` continues from the newest complete checkpoint: the loss trajectory is the
one an uninterrupted run would have had (the run has no dropout, so no RNG state matters).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

from megadual.config import Config, dump_config
from megadual.data.text_lm import ByteTokenizer, PackedTextLoader, load_documents
from megadual.distributed.runtime import init_distributed
from megadual.distributed.topology import Topology, plan_layout

from .engine import build_lm_engine, train_step

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


@dataclass
class LMRunResult:
    """What a finished run reports back to its caller (figures of this invocation)."""

    run_dir: str
    first_loss: float
    last_loss: float
    steps_run: int


def _step_tag(step: int) -> str:
    return f"step_{step:06d}"


def latest_step(run_dir: str) -> Optional[int]:
    """The step of the newest complete DeepSpeed checkpoint (its `latest` file), or None."""
    latest = os.path.join(run_dir, CHECKPOINTS, "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest, encoding="utf-8") as f:
        return int(f.read().strip().removeprefix("step_"))


def _limit_threads(world_size: int) -> None:
    """The `deepspeed` launcher leaves OMP_NUM_THREADS unset; share the cores between ranks
    instead of letting every rank use all of them (many times slower on small machines)."""
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def train_lm(cfg: Config, resume: bool = False, show_progress: bool = True) -> LMRunResult:
    """Train the backbone on packed text as the config says, in the launched layout.

    Args:
        cfg: the root config; needs the `backbone` and `train` sections.
        resume: continue from the latest checkpoint in `run.out_dir` if there is one.

    Returns:
        The run directory and the first and last losses of this invocation.

    Raises:
        ConfigError: a bad layout, found before any process-group work.
    """
    cfg.require("backbone", "train", command="train-lm")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    layout = plan_layout(cfg.parallel, cfg.backbone, world_size)
    tokenizer = ByteTokenizer()
    if tokenizer.vocab_size > cfg.backbone.vocab_size:
        raise ValueError(
            f"backbone.vocab_size: got {cfg.backbone.vocab_size}, expected at least {tokenizer.vocab_size} "
            "(the byte tokenizer's vocabulary)"
        )
    _limit_threads(world_size)
    info = init_distributed()
    topology = Topology(layout)
    is_writer = info.rank == 0
    run_dir = cfg.run.out_dir
    if is_writer:
        os.makedirs(run_dir, exist_ok=True)
        dump_config(cfg, os.path.join(run_dir, "config.yaml"))

    loader = PackedTextLoader(
        load_documents(cfg.data, cfg.run.seed),
        cfg.train.seq_len,
        cfg.train.micro_batch_size,
        seed=cfg.run.seed,
        rank=topology.dp_rank,
        world_size=layout.dp,
    )
    lm = build_lm_engine(cfg, topology)
    engine = lm.engine
    checkpoint_root = os.path.join(run_dir, CHECKPOINTS)

    start_step = 0
    if resume and latest_step(run_dir) is not None:
        _, client_state = engine.load_checkpoint(checkpoint_root)
        loader.load_state_dict(client_state["loader"])
        start_step = client_state["step"]
        logger.info("resumed from %s at step %d", checkpoint_root, start_step)
    elif cfg.train.init_from:
        start_step = _continue_from_init(cfg.train.init_from, engine, loader)

    def save(step: int) -> None:
        # Collective: every rank writes its partitions; `latest` is updated once all are written.
        engine.save_checkpoint(checkpoint_root, tag=_step_tag(step),
                               client_state={"loader": loader.state_dict(), "step": step})

    total = cfg.train.steps
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.seq_len * layout.dp
    losses: list[float] = []
    engine.train()
    metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8") if is_writer else None
    progress = tqdm(total=total, initial=start_step, desc="train-lm", unit="step",
                    disable=not (show_progress and is_writer))
    try:
        for step in range(start_step, total):
            started = time.perf_counter()
            lr = engine.get_lr()[0]
            batches = [next(loader) for _ in range(cfg.train.grad_accum)]
            result = train_step(lm, batches, topology)
            loss = result.loss
            losses.append(loss)
            if is_writer:
                record = {
                    "step": step + 1,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": result.grad_norm,
                    "tokens": tokens_per_step,
                    "step_time": time.perf_counter() - started,
                }
                metrics.write(json.dumps(record) + "\n")
                if (step + 1) % cfg.run.log_every == 0 or step + 1 == total:
                    metrics.flush()
                    progress.set_postfix(loss=f"{loss:.3f}")
            progress.update(1)
            if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < total:
                save(step + 1)
        if start_step < total:
            save(total)
    finally:
        progress.close()
        if metrics:
            metrics.close()
    _write_rank_stats(run_dir, info.rank)
    return LMRunResult(
        run_dir=run_dir,
        first_loss=losses[0] if losses else float("nan"),
        last_loss=losses[-1] if losses else float("nan"),
        steps_run=len(losses),
    )


def _continue_from_init(path: str, engine, loader: PackedTextLoader) -> int:
    """Weights came in with the engine; a resharded run also continues its step, LR schedule
    and data position (the optimizer's moments start afresh: they are not resharded)."""
    from .init_checkpoint import open_init_checkpoint

    state = open_init_checkpoint(path).trainer_state
    if not state:
        return 0
    loader.load_state_dict(state["loader"])
    for _ in range(state["step"]):
        engine.lr_scheduler.step()
    logger.info("continuing from init checkpoint %s at step %d", path, state["step"])
    return int(state["step"])


def _write_rank_stats(run_dir: str, rank: int) -> None:
    """ranks/rank_N.json: this rank's peak host memory (and device memory on GPU)."""
    import resource

    stats = {"rank": rank, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        stats["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    os.makedirs(os.path.join(run_dir, "ranks"), exist_ok=True)
    with open(os.path.join(run_dir, "ranks", f"rank_{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f)


def main(args) -> int:
    """`megadual train-lm`: the parsed arguments carry --config/--set and --resume."""
    from megadual.config import config_from_args

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = train_lm(config_from_args(args), resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {result.steps_run} steps in {result.run_dir}: loss {result.first_loss:.4f} -> {result.last_loss:.4f}")
    return 0
