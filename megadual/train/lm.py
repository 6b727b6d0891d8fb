"""Backbone-only language-model training in one process (`megadual train-lm`).

Writes into `run.out_dir`: config.yaml (the resolved config), metrics.jsonl (one JSON
object per optimizer step: step, loss, lr, grad_norm, tokens, step_time) and
checkpoints/step_N/ (model, optimizer, loader position, RNG). Rerunning with
`resume=True` continues from the latest checkpoint exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from megadual.config import Config, dump_config
from megadual.data.text_lm import IGNORE_INDEX, ByteTokenizer, PackedTextLoader, load_documents
from megadual.models.qwen2 import Qwen2ForCausalLM, build_qwen2, load_hf

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .schedule import lr_at

logger = logging.getLogger(__name__)


@dataclass
class LMRunResult:
    """What a finished run reports back to its caller."""

    run_dir: str
    first_loss: float
    last_loss: float
    steps_run: int


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms or other vectors).

    torch's fused AdamW on CUDA and its foreach kernel on CPU take the place of apex's.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(
        groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, fused=on_cuda, foreach=not on_cuda
    )


def build_lm(cfg: Config) -> Qwen2ForCausalLM:
    """The backbone the config asks for: from a local HF directory, or random with the run seed."""
    if cfg.backbone.hf_path:
        return load_hf(cfg.backbone.hf_path, attn_impl=cfg.backbone.attn_impl)
    return build_qwen2(cfg.backbone, seed=cfg.run.seed)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over labelled positions, and how many there are.

    Shapes: logits [B, T, V], labels [B, T] with IGNORE_INDEX where there is no target.
    """
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((labels != IGNORE_INDEX).sum())


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def train_lm(cfg: Config, resume: bool = False, show_progress: bool = True) -> LMRunResult:
    """Train the backbone on packed text as the config says.

    Args:
        cfg: the root config; needs the `backbone` and `train` sections.
        resume: continue from the latest checkpoint in `run.out_dir` if there is one.

    Returns:
        The run directory and the first and last logged losses of this invocation.
    """
    cfg.require("backbone", "train", command="train-lm")
    run_dir = cfg.run.out_dir
    os.makedirs(run_dir, exist_ok=True)
    dump_config(cfg, os.path.join(run_dir, "config.yaml"))

    tokenizer = ByteTokenizer()
    if tokenizer.vocab_size > cfg.backbone.vocab_size:
        raise ValueError(
            f"backbone.vocab_size: got {cfg.backbone.vocab_size}, expected at least {tokenizer.vocab_size} "
            "(the byte tokenizer's vocabulary)"
        )
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    model = build_lm(cfg)
    model.backbone.activation_checkpointing = cfg.train.activation_checkpointing
    optimizer = build_optimizer(model, cfg)
    loader = PackedTextLoader(
        load_documents(cfg.data, cfg.run.seed), cfg.train.seq_len, cfg.train.micro_batch_size, seed=cfg.run.seed
    )

    start_step = 0
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint:
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        _set_rng_state(state["rng"])
        start_step = state["step"]
        logger.info("resumed from %s at step %d", checkpoint, start_step)

    def save(step: int) -> None:
        save_checkpoint(
            run_dir,
            step,
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "loader": loader.state_dict(),
                "rng": _rng_state(),
            },
        )

    autocast = torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16,
                              enabled=cfg.train.dtype == "bf16")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    losses: list[float] = []
    model.train()
    total = cfg.train.steps
    with open(metrics_path, "a", encoding="utf-8") as metrics, tqdm(
        total=total, initial=start_step, desc="train-lm", unit="step", disable=not show_progress
    ) as progress:
        for step in range(start_step, total):
            started = time.perf_counter()
            lr = lr_at(step, cfg.optim, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = [next(loader) for _ in range(cfg.train.grad_accum)]
            # Normalise by the step's target count, so accumulation equals one big batch.
            num_targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
            step_loss = 0.0
            for batch in micro_batches:
                with autocast:
                    logits = model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"])
                loss_sum, _ = lm_loss(logits, batch["labels"])
                (loss_sum / num_targets).backward()
                step_loss += float(loss_sum.detach()) / num_targets
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            record = {
                "step": step + 1,
                "loss": step_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": sum(b["input_ids"].numel() for b in micro_batches),
                "step_time": time.perf_counter() - started,
            }
            metrics.write(json.dumps(record) + "\n")
            losses.append(step_loss)
            progress.update(1)
            if (step + 1) % cfg.run.log_every == 0 or step + 1 == total:
                metrics.flush()
                progress.set_postfix(loss=f"{step_loss:.3f}")
            if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < total:
                save(step + 1)
    if start_step < total:
        save(total)
    return LMRunResult(
        run_dir=run_dir,
        first_loss=losses[0] if losses else float("nan"),
        last_loss=losses[-1] if losses else float("nan"),
        steps_run=len(losses),
    )


def main(args) -> int:
    """`megadual train-lm`: the parsed arguments carry --config/--set and --resume."""
    from megadual.config import config_from_args

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = train_lm(config_from_args(args), resume=args.resume)
    print(f"trained {result.steps_run} steps in {result.run_dir}: loss {result.first_loss:.4f} -> {result.last_loss:.4f}")
    return 0
