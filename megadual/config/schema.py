"""The config tree: one dataclass per section, mapped 1:1 from YAML.

A component receives its own section, never the root. Fields without a default are
required whenever their section is present. Each section's `validate()` checks the
combinations a type cannot express and raises `ConfigError` naming the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from .errors import ConfigError


@dataclass
class RunConfig:
    """Where a run writes and how it seeds itself."""

    out_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10

    def validate(self, prefix: str = "run") -> None:
        if self.log_every < 1:
            raise ConfigError(f"{prefix}.log_every", self.log_every, "a positive integer")


@dataclass
class BackboneConfig:
    """A Qwen2/Qwen2.5 decoder. Names follow the architecture, not Hugging Face's keys."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_embeddings: bool = False
    qkv_bias: bool = True
    init_std: float = 0.02
    # "auto": flash-attn varlen on CUDA when installed, else PyTorch SDPA.
    attn_impl: Literal["auto", "sdpa", "flash"] = "auto"
    # Raise on token ids outside [0, vocab_size): costs one reduction per forward.
    check_token_ids: bool = True
    # Local Hugging Face Qwen2 directory to initialise from (never downloaded).
    hf_path: Optional[str] = None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def validate(self, prefix: str = "backbone") -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), "a positive integer")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"{prefix}.hidden_size",
                self.hidden_size,
                f"a multiple of {prefix}.num_heads={self.num_heads}, or set {prefix}.head_dim",
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{prefix}.num_kv_heads", self.num_kv_heads, f"a divisor of {prefix}.num_heads={self.num_heads}"
            )
        if self.resolved_head_dim % 2:
            raise ConfigError(f"{prefix}.head_dim", self.resolved_head_dim, "an even number (RoPE rotates pairs)")
        if self.rope_theta <= 0:
            raise ConfigError(f"{prefix}.rope_theta", self.rope_theta, "a positive number")


@dataclass
class ParallelConfig:
    """Parallel degrees; data parallelism takes what is left of the world size."""

    tp: int = 1
    pp: int = 1
    zero_stage: Literal[0, 1, 2, 3] = 0

    def validate(self, prefix: str = "parallel") -> None:
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), "a positive integer")
        if self.pp > 1 and self.zero_stage > 1:
            raise ConfigError(
                f"{prefix}.zero_stage",
                self.zero_stage,
                f"1 when {prefix}.pp={self.pp} > 1 (DeepSpeed's pipeline engine does not support "
                f"ZeRO-2/3); use {prefix}.pp=1 for ZeRO-3",
            )
        if self.pp > 1 and self.zero_stage == 0:
            # Without ZeRO, DeepSpeed's pipeline engine clips by a gradient norm that leaves out
            # every stage but the first (measured: losses drift from step 3); ZeRO-1 counts them.
            raise ConfigError(
                f"{prefix}.zero_stage",
                self.zero_stage,
                f"1 when {prefix}.pp={self.pp} > 1 (ZeRO-1 costs nothing at dp=1, and DeepSpeed's "
                "ZeRO-0 pipeline path computes the clipping norm from the first stage only)",
            )


@dataclass
class OptimConfig:
    """AdamW (torch's fused/foreach implementation) with warmup and a decay schedule."""

    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    min_lr_ratio: float = 0.1

    def validate(self, prefix: str = "optim") -> None:
        if self.lr <= 0:
            raise ConfigError(f"{prefix}.lr", self.lr, "a positive number")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{prefix}.betas", list(self.betas), "two numbers in [0, 1)")
        if self.grad_clip < 0:
            raise ConfigError(f"{prefix}.grad_clip", self.grad_clip, "0 (off) or a positive number")
        if self.warmup_steps < 0:
            raise ConfigError(f"{prefix}.warmup_steps", self.warmup_steps, "0 or a positive integer")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{prefix}.min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")


@dataclass
class TrainConfig:
    """The optimisation loop: how long, how big, in which precision."""

    steps: int
    seq_len: int
    micro_batch_size: int = 1
    grad_accum: int = 1
    dtype: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False
    save_every: int = 0  # 0: only at the end
    # A MegaDual init checkpoint (`megadual convert from-hf` / `reshard`) to start from; if it
    # carries a trainer position (a reshard of a run), training continues from that step.
    init_from: Optional[str] = None

    def validate(self, prefix: str = "train") -> None:
        for name in ("steps", "seq_len", "micro_batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), "a positive integer")
        if self.save_every < 0:
            raise ConfigError(f"{prefix}.save_every", self.save_every, "0 (only at the end) or a positive integer")


@dataclass
class TextDataConfig:
    """Text for backbone-only language-model training."""

    # "synthetic-captions": the embedded scene captions (no files needed); "text-files": `paths`.
    source: Literal["synthetic-captions", "text-files"] = "synthetic-captions"
    paths: list[str] = field(default_factory=list)
    num_samples: int = 4096

    def validate(self, prefix: str = "data") -> None:
        if self.source == "text-files" and not self.paths:
            raise ConfigError(f"{prefix}.paths", self.paths, f"at least one file when {prefix}.source='text-files'")
        if self.num_samples < 1:
            raise ConfigError(f"{prefix}.num_samples", self.num_samples, "a positive integer")


@dataclass
class PackedLoaderConfig:
    """The packed multimodal loader over token shards (megadual/data/packed_loader.py).

    Each data-parallel rank runs `max(1, num_workers)` streams; a stream reads its share of
    the shards (or samples) in windows of `pack_window` samples, turns each sample into an
    understanding or a generation sequence, and packs them into rows of `seq_len` tokens.
    """

    paths: list[str]  # token shard directories, each with a manifest.json
    seq_len: int = 4096
    batch_size: int = 1  # rows per batch on each data-parallel rank
    num_workers: int = 0  # DataLoader worker processes per rank (0: read in the main process)
    seed: int = 0
    # "shard": each stream reads whole shards (needs >= dp * max(1, num_workers) shards);
    # "sample": each stream reads every N-th sample of every shard (any shard count).
    split: Literal["shard", "sample"] = "shard"
    # "epochs": every sample once per epoch; "resample": shards drawn with replacement.
    mode: Literal["epochs", "resample"] = "epochs"
    pack_window: int = 1024  # samples packed together (best fit); larger packs tighter
    generation_fraction: float = 0.5  # share of samples laid out as text-to-image
    cfg_drop_rate: float = 0.1  # share of generation samples whose caption is replaced (CFG)
    too_long: Literal["drop", "raise"] = "drop"  # a sample longer than seq_len
    on_error: Literal["raise", "skip"] = "raise"  # a corrupt sample or truncated shard
    prefetch_factor: int = 2  # batches each worker prepares ahead

    def validate(self, prefix: str = "loader") -> None:
        if not self.paths:
            raise ConfigError(f"{prefix}.paths", self.paths, "at least one token shard directory")
        for name in ("seq_len", "batch_size", "pack_window", "prefetch_factor"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), "a positive integer")
        if self.num_workers < 0:
            raise ConfigError(f"{prefix}.num_workers", self.num_workers, "0 (main process) or a positive integer")
        for name in ("generation_fraction", "cfg_drop_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), "a number in [0, 1]")


@dataclass
class Config:
    """The root of the tree. Sections a command does not use may be absent (None)."""

    run: RunConfig = field(default_factory=RunConfig)
    backbone: Optional[BackboneConfig] = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: Optional[TrainConfig] = None
    data: TextDataConfig = field(default_factory=TextDataConfig)
    loader: Optional[PackedLoaderConfig] = None
    # Extra DeepSpeed JSON keys passed through verbatim (merged last).
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Validate every present section, then the combinations that span sections."""
        for name in ("run", "backbone", "parallel", "optim", "train", "data", "loader"):
            section = getattr(self, name)
            if section is not None:
                section.validate(name)
        if self.backbone is not None and self.parallel.tp > 1:
            b, tp = self.backbone, self.parallel.tp
            for name in ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
                if getattr(b, name) % tp:
                    raise ConfigError(
                        f"backbone.{name}", getattr(b, name), f"a multiple of parallel.tp={tp}, or a smaller parallel.tp"
                    )
        if self.backbone is not None and self.parallel.pp > self.backbone.num_layers:
            raise ConfigError(
                "parallel.pp", self.parallel.pp, f"at most backbone.num_layers={self.backbone.num_layers}"
            )

    def require(self, *sections: str, command: str) -> None:
        """Raise a ConfigError if a section `command` needs is absent."""
        for name in sections:
            if getattr(self, name) is None:
                raise ConfigError(name, None, f"a '{name}:' section (the '{command}' command needs it)")
