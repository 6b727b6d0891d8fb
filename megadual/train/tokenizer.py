"""Stage-1 training of the DualToken tokenizer (`megadual train-tokenizer`).

Shapes: B micro-batch per rank, images [B, 3, H, W] in [-1, 1].

Runs as a plain `python` process (a world of one) or on N data-parallel ranks under
`deepspeed` / `torchrun`, in the loop every trainer shares (megadual/train/loop.py: this module
supplies the step, and saves the discriminator beside the generator). Two DeepSpeed engines
share the process: the generator (the `DualTokenizer`: tower, both quantized branches, pixel
decoder; AdamW from `optim`) and the PatchGAN discriminator (Adam from
`tokenizer.discriminator`); ZeRO 0-2 for both. The frozen teacher tower and LPIPS sit outside
the engines. EMA codebooks are buffers updated in the
forward with statistics all-reduced over the data-parallel group, so they stay identical on
every rank. bf16 is autocast (weights, codebooks and optimizer state stay fp32).

Writes into `run.out_dir` (rank 0 unless said):
    config.yaml            the resolved config
    metrics.jsonl          one JSON object per optimizer step (all losses, PSNR, codebook usage
                           and perplexity per branch, lr, corrupt-image count, timings)
    loss.png               the loss curve so far, at every checkpoint
    images/                every `image_every` steps: step_N_recon.png, step_N_usage.png
    checkpoints/step_N/    DeepSpeed checkpoints (generator here, discriminator/ inside), `latest`
    tokenizer/             the final `DualTokenizer.save_pretrained` export
    ranks/rank_R.json      every rank: peak memory and a digest of its codebooks
    wandb/                 when tokenizer_train.wandb_project is set (WANDB_MODE, default offline)

`resume=True` continues from checkpoints/latest: models, both optimizers, LR schedule, codebooks
and their restart generators, loader position and corrupt count, so the metrics continue as an
uninterrupted run's would. The teacher is rebuilt (it is a deterministic function of the config
and seed: the initial tower).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from megadual.config import Config, ConfigError
from megadual.config.schema import TokenizerConfig
from megadual.data.images import ImageBatchLoader, build_image_dataset
from megadual.distributed.deepspeed_config import deep_merge
from megadual.losses import hinge_d_loss
from megadual.losses.perceptual import PerceptualLoss
from megadual.models.vision.discriminator import PatchDiscriminator
from megadual.models.vision.tokenizer import DualTokenizer
from megadual.models.vision.tower import SiglipTower, build_siglip, frozen_copy

from .engine import param_groups
from .loop import LoopSettings, RunResult, StepResult, TrainingJob, run_loop, start_processes
from .schedule import lr_at
from .tokenizer_loss import generator_loss
from .visualize import save_codebook_usage, save_reconstruction_grid

logger = logging.getLogger(__name__)

DISCRIMINATOR_TAG = "discriminator"
_QUIET = 10**9


def _ds_config(cfg: Config, dp: int, optimizer: dict[str, Any]) -> dict[str, Any]:
    t = cfg.tokenizer_train
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dp,
        "gradient_clipping": float(cfg.optim.grad_clip),  # DeepSpeed's default is 1.0, not off
        "optimizer": optimizer,
        "zero_optimization": {"stage": t.zero_stage},
        # bf16 is autocast: DeepSpeed's bf16 mode would cast the codebook buffers too.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": _QUIET,
        "wall_clock_breakdown": False,
    }
    return deep_merge(ds, cfg.deepspeed)


def _generator_param_groups(model: DualTokenizer, weight_decay: float, lr: float,
                            tower_lr_scale: float) -> list[dict[str, Any]]:
    """`param_groups` of everything but the tower at lr, then of the tower at lr x tower_lr_scale
    (the schedule's LambdaLR scales each group's own rate, so the ratio holds throughout; the
    first group's rate is the one metrics.jsonl logs)."""
    tower_groups = [{**g, "lr": lr * tower_lr_scale} for g in param_groups(model.tower, weight_decay)]
    in_tower = {id(p) for g in tower_groups for p in g["params"]}
    rest = [{**g, "lr": lr, "params": [p for p in g["params"] if id(p) not in in_tower]}
            for g in param_groups(model, weight_decay)]
    return [g for g in rest + tower_groups if g["params"]]


def _codebook_digest(model: DualTokenizer) -> dict[str, str]:
    """sha256 of each quantizer's codebook state (codebooks, counts, sums): equal on every rank."""
    out = {}
    for name, quantizer in model.quantizers().items():
        h = hashlib.sha256()
        for buf in quantizer.buffers():
            h.update(buf.detach().float().cpu().contiguous().numpy().tobytes())
        out[name] = h.hexdigest()
    return out


def build_semantic_teacher(cfg: TokenizerConfig, model: DualTokenizer) -> SiglipTower:
    """The frozen tower the semantic loss distils: `loss.semantic_teacher_path`, else the initial
    tower (copied before any checkpoint is loaded, so a resumed run distils the same teacher)."""
    path = cfg.loss.semantic_teacher_path
    if path is None:
        return frozen_copy(model.tower)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer.loss.semantic_teacher_path: {path!r} is not a directory (never downloaded)")
    tower_cfg = dataclasses.replace(cfg.tower, hf_path=path)  # its sizes are checked against tokenizer.tower
    return frozen_copy(SiglipTower(build_siglip(tower_cfg), tower_cfg))


def _refuse_model_parallel(cfg: Config) -> None:
    """The tokenizer trains data parallel only; a `parallel:` layout would be silently ignored."""
    p = cfg.parallel
    for key, value, wanted in (("tp", p.tp, 1), ("pp", p.pp, 1), ("zero_stage", p.zero_stage, 0)):
        if value != wanted:
            raise ConfigError(f"parallel.{key}", value, f"{wanted}: train-tokenizer runs data parallel only "
                              "(every rank holds the whole tokenizer; its ZeRO stage is tokenizer_train.zero_stage)")


def train_tokenizer(cfg: Config, resume: bool = False, show_progress: bool = True) -> RunResult:
    """Train the DualToken tokenizer as the config says, on the launched data-parallel world.

    Args:
        cfg: root config with `tokenizer`, `tokenizer_train` and `images` sections (`optim` is
            the generator's optimizer; `run` the output directory and seed).
        resume: continue from the latest checkpoint in `run.out_dir` if there is one.
        show_progress: a tqdm bar on rank 0.

    Returns:
        The run directory, the number of steps this invocation ran and its first/last records.
    """
    cfg.require("tokenizer", "tokenizer_train", "images", command="train-tokenizer")
    _refuse_model_parallel(cfg)
    tcfg, lcfg = cfg.tokenizer_train, cfg.tokenizer.loss
    info = start_processes(cfg)
    dp, rank, device = info.world_size, info.rank, info.device
    dp_group = dist.group.WORLD if dp > 1 else None
    is_writer = rank == 0
    run_dir = cfg.run.out_dir

    seed = cfg.run.seed
    model = DualTokenizer(cfg.tokenizer, dp_group=dp_group, seed=seed)
    model.tower.gradient_checkpointing = tcfg.gradient_checkpointing
    teacher = build_semantic_teacher(cfg.tokenizer, model).to(device)
    dcfg = cfg.tokenizer.discriminator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 100)
        discriminator = PatchDiscriminator(dcfg.base_channels, dcfg.num_layers)
        perceptual = (PerceptualLoss(lcfg.lpips_net, lcfg.lpips_backbone_path).to(device)
                      if lcfg.lpips_weight > 0 else None)

    o = cfg.optim
    gen_engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=_generator_param_groups(model, o.weight_decay, o.lr, tcfg.tower_lr_scale),
        config=_ds_config(cfg, dp, {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay, "torch_adam": True}}),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_at(s, o, tcfg.steps) / o.lr),
    )
    disc_engine, _, _, _ = deepspeed.initialize(
        model=discriminator,
        model_parameters=[p for p in discriminator.parameters()],
        config=_ds_config(cfg, dp, {"type": "Adam", "params": {
            "lr": dcfg.lr, "betas": list(dcfg.betas), "eps": o.eps, "weight_decay": 0.0, "torch_adam": True}}),
    )

    dataset = build_image_dataset(cfg.images, cfg.tokenizer.tower.image_size)
    loader = ImageBatchLoader(dataset, tcfg.micro_batch_size, rank=rank, world_size=dp, seed=seed,
                              shuffle=cfg.images.shuffle, num_workers=cfg.images.num_workers,
                              on_corrupt=cfg.images.on_corrupt)

    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if tcfg.dtype == "bf16"
                else contextlib.nullcontext())
    module: DualTokenizer = gen_engine.module
    disc_module = disc_engine.module

    def fake_logits(images: torch.Tensor) -> torch.Tensor:
        # The discriminator as a constant function of its weights: the generator's backward
        # must not leave gradients in the discriminator engine.
        params = {k: v.detach() for k, v in disc_module.named_parameters()}
        return torch.func.functional_call(disc_module, params, (images,))

    last: dict[str, torch.Tensor] = {}  # the step's last micro-batch, for the pictures

    def step(batches: list[dict]) -> StepResult:
        # DeepSpeed's count of optimizer steps taken: this step's index, restored on resume.
        gan_on = gen_engine.global_steps >= dcfg.start_step and lcfg.gan_weight > 0
        sums: dict[str, torch.Tensor] = {}
        num_images = torch.zeros((), dtype=torch.float64)
        for batch in batches:
            images = batch["images"].to(device)
            num_images += images.shape[0]
            with autocast:
                out = gen_engine(images)
                with torch.no_grad():
                    t_sem, t_pool = teacher(images)
                loss, parts = generator_loss(out, images, t_sem, t_pool, lcfg, module.decoder, perceptual,
                                             fake_logits if gan_on else None)
            gen_engine.backward(loss)
            gen_engine.step()
            if gan_on:
                with autocast:
                    d_loss = hinge_d_loss(disc_engine(images), disc_engine(out.reconstruction.detach().float()))
                disc_engine.backward(d_loss)
                disc_engine.step()
                parts["gan_d"] = d_loss.detach()
            else:
                parts["gan_d"] = torch.zeros((), device=device)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.float() / len(batches)
        last.update(images=images, reconstruction=out.reconstruction.detach())
        names = sorted(sums)
        # One all-reduce for every scalar: means over ranks, the corrupt count summed.
        packed = torch.stack([sums[k] for k in names] + [torch.tensor(float(loader.num_corrupt), device=device),
                                                           num_images.float().to(device)])
        if dp > 1:
            dist.all_reduce(packed)
        values = packed.tolist()
        record = {k: values[i] / dp for i, k in enumerate(names)}
        record["corrupt_images"] = int(values[-2])
        record["images"] = int(values[-1])
        for branch, rq_out in (("pixel", out.pixel), ("semantic", out.semantic)):
            # Usage of the step's last micro-batch, over the data-parallel group.
            record[f"usage_{branch}"] = float(rq_out.usage.fraction_used.float().mean())
            record[f"perplexity_{branch}"] = float(rq_out.usage.perplexity.float().mean())
        norm = gen_engine.get_global_grad_norm()
        return StepResult(loss=record.pop("loss"), grad_norm=None if norm is None else float(norm), parts=record)

    def pictures(record: dict) -> None:
        done = record["step"]
        if is_writer and tcfg.image_every and (done % tcfg.image_every == 0 or done == tcfg.steps):
            _save_pictures(run_dir, done, last["images"], last["reconstruction"], module)

    job = TrainingJob(
        engine=gen_engine,
        loader=loader,
        step=step,
        settings=LoopSettings(tcfg.steps, tcfg.grad_accum, tcfg.save_every, tcfg.wandb_project,
                              max_skipped_steps=tcfg.max_skipped_steps, replica_check_every=tcfg.replica_check_every),
        name="train-tokenizer",
        progress_keys=("loss", "psnr", "usage_pixel", "usage_semantic"),
        dp_rank=rank,
        dp_size=dp,
        # Saved into the generator's tag directory before the tag is committed (complete.json lists its files).
        extra_engines={DISCRIMINATOR_TAG: disc_engine},
        after_step=pictures,
    )
    disc_engine.train()
    result = run_loop(cfg, job, info, resume, show_progress)
    export = os.path.join(run_dir, "tokenizer")
    # A resumed finished run re-exports when a kill cut the previous export short.
    if is_writer and (result.steps_run or not DualTokenizer.is_complete_export(export)):
        module.save_pretrained(export)
    _write_codebook_digest(run_dir, rank, module)
    return result


def _save_pictures(run_dir: str, step: int, images: torch.Tensor, reconstructions: torch.Tensor,
                   model: DualTokenizer) -> None:
    scale = max(1, 128 // images.shape[-1])  # tiny debug images are enlarged to be seen
    folder = os.path.join(run_dir, "images")
    save_reconstruction_grid(images, reconstructions, os.path.join(folder, f"step_{step:06d}_recon.png"), scale=scale)
    quantizers = model.quantizers()
    save_codebook_usage(
        {name: q.cluster_size for name, q in quantizers.items()},
        os.path.join(folder, f"step_{step:06d}_usage.png"), title=f"step {step}",
        restart_levels={name: q.dead_code_threshold for name, q in quantizers.items()},
    )


def _write_codebook_digest(run_dir: str, rank: int, model: DualTokenizer) -> None:
    """ranks/rank_R_codebooks.json: sha256 of this rank's codebook buffers (identical across ranks)."""
    os.makedirs(os.path.join(run_dir, "ranks"), exist_ok=True)
    with open(os.path.join(run_dir, "ranks", f"rank_{rank}_codebooks.json"), "w", encoding="utf-8") as f:
        json.dump(_codebook_digest(model), f)


def main(args) -> int:
    """`megadual train-tokenizer`: parsed --config/--set and --resume."""
    from megadual.config import config_from_args

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = train_tokenizer(config_from_args(args), resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0 and result.steps_run:
        f, l = result.first, result.last
        print(f"trained {result.steps_run} steps in {result.run_dir}: loss {f['loss']:.4f} -> {l['loss']:.4f}, "
              f"PSNR {f['psnr']:.2f} -> {l['psnr']:.2f} dB, usage pixel {l['usage_pixel']:.0%} "
              f"semantic {l['usage_semantic']:.0%}, semantic cos {l['semantic_cos']:.3f}")
    return 0
