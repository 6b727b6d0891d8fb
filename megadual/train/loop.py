"""The training loop every trainer shares: start-up, resume, metrics, checkpoints.

A trainer supplies the engine, its loader and a step function; this module does the rest:
plan the layout before any process-group work, start the process group and the topology,
write the resolved config, resume from the newest complete checkpoint (or continue from an
init checkpoint's trainer position), log one JSON object per optimizer step to
metrics.jsonl (step, loss, lr, grad_norm, tokens, step_time, plus the task's loss parts)
and to wandb when `run.wandb_project` is set, save DeepSpeed checkpoints with every data-parallel
rank's loader position and a loss.png of the curves so far, and record each rank's peak memory.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from megadual.config import Config, config_to_dict, dump_config
from megadual.distributed.runtime import (ProcessInfo, adopt_launcher_environment, init_distributed, is_peer_lost,
                                          peer_failure_error, ranks_per_node)
from megadual.distributed.topology import Topology, check_tp_placement, plan_layout

from .checkpoint import CHECKPOINTS, commit_checkpoint, newest_complete_tag, unwritable_checkpoint_error
from .nonfinite import NonFiniteGuard, NonFiniteTrainingError, weights_finite_on_every_rank
from .replicas import check_replicas
from .tracking import StepLog, plot_losses
from .universal import UNIVERSAL_INFO, check_resizable, load_universal, own_step_counters, prepare_resize

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """One optimizer step: loss averaged over micro-batches and data-parallel ranks."""

    loss: float
    grad_norm: Optional[float]
    parts: dict[str, float] = field(default_factory=dict)  # e.g. text_loss, visual_loss


@dataclass(frozen=True)
class LoopSettings:
    """How long a run trains and how often it saves: the trainer's section of the config."""

    steps: int
    grad_accum: int
    save_every: int  # 0: only at the end
    wandb_project: Optional[str]
    init_from: Optional[str] = None  # an init checkpoint whose trainer position a run continues
    max_skipped_steps: int = 10  # non-finite optimizer steps in a row before the run stops (nonfinite.py)
    replica_check_every: int = 100  # steps between data-parallel replica checks (replicas.py); 0: never

    @classmethod
    def of_train(cls, cfg: Config) -> "LoopSettings":
        """The `train` section's (with `run.wandb_project`): the LM and unified-model trainers."""
        t = cfg.train
        return cls(t.steps, t.grad_accum, t.save_every, cfg.run.wandb_project, t.init_from, t.max_skipped_steps,
                   t.replica_check_every)


@dataclass
class RunResult:
    """What a finished run reports back to its caller (figures of this invocation)."""

    run_dir: str
    steps_run: int
    first: dict[str, Any] = field(default_factory=dict)  # the first and last records, as in metrics.jsonl
    last: dict[str, Any] = field(default_factory=dict)

    @property
    def first_loss(self) -> float:
        return self.first.get("loss", float("nan"))

    @property
    def last_loss(self) -> float:
        return self.last.get("loss", float("nan"))


@dataclass
class TrainingJob:
    """What the loop drives: a DeepSpeed engine, a stateful loader and one optimizer step.

    A trainer with more than one engine (the tokenizer's discriminator) names the others in
    `extra_engines`: each is saved into, and loaded from, a folder of that name inside the tag.
    """

    engine: Any
    loader: Any  # iterator with state_dict() / load_global_state(every dp rank's state_dict())
    step: Callable[[list[dict]], StepResult]
    settings: LoopSettings
    name: str
    tokens_per_step: Optional[int] = None  # logged as "tokens" when set
    plot_keys: tuple[str, ...] = ("loss",)  # metrics drawn into loss.png at every save
    progress_keys: tuple[str, ...] = ("loss",)  # metrics shown beside the progress bar
    dp_rank: int = 0  # which data-parallel replica this rank's loader reads for
    dp_size: int = 1
    dp_group: Any = None  # this rank's data-parallel process group (None: the world)
    extra_engines: dict[str, Any] = field(default_factory=dict)  # folder name in the tag -> DeepSpeed engine
    after_step: Optional[Callable[[dict], None]] = None  # every rank, after a step's record is written


def gather_loader_states(loader, dp_rank: int, dp_size: int) -> list[dict]:
    """Every data-parallel rank's loader position, in dp-rank order (collective over the world).

    DeepSpeed writes a checkpoint's client state from one rank only, so a checkpoint must carry
    every replica's position: the ranks read different samples and stop at different places.
    """
    mine = (dp_rank, loader.state_dict())
    gathered = [mine]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, mine)
    states: list[Optional[dict]] = [None] * dp_size
    for rank, state in gathered:  # tensor / pipeline peers of one replica hold the same position
        states[rank] = state
    return states


def saved_loader_states(saved) -> list[dict]:
    """A checkpoint's `gather_loader_states` list (older checkpoints hold one rank's state)."""
    return [saved] if isinstance(saved, dict) else list(saved)


def step_tag(step: int) -> str:
    return f"step_{step:06d}"


def latest_step(run_dir: str) -> Optional[int]:
    """The step of the newest complete checkpoint (checkpoint.newest_complete_tag), or None."""
    tag = newest_complete_tag(os.path.join(run_dir, CHECKPOINTS))
    return None if tag is None else int(tag.removeprefix("step_"))


def _barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def _last_checkpoint(checkpoint_root: str) -> str:
    """Where --resume would continue from, in words."""
    tag = newest_complete_tag(checkpoint_root)
    if tag is None:
        return "no checkpoint was completed"
    return f"the last complete checkpoint is {os.path.join(checkpoint_root, tag)}"


def _stop_non_finite(message: str, run_dir: str) -> NonFiniteTrainingError:
    where = _last_checkpoint(os.path.join(run_dir, CHECKPOINTS))
    return NonFiniteTrainingError(f"{message}; {where} (lower optim.lr or check the data, then --resume)")


def limit_threads(world_size: int) -> None:
    """The `deepspeed` launcher leaves OMP_NUM_THREADS unset; share the cores between ranks
    instead of letting every rank use all of them (many times slower on small machines)."""
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ranks_per_node(world_size))))


def start_processes(cfg: Config) -> ProcessInfo:
    """Share the cores between this host's ranks, start the process group, and write the
    resolved config into the run directory (rank 0)."""
    adopt_launcher_environment()
    limit_threads(int(os.environ.get("WORLD_SIZE", "1")))
    info = init_distributed(cfg.parallel.collective_timeout_s)
    if info.rank == 0:
        os.makedirs(cfg.run.out_dir, exist_ok=True)
        dump_config(cfg, os.path.join(cfg.run.out_dir, "config.yaml"))
    return info


# Resident memory once the process is up (libraries loaded, process groups formed) and before
# any model exists: `megadual plan` counts what a run adds on top of it.
_baseline_rss_mib: Optional[float] = None


def _status_mib(field: str) -> Optional[float]:
    """A memory line of /proc/self/status in MiB (VmRSS: resident now; VmHWM: this process's own
    peak, where getrusage's ru_maxrss would carry a larger parent's size across fork and exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def start_run(cfg: Config) -> tuple[ProcessInfo, Topology]:
    """Validate the layout (before any process group), then `start_processes` and build the topology."""
    global _baseline_rss_mib
    adopt_launcher_environment()  # srun without a launcher: ranks from SLURM_*
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    layout = plan_layout(cfg.parallel, cfg.backbone, world_size)
    check_tp_placement(cfg.parallel, world_size, ranks_per_node(world_size))
    info = start_processes(cfg)
    # DeepSpeed's engines import ~800 modules (torch._dynamo, sympy, ...) on first use: load them
    # now, so the baseline holds them and not the model's memory.
    import deepspeed.runtime.engine  # noqa: F401
    import deepspeed.runtime.pipe.engine  # noqa: F401
    import deepspeed.runtime.zero.stage3  # noqa: F401
    import torch._dynamo  # noqa: F401  (DeepSpeed's engine pulls it in at initialize)

    _baseline_rss_mib = _status_mib("VmRSS")
    return info, Topology(layout)


def _continue_from_init(path: str, job: TrainingJob) -> int:
    """Weights came in with the engine; a resharded run also continues its step, LR schedule
    and data position (the optimizer's moments start afresh: they are not resharded)."""
    from .init_checkpoint import open_init_checkpoint

    state = open_init_checkpoint(path).trainer_state
    if not state:
        return 0
    job.loader.load_global_state(saved_loader_states(state["loader"]))
    for _ in range(state["step"]):
        job.engine.lr_scheduler.step()
    logger.info("continuing from init checkpoint %s at step %d", path, state["step"])
    return int(state["step"])


def write_rank_stats(run_dir: str, rank: int) -> None:
    """ranks/rank_N.json: this rank's peak host memory, its memory before the model was built
    (`start_run`; None for trainers that do not call it) and device memory on GPU."""
    peak = _status_mib("VmHWM")
    if peak is None:  # no /proc (not Linux)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stats = {"rank": rank, "peak_rss_mib": peak, "baseline_rss_mib": _baseline_rss_mib}
    if torch.cuda.is_available():
        stats["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    os.makedirs(os.path.join(run_dir, "ranks"), exist_ok=True)
    with open(os.path.join(run_dir, "ranks", f"rank_{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f)


def _resume(cfg: Config, job: TrainingJob, checkpoint_root: str, tag: str, is_writer: bool) -> int:
    """Load checkpoint `tag` into the job's engines and loader; returns its step. A checkpoint
    written by another number of data-parallel ranks is loaded through its universal form
    (universal.py) and the loader positions of all its ranks are split over this run's ranks."""
    check_resizable(os.path.join(checkpoint_root, tag), job.dp_size, cfg.parallel.tp, cfg.parallel.pp)
    universal = prepare_resize(checkpoint_root, tag, job.dp_size, is_writer, _barrier)
    if universal is None:
        _, client_state = job.engine.load_checkpoint(checkpoint_root, tag=tag)
        for name, extra in job.extra_engines.items():
            extra.load_checkpoint(os.path.join(checkpoint_root, tag), tag=name)
    else:
        source = os.path.join(checkpoint_root, tag)
        client_state = load_universal(job.engine, universal, source)
        for name, extra in job.extra_engines.items():
            load_universal(extra, os.path.join(universal, name), os.path.join(source, name))
    for engine in (job.engine, *job.extra_engines.values()):
        own_step_counters(engine)
    saved = saved_loader_states(client_state["loader"])
    job.loader.load_global_state(saved)
    size = f" (saved by {len(saved)} data-parallel ranks, now {job.dp_size})" if len(saved) != job.dp_size else ""
    logger.info("resumed from %s at step %d%s", os.path.join(checkpoint_root, tag), client_state["step"], size)
    return int(client_state["step"])


def run_loop(cfg: Config, job: TrainingJob, info: ProcessInfo, resume: bool, show_progress: bool) -> RunResult:
    """Train `job.settings.steps` optimizer steps (fewer if resuming), as the module doc says."""
    engine, loader, settings = job.engine, job.loader, job.settings
    run_dir = cfg.run.out_dir
    checkpoint_root = os.path.join(run_dir, CHECKPOINTS)
    is_writer = info.rank == 0

    start_step = 0
    resume_tag = newest_complete_tag(checkpoint_root) if resume else None
    if resume_tag is not None:
        start_step = _resume(cfg, job, checkpoint_root, resume_tag, is_writer)
    elif settings.init_from:
        start_step = _continue_from_init(settings.init_from, job)

    total = settings.steps
    log = StepLog(run_dir, settings.wandb_project, config_to_dict(cfg), is_writer, cfg.run.log_every, total)

    def save(step: int) -> None:
        # Collective: every rank writes its partitions; `latest` moves once all are on disk.
        if not weights_finite_on_every_rank(engine.module):
            raise _stop_non_finite(f"the weights hold inf or nan at step {step}: no checkpoint is written", run_dir)
        loaders = gather_loader_states(loader, job.dp_rank, job.dp_size)
        tag = step_tag(step)
        try:
            for name, extra in job.extra_engines.items():
                extra.save_checkpoint(os.path.join(checkpoint_root, tag), tag=name, client_state=UNIVERSAL_INFO,
                                      save_latest=False)
            engine.save_checkpoint(checkpoint_root, tag=tag, client_state={"loader": loaders, "step": step,
                                                                           **UNIVERSAL_INFO}, save_latest=False)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as "[enforce fail at ...]"
            if is_peer_lost(e):
                raise
            raise unwritable_checkpoint_error(os.path.join(checkpoint_root, tag), e) from e
        commit_checkpoint(checkpoint_root, tag, is_writer, _barrier)
        if is_writer:
            log.flush()
            plot_losses(log.path, os.path.join(run_dir, "loss.png"), job.plot_keys)

    guard = NonFiniteGuard(engine)
    first: dict[str, Any] = {}
    record: dict[str, Any] = {}
    engine.train()
    progress = tqdm(total=total, initial=start_step, desc=job.name, unit="step",
                    disable=not (show_progress and is_writer))
    try:
        for step in range(start_step, total):
            started = time.perf_counter()
            lr = engine.get_lr()[0]
            result = job.step([next(loader) for _ in range(settings.grad_accum)])
            guard.step_done()
            record = {"step": step + 1, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm}
            if job.tokens_per_step is not None:
                record["tokens"] = job.tokens_per_step
            record.update(step_time=time.perf_counter() - started, skipped_steps=guard.skipped, **result.parts)
            first = first or record
            if log.write(record):
                progress.set_postfix({k: f"{record[k]:.4g}" for k in job.progress_keys if record.get(k) is not None})
            if job.after_step is not None:
                job.after_step(record)
            progress.update(1)
            if guard.skipped_in_a_row >= settings.max_skipped_steps:
                raise _stop_non_finite(f"{guard.skipped_in_a_row} optimizer steps in a row had inf or nan gradients "
                                       f"(loss {result.loss}) and were skipped, up to step {step + 1}", run_dir)
            if settings.replica_check_every and (step + 1) % settings.replica_check_every == 0:
                check_replicas(engine.module, engine.zero_optimization_stage(), step + 1, job.dp_group)
            if settings.save_every and (step + 1) % settings.save_every == 0 and step + 1 < total:
                save(step + 1)
        if start_step < total:
            save(total)
    except RuntimeError as e:  # a peer that stopped answering or died: name it instead of a backend's stack
        if not is_peer_lost(e):
            raise
        after = f"; {_last_checkpoint(checkpoint_root)} (--resume continues from it)"
        raise peer_failure_error(e, cfg.parallel.collective_timeout_s, after) from e
    finally:
        progress.close()
        log.close()
    write_rank_stats(run_dir, info.rank)
    return RunResult(run_dir=run_dir, steps_run=total - start_step, first=first, last=record)


def trainer_main(train: Callable[..., RunResult], args) -> int:
    """The body of `megadual train-lm` / `megadual train`: parsed --config/--set and --resume."""
    from megadual.config import config_from_args

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = train(config_from_args(args), resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {result.steps_run} steps in {result.run_dir}: loss {result.first_loss:.4f} -> {result.last_loss:.4f}")
    return 0
