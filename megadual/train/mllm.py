"""Stage-2 training of the unified DualToken MLLM on DeepSpeed (`megadual train`).

Layouts: tp x dp with ZeRO 0-3 (the model is built under `deepspeed.zero.Init` for ZeRO-3),
and tp x pp x dp with ZeRO-1 (a `PipelineModule` with the depth heads on the last stage).
The model can start from a MegaDual init checkpoint (`train.init_from`): the backbone from
`megadual convert from-hf` of a Qwen2.5 directory, or every part from `from-hf` of a
unified-model export or `reshard` of a stage-2 run; which parts train follows
`mllm.trainable_stage` (the paper's four stages). Data: packed token shards
(`loader:` section), split over data-parallel ranks. The run directory is the shared
loop's (megadual/train/loop.py); metrics.jsonl adds text_loss, visual_loss, pixel_loss and
semantic_loss to every step.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import deepspeed
import torch

from megadual.config import Config
from megadual.config.errors import ConfigError
from megadual.data.mm_sequence import SpecialTokens
from megadual.data.packed_loader import PackedMultimodalLoader
from megadual.distributed.deepspeed_config import build_deepspeed_config
from megadual.distributed.pipeline import pad_cu_seqlens
from megadual.distributed.pipeline_mllm import build_mllm_pipeline_module, pipeline_inputs
from megadual.distributed.topology import Topology
from megadual.models.mllm import DualTokenMLLM, apply_trainable_stage

from .engine import unsharded_grad_norm, construction_context, initialize_engine, load_init_weights
from .init_checkpoint import open_init_checkpoint
from .loop import LoopSettings, RunResult, StepResult, TrainingJob, run_loop, start_run, trainer_main

logger = logging.getLogger(__name__)

LOSS_PARTS = ("text_loss", "visual_loss", "pixel_loss", "semantic_loss")


def check_mllm_config(cfg: Config) -> None:
    """The combinations the unified trainer needs, named by their keys."""
    cfg.require("backbone", "mllm", "train", "loader", command="train")
    if cfg.loader.seq_len != cfg.train.seq_len:
        raise ConfigError("loader.seq_len", cfg.loader.seq_len, f"train.seq_len={cfg.train.seq_len} (one row length)")
    if cfg.loader.batch_size != cfg.train.micro_batch_size:
        raise ConfigError(
            "loader.batch_size", cfg.loader.batch_size, f"train.micro_batch_size={cfg.train.micro_batch_size}"
        )


def check_shards_match(cfg: Config, manifest) -> None:
    """The unified model's visual sizes must be the token shards' (a larger code table would
    train silently on codes that never occur; a smaller one fails mid-run).

    Raises:
        ConfigError: the first `mllm` size that differs from the shards' manifest.
    """
    for name in ("pixel_codebook_size", "semantic_codebook_size", "depth", "num_positions"):
        ours, theirs = getattr(cfg.mllm, name), getattr(manifest, name)
        if ours != theirs:
            raise ConfigError(f"mllm.{name}", ours, f"{theirs}, as in the token shards under {cfg.loader.paths}")


def tokenizer_code_tables(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixel and semantic codebooks [K, C] of `mllm.tokenizer_path`, checked against the
    mllm section (codebook sizes, depth, positions per image, code width).

    Raises:
        ConfigError: no tokenizer path, or a size that differs from the tokenizer's.
    """
    from megadual.models.vision.tokenizer import DualTokenizer

    m = cfg.mllm
    if not m.tokenizer_path:
        raise ConfigError("mllm.tokenizer_path", None, "a DualToken tokenizer directory when mllm.code_init='tokenizer'")
    tok = DualTokenizer.from_pretrained(m.tokenizer_path)
    expected = {
        "mllm.pixel_codebook_size": (m.pixel_codebook_size, tok.cfg.pixel_quantizer.codebook_size),
        "mllm.semantic_codebook_size": (m.semantic_codebook_size, tok.cfg.semantic_quantizer.codebook_size),
        "mllm.depth": (m.depth, tok.cfg.pixel_quantizer.depth),
        "mllm.num_positions": (m.num_positions, tok.grid_size**2),
        "mllm.code_embed_dim": (m.code_embed_dim, tok.cfg.pixel_quantizer.codebook_dim),
    }
    for key, (ours, theirs) in expected.items():
        if ours != theirs:
            raise ConfigError(key, ours, f"{theirs}, as in the tokenizer at {m.tokenizer_path}")
    tables = [tok.codebook(kind).detach().float() for kind in ("pixel", "semantic")]
    if any(table.dim() != 2 for table in tables):
        raise ConfigError("mllm.code_init", "tokenizer", "'learned' for a tokenizer with one codebook per depth")
    return tables[0], tables[1]


def unified_init_from(cfg: Config) -> bool:
    """Whether train.init_from holds a whole unified model, after refusing the combinations the
    trainer cannot start from it (read from the checkpoint's metadata; `config check` runs this too).

    A unified-model init checkpoint (e.g. `convert from-hf` of an export) starts every part,
    code tables included; a backbone one starts the backbone only.
    """
    if not cfg.train.init_from:
        return False
    unified = open_init_checkpoint(cfg.train.init_from).mllm is not None
    if unified and cfg.mllm.code_init == "tokenizer":
        raise ConfigError("mllm.code_init", "tokenizer", f"'learned' when train.init_from={cfg.train.init_from} "
                          "holds a unified model (its code tables come from the checkpoint)")
    if cfg.parallel.pp > 1 and not unified:  # the config-only pipeline combinations: Config.validate
        raise ConfigError("parallel.pp", cfg.parallel.pp,
                          "1 when train.init_from is a backbone-only checkpoint (pipeline stages do not yet "
                          "load parts of the model)")
    return unified


def build_mllm_engine(cfg: Config, topology: Topology):
    """The unified model (initialised, parts frozen per stage) inside a DeepSpeed engine:
    a `PipelineModule` with the heads on the last stage when pp > 1."""
    ds_config = build_deepspeed_config(cfg, topology.layout)
    unified_init = unified_init_from(cfg)
    if topology.layout.pp > 1:
        module = build_mllm_pipeline_module(
            cfg.backbone, cfg.mllm, topology, seed=cfg.run.seed,
            activation_checkpoint_interval=1 if cfg.train.activation_checkpointing else 0,
        )
        if unified_init:
            load_init_weights(module, cfg, topology)
        return initialize_engine(cfg, module, ds_config, mpu=None)
    with construction_context(cfg, topology, ds_config):
        model = DualTokenMLLM(cfg.backbone, cfg.mllm, tp_group=topology.tp_group, seed=cfg.run.seed)
    model.lm.backbone.activation_checkpointing = cfg.train.activation_checkpointing
    if cfg.train.init_from:
        load_init_weights(model if unified_init else model.lm, cfg, topology)
    if cfg.mllm.code_init == "tokenizer":
        pixel_table, semantic_table = tokenizer_code_tables(cfg)
        # Under ZeRO-3 the tables are partitioned placeholders: gather, write on the first rank, re-partition.
        with deepspeed.zero.GatheredParameters(list(model.visual_embed.parameters()), modifier_rank=0,
                                               enabled=cfg.parallel.zero_stage == 3):
            model.init_code_embeddings_(pixel_table, semantic_table)
    trainable = apply_trainable_stage(model, cfg.mllm.trainable_stage)
    logger.info("trainable parameters per part (stage %s): %s", cfg.mllm.trainable_stage, trainable)
    return initialize_engine(cfg, model, ds_config, topology.mpu())


def mllm_pipeline_step(engine, batches: list[dict]) -> StepResult:
    """One optimizer step through DeepSpeed's 1F1B schedule; only the total loss is known here
    (the parts are computed on the last stage inside the schedule)."""

    def stream():
        for b in batches:
            b = dict(b, cu_seqlens=pad_cu_seqlens(b["cu_seqlens"], b["input_ids"].numel()))
            yield pipeline_inputs(b)

    loss = float(engine.train_batch(data_iter=stream()))
    norm = engine.get_global_grad_norm()
    return StepResult(loss=loss, grad_norm=None if norm is None else float(norm))


def mllm_step(engine, batches: list[dict], topology: Topology) -> StepResult:
    """One optimizer step over `batches` (one per accumulation step).

    The loss is the mean of the micro-batch losses (what DeepSpeed optimises); each logged part
    is a mean over its own targets across micro-batches and data-parallel ranks (None when the
    step had none of that kind, e.g. no generation sample).
    """
    device = engine.device
    loss_sum = torch.zeros((), device=device)
    # Per part: sum over targets, and the target count (text parts over text targets, visual over visual).
    part_sums = torch.zeros(len(LOSS_PARTS), device=device)
    counts = torch.zeros(2, device=device)
    grad_norm = None
    for i, batch in enumerate(batches):
        out = engine({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
        engine.backward(out.loss)
        if i == len(batches) - 1 and engine.zero_optimization_stage() == 0:
            grad_norm = unsharded_grad_norm(engine.module, topology.tp_group)
        engine.step()
        nt, nv = out.num_text_targets.float(), out.num_visual_targets.float()
        loss_sum += out.loss.detach()
        part_sums += torch.stack([out.text_loss * nt, out.visual_loss * nv, out.pixel_loss * nv, out.semantic_loss * nv])
        counts += torch.stack([nt, nv])
    totals = torch.cat([loss_sum.view(1) / len(batches), part_sums, counts])
    if topology.layout.dp > 1:
        torch.distributed.all_reduce(totals, group=topology.dp_group)
        totals[0] /= topology.layout.dp
    loss, parts, (nt, nv) = totals[0].item(), totals[1:5].tolist(), totals[5:].tolist()
    per = (nt, nv, nv, nv)
    if grad_norm is None and engine.get_global_grad_norm() is not None:
        grad_norm = float(engine.get_global_grad_norm())
    return StepResult(loss=loss, grad_norm=grad_norm,
                      parts={name: (value / n if n else None) for name, value, n in zip(LOSS_PARTS, parts, per)})


def train_mllm(cfg: Config, resume: bool = False, show_progress: bool = True) -> RunResult:
    """Train the unified model as the config says, in the launched layout.

    Raises:
        ConfigError: a layout or section combination this trainer cannot run, before any
            process-group work.
    """
    check_mllm_config(cfg)
    info, topology = start_run(cfg)
    loader = PackedMultimodalLoader(
        cfg.loader, SpecialTokens(**asdict(cfg.mllm.tokens)), rank=topology.dp_rank, world_size=topology.layout.dp
    )
    check_shards_match(cfg, loader.manifest)
    engine = build_mllm_engine(cfg, topology)
    job = TrainingJob(
        engine=engine,
        loader=loader,
        step=(lambda batches: mllm_pipeline_step(engine, batches)) if topology.layout.pp > 1
        else (lambda batches: mllm_step(engine, batches, topology)),
        tokens_per_step=cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.seq_len * topology.layout.dp,
        name="train",
        settings=LoopSettings.of_train(cfg),
        plot_keys=("loss", *LOSS_PARTS),
        dp_rank=topology.dp_rank,
        dp_size=topology.layout.dp,
        dp_group=topology.dp_group,
    )
    return run_loop(cfg, job, info, resume, show_progress)


def main(args) -> int:
    """`megadual train`: the parsed arguments carry --config/--set and --resume."""
    return trainer_main(train_mllm, args)
