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
    # wandb project to log to (rank 0; offline unless WANDB_MODE says otherwise); None: off.
    wandb_project: Optional[str] = None

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
    # "auto": flash-attn varlen on CUDA when installed, else FlexAttention for packed rows
    # on CUDA, else PyTorch SDPA. "flex" also runs on CPU, forward only.
    attn_impl: Literal["auto", "sdpa", "flash", "flex"] = "auto"
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
    # How long a collective may wait for a peer before the run stops naming the ranks that did
    # not answer (torch's own default is 30 minutes; a checkpoint save of a large model is one
    # collective, so keep it well above the longest save).
    collective_timeout_s: float = 1800.0
    # Tensor-parallel peers exchange activations in every layer: a tp group that spans nodes
    # runs at network speed. Refused unless forced.
    allow_cross_node_tp: bool = False

    def validate(self, prefix: str = "parallel") -> None:
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), "a positive integer")
        if self.collective_timeout_s <= 0:
            raise ConfigError(f"{prefix}.collective_timeout_s", self.collective_timeout_s, "a positive number of seconds")
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
    max_skipped_steps: int = 10  # optimizer steps in a row with non-finite gradients before the run stops
    replica_check_every: int = 100  # steps between checks that data-parallel replicas agree (0: never)
    # A MegaDual init checkpoint (`megadual convert from-hf` / `reshard`) to start from; if it
    # carries a trainer position (a reshard of a run), training continues from that step.
    init_from: Optional[str] = None

    def validate(self, prefix: str = "train") -> None:
        for name in ("steps", "seq_len", "micro_batch_size", "grad_accum", "max_skipped_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), "a positive integer")
        if self.save_every < 0:
            raise ConfigError(f"{prefix}.save_every", self.save_every, "0 (only at the end) or a positive integer")
        if self.replica_check_every < 0:
            raise ConfigError(f"{prefix}.replica_check_every", self.replica_check_every, "0 (off) or a positive integer")


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

    The data is split into `num_streams` streams, each rank runs an equal part of them (a
    worker one or more, round-robin), and a stream reads its share of
    the shards (or samples) in windows of `pack_window` samples, turns each sample into an
    understanding or a generation sequence, and packs them into rows of `seq_len` tokens.
    """

    paths: list[str]  # token shard directories, each with a manifest.json
    seq_len: int = 4096
    batch_size: int = 1  # rows per batch on each data-parallel rank
    num_workers: int = 0  # DataLoader worker processes per rank (0: read in the main process)
    # Streams the data is split into (0: dp x max(1, num_workers)). A run resumes on any data-parallel
    # size whose dp x max(1, num_workers) divides it: set it to the largest such product you may grow to.
    num_streams: int = 0
    seed: int = 0
    # "shard": each stream reads whole shards (needs >= num_streams shards);
    # "sample": each stream reads every N-th sample of every shard (any shard count).
    split: Literal["shard", "sample"] = "shard"
    # "epochs": every sample once per epoch; "resample": shards drawn with replacement.
    mode: Literal["epochs", "resample"] = "epochs"
    # Samples packed together. Larger packs tighter (each window ends in one part-filled row) but
    # holds more in memory: ~2*T*R*2 bytes of codes per sample, ~95 MB per stream at 729 x 8.
    pack_window: int = 4096
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
        if self.num_streams < 0:
            raise ConfigError(f"{prefix}.num_streams", self.num_streams, "0 (dp x max(1, num_workers)) or a positive integer")
        for name in ("generation_fraction", "cfg_drop_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), "a number in [0, 1]")


def _positive(section, prefix: str, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 1:
            raise ConfigError(f"{prefix}.{name}", getattr(section, name), "a positive integer")


@dataclass
class VisionTowerConfig:
    """The SigLIP vision tower of the tokenizer and where it is tapped.

    Layers count from 1 (layer i's output is Hugging Face's `hidden_states[i]`). With `hf_path`
    the sizes are read from that local directory and must agree with the ones given here.
    """

    hf_path: Optional[str] = None  # local SiglipVisionModel / SiglipModel directory (never downloaded)
    image_size: int = 384
    patch_size: int = 14
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    layer_norm_eps: float = 1e-6
    pixel_layer: int = 6  # reconstruction features: output of this layer ...
    shortcut_layer: Optional[int] = 4  # ... plus shortcut_weight x the output of this one (None: off)
    shortcut_weight: float = 0.6
    semantic_layer: int = 26  # semantic features; the layers after it run on their quantized version
    attn_impl: Literal["sdpa", "eager"] = "sdpa"

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def validate(self, prefix: str = "tokenizer.tower") -> None:
        _positive(self, prefix, "image_size", "patch_size", "hidden_size", "intermediate_size", "num_layers",
                  "num_heads")
        # No multiple needed: the patch conv drops the remainder (so400m: 384 px / 14 = 27 patches).
        if self.image_size < self.patch_size:
            raise ConfigError(f"{prefix}.image_size", self.image_size, f"at least {prefix}.patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{prefix}.hidden_size", self.hidden_size, f"a multiple of {prefix}.num_heads={self.num_heads}")
        for name in ("pixel_layer", "semantic_layer"):
            if not 1 <= getattr(self, name) <= self.num_layers:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), f"a layer in [1, {prefix}.num_layers={self.num_layers}]")
        if self.shortcut_layer is not None and not 1 <= self.shortcut_layer <= self.pixel_layer:
            raise ConfigError(f"{prefix}.shortcut_layer", self.shortcut_layer,
                              f"null or a layer in [1, {prefix}.pixel_layer={self.pixel_layer}]")


@dataclass
class QuantizerConfig:
    """One branch's residual quantizer and the projections around it."""

    codebook_size: int = 16384
    codebook_dim: int = 32
    depth: int = 8
    shared_codebook: bool = True  # one codebook for every depth (DualToken's choice)
    decay: float = 0.99
    dead_code_threshold: float = 1.0  # EMA count below which a code is restarted (0: never)

    def validate(self, prefix: str = "tokenizer.pixel_quantizer") -> None:
        _positive(self, prefix, "codebook_size", "codebook_dim", "depth")
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"{prefix}.decay", self.decay, "a number in [0, 1)")
        if self.dead_code_threshold < 0:
            raise ConfigError(f"{prefix}.dead_code_threshold", self.dead_code_threshold, "0 (off) or a positive number")


@dataclass
class PixelDecoderConfig:
    """VQGAN-style conv decoder: the token grid is resized to `latent_size` and upsampled
    2x per level after the first, so image_size = latent_size * 2 ** (len(ch_mult) - 1)."""

    latent_size: int = 24
    channels: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 4, 4, 8])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [24])
    num_groups: int = 32  # GroupNorm groups; must divide every level's channel count

    def validate(self, prefix: str = "tokenizer.decoder") -> None:
        _positive(self, prefix, "latent_size", "channels", "num_res_blocks", "num_groups")
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ConfigError(f"{prefix}.ch_mult", self.ch_mult, "a non-empty list of positive integers")
        for m in self.ch_mult:
            if (self.channels * m) % self.num_groups:
                raise ConfigError(f"{prefix}.num_groups", self.num_groups,
                                  f"a divisor of every level's channels ({prefix}.channels x ch_mult = "
                                  f"{[self.channels * k for k in self.ch_mult]})")


@dataclass
class DiscriminatorConfig:
    """PatchGAN discriminator (hinge loss) and its own Adam optimizer."""

    base_channels: int = 64
    num_layers: int = 3
    start_step: int = 0  # generator and discriminator GAN terms switch on at this step
    lr: float = 7.2e-5
    betas: tuple[float, float] = (0.5, 0.9)

    def validate(self, prefix: str = "tokenizer.discriminator") -> None:
        _positive(self, prefix, "base_channels", "num_layers")
        if self.start_step < 0:
            raise ConfigError(f"{prefix}.start_step", self.start_step, "0 or a positive integer")
        if self.lr <= 0:
            raise ConfigError(f"{prefix}.lr", self.lr, "a positive number")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{prefix}.betas", list(self.betas), "two numbers in [0, 1)")


@dataclass
class TokenizerLossConfig:
    """Loss weights (defaults: the public DualToken code) and the LPIPS network."""

    pixel_mse_weight: float = 5.0
    lpips_weight: float = 1.0  # 0: LPIPS is not built or computed
    gan_weight: float = 0.75  # times the adaptive weight
    semantic_weight: float = 5.0  # (MSE + 1 - cos) at the semantic layer plus the same at the pooler
    commitment_weight: float = 5.0  # applied to commit_pixel + commit_semantic
    adaptive_weight_min: float = 0.3
    adaptive_weight_max: float = 10.0
    lpips_net: Literal["vgg", "alex", "squeeze"] = "vgg"
    # Local torchvision checkpoint of the LPIPS backbone (e.g. vgg16-397923af.pth); without it the
    # backbone is random (a loud warning): fine for tests, not a perceptual metric.
    lpips_backbone_path: Optional[str] = None
    # The frozen tower the semantic loss distils. None: a copy of the initial tower (DualToken's
    # choice, the tower starting from a pre-trained SigLIP). A local SiglipVisionModel directory
    # with the tower's sizes: a separate teacher, while the tower itself starts from tower.hf_path
    # or random (docs/demo_tuning.md, run 5: a random demo tower distilling a pre-trained teacher).
    semantic_teacher_path: Optional[str] = None

    def validate(self, prefix: str = "tokenizer.loss") -> None:
        for name in ("pixel_mse_weight", "lpips_weight", "gan_weight", "semantic_weight", "commitment_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), "0 (off) or a positive number")
        if not 0 <= self.adaptive_weight_min <= self.adaptive_weight_max:
            raise ConfigError(f"{prefix}.adaptive_weight_min", self.adaptive_weight_min,
                              f"a number in [0, {prefix}.adaptive_weight_max={self.adaptive_weight_max}]")


@dataclass
class TokenizerConfig:
    """The visual tokenizer: tower, quantized branches, pixel decoder, GAN, losses.

    `design` picks how the tower's features are discretised (megadual/models/vision/tokenizer.py):
    "dualtoken" (DualToken, arXiv 2503.14324): the pixel tap and the semantic tap each through its
    own residual quantizer; "tokenflow" (TokenFlow, arXiv 2412.03069): one index per position and
    depth selects a (semantic, pixel) code pair, minimising d_sem + pixel_weight * d_pix;
    "single" (VILA-U style): one codebook (`semantic_quantizer`) quantizes the semantic tap, and
    the decoder and the semantic losses both read it (`pixel_quantizer` is unused).
    """

    design: Literal["dualtoken", "tokenflow", "single"] = "dualtoken"
    pixel_weight: float = 1.0  # tokenflow: w in d_sem + w * d_pix (TokenFlow's 1)
    tower: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    pixel_quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    semantic_quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)

    def validate(self, prefix: str = "tokenizer") -> None:
        for name in ("tower", "pixel_quantizer", "semantic_quantizer", "decoder", "discriminator", "loss"):
            getattr(self, name).validate(f"{prefix}.{name}")
        if not self.pixel_weight >= 0:
            raise ConfigError(f"{prefix}.pixel_weight", self.pixel_weight, "a number >= 0")
        if self.design == "tokenflow":
            # One index addresses both codebooks: everything but the code dims must agree.
            for key in ("codebook_size", "depth", "shared_codebook", "decay", "dead_code_threshold"):
                pix, sem = getattr(self.pixel_quantizer, key), getattr(self.semantic_quantizer, key)
                if pix != sem:
                    raise ConfigError(f"{prefix}.pixel_quantizer.{key}", pix,
                                      f"{sem}, as {prefix}.semantic_quantizer.{key}: design 'tokenflow' shares one "
                                      "index between the two codebooks")
        d = self.decoder
        produced = d.latent_size * 2 ** (len(d.ch_mult) - 1)
        if produced != self.tower.image_size:
            raise ConfigError(
                f"{prefix}.decoder.latent_size", d.latent_size,
                f"a size with latent_size x 2^(len(ch_mult)-1) = {prefix}.tower.image_size={self.tower.image_size} "
                f"(now {produced}); change latent_size or the number of ch_mult levels",
            )


@dataclass
class ImageDataConfig:
    """Images for tokenizer training.

    source "synthetic": scenes rendered on the fly from (seed, index) (no files);
    "webdataset": tar shards (files or directories of *.tar) holding jpg/jpeg/png/webp + txt/json;
    "folder": directories of image files with optional sidecar .txt captions.
    """

    source: Literal["synthetic", "webdataset", "folder"] = "synthetic"
    paths: list[str] = field(default_factory=list)
    num_samples: int = 4096  # synthetic only
    seed: int = 0  # synthetic scene seed (held-out sets use another)
    shuffle: bool = True
    num_workers: int = 0  # DataLoader worker processes per rank (0: decode in the main process)
    on_corrupt: Literal["skip", "raise"] = "skip"  # an unreadable image: count and log it, or stop

    def validate(self, prefix: str = "images") -> None:
        if self.source != "synthetic" and not self.paths:
            raise ConfigError(f"{prefix}.paths", self.paths, f"at least one path when {prefix}.source={self.source!r}")
        if self.num_samples < 1:
            raise ConfigError(f"{prefix}.num_samples", self.num_samples, "a positive integer")
        if self.num_workers < 0:
            raise ConfigError(f"{prefix}.num_workers", self.num_workers, "0 (main process) or a positive integer")


@dataclass
class TokenizerTrainConfig:
    """The tokenizer's optimisation loop (the generator's optimizer is the `optim` section)."""

    steps: int
    micro_batch_size: int = 8  # images per rank per micro-batch
    grad_accum: int = 1
    dtype: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast (CUDA); weights and codebooks stay fp32
    gradient_checkpointing: bool = False  # recompute tower layers in backward
    zero_stage: Literal[0, 1, 2] = 0
    # The tower's learning rate as a fraction of optim.lr: below 1 a pre-trained tower (tower.hf_path)
    # drifts less from what it knew while the quantizers and the decoder learn at the full rate.
    tower_lr_scale: float = 1.0
    save_every: int = 0  # 0: only at the end
    max_skipped_steps: int = 10  # optimizer steps in a row with non-finite gradients before the run stops
    replica_check_every: int = 100  # steps between checks that data-parallel replicas agree (0: never)
    image_every: int = 0  # PNG grid of inputs vs reconstructions and codebook usage (0: off)
    wandb_project: Optional[str] = None  # log to wandb (mode from WANDB_MODE, default offline)

    def validate(self, prefix: str = "tokenizer_train") -> None:
        _positive(self, prefix, "steps", "micro_batch_size", "grad_accum", "max_skipped_steps")
        if not 0 < self.tower_lr_scale <= 1:
            raise ConfigError(f"{prefix}.tower_lr_scale", self.tower_lr_scale, "a fraction in (0, 1] of optim.lr")
        for name in ("save_every", "image_every", "replica_check_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), "0 (off) or a positive integer")


@dataclass
class SpecialTokensConfig:
    """Text-vocabulary ids the multimodal layouts need (decided by the text tokenizer).

    The field names are those of `megadual.data.mm_sequence.SpecialTokens`, so the trainer
    builds one with `SpecialTokens(**dataclasses.asdict(cfg.mllm.tokens))`.
    """

    image_start_id: int
    image_end_id: int
    eos_id: int
    pad_id: int
    generation_marker_id: Optional[int] = None  # before image_start in text-to-image sequences
    bos_id: Optional[int] = None  # None for Qwen (no BOS)
    visual_placeholder_id: Optional[int] = None  # text id at visual positions (None: pad_id)
    uncond_prompt_ids: tuple[int, ...] = ()  # the caption of a CFG-dropped (unconditional) sample

    def ids(self) -> dict[str, int]:
        """Every set id by field name (uncond_prompt_ids as uncond_prompt_ids[i])."""
        named = {n: getattr(self, n) for n in ("image_start_id", "image_end_id", "eos_id", "pad_id",
                                                "generation_marker_id", "bos_id", "visual_placeholder_id")
                 if getattr(self, n) is not None}
        named.update({f"uncond_prompt_ids[{i}]": v for i, v in enumerate(self.uncond_prompt_ids)})
        return named

    def validate(self, prefix: str = "mllm.tokens") -> None:
        for name, value in self.ids().items():
            if value < 0:
                raise ConfigError(f"{prefix}.{name}", value, "a non-negative token id")
        if self.image_start_id == self.image_end_id:
            raise ConfigError(f"{prefix}.image_end_id", self.image_end_id,
                              f"an id different from {prefix}.image_start_id={self.image_start_id}")


MLLM_STAGES = ("projector", "projector_llm", "heads", "all")


@dataclass
class MLLMConfig:
    """The unified DualToken MLLM around the backbone: visual input embedding, depth heads, loss,
    trainable stage and generation defaults (megadual/models/mllm.py).

    Sizes of the visual side come from here, not from a tokenizer, so the model can be built
    (and tested) without one; the trainer checks them against the tokenizer / token shards.
    """

    tokens: SpecialTokensConfig
    pixel_codebook_size: int = 16384
    semantic_codebook_size: int = 16384
    depth: int = 8  # residual depth R (8 at 384 px, 4 at 256 px)
    num_positions: int = 729  # visual positions per image (27x27 at 384 px): the generation length
    # Width of the input code tables: the tokenizer's codebook dim (32) or its projection's output.
    code_embed_dim: int = 32
    # "learned": random tables; "tokenizer": the trainer copies the tokenizer's codebooks in
    # (DualTokenMLLM.init_code_embeddings_) from `tokenizer_path`.
    code_init: Literal["learned", "tokenizer"] = "learned"
    tokenizer_path: Optional[str] = None
    # "bytes" (the embedded debug tokenizer) or a local Hugging Face tokenizer directory.
    text_tokenizer: str = "bytes"
    pixel_embed_dim: Optional[int] = None  # pixel share of the hidden size (None: hidden_size // 2)
    projector_hidden: Optional[int] = None  # hidden width of each 2-layer MLP (None: its output width)
    head_layers: int = 3
    head_width: Optional[int] = None  # depth-transformer width (None: backbone.hidden_size)
    head_heads: int = 8
    head_mlp_ratio: int = 4  # MLP width = head_mlp_ratio * head_width
    init_std: float = 0.02
    visual_loss_weight: float = 1.0  # weight of a visual position's NLL relative to a text token's
    # Which parameters train (the paper's four stages): "projector" (1: visual embedding only),
    # "projector_llm" (2: + backbone), "heads" (3: backbone frozen; visual embedding + heads), "all" (4).
    trainable_stage: Literal["projector", "projector_llm", "heads", "all"] = "all"
    cfg_scale: float = 3.0  # classifier-free guidance: uncond + scale * (cond - uncond); 1 = no guidance
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    def validate(self, prefix: str = "mllm") -> None:
        self.tokens.validate(f"{prefix}.tokens")
        _positive(self, prefix, "depth", "num_positions", "code_embed_dim", "head_layers", "head_heads",
                  "head_mlp_ratio")
        for name in ("pixel_codebook_size", "semantic_codebook_size"):
            if getattr(self, name) < 2:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), "an integer >= 2")
        for name in ("pixel_embed_dim", "projector_hidden", "head_width"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), "a positive integer, or null for the default")
        if self.head_width is not None and self.head_width % self.head_heads:
            raise ConfigError(f"{prefix}.head_width", self.head_width, f"a multiple of {prefix}.head_heads={self.head_heads}")
        if self.code_init == "tokenizer" and not self.tokenizer_path:
            raise ConfigError(f"{prefix}.tokenizer_path", self.tokenizer_path,
                              f"a tokenizer directory when {prefix}.code_init='tokenizer' (or use code_init: learned)")
        if self.init_std <= 0:
            raise ConfigError(f"{prefix}.init_std", self.init_std, "a positive number")
        if self.visual_loss_weight < 0:
            raise ConfigError(f"{prefix}.visual_loss_weight", self.visual_loss_weight, "a number >= 0")
        if self.cfg_scale < 0:
            raise ConfigError(f"{prefix}.cfg_scale", self.cfg_scale, "a number >= 0 (1: no guidance)")
        if self.temperature < 0:
            raise ConfigError(f"{prefix}.temperature", self.temperature, "a number >= 0 (0: greedy)")
        if self.top_k < 0:
            raise ConfigError(f"{prefix}.top_k", self.top_k, "0 (off) or a positive integer")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{prefix}.top_p", self.top_p, "a number in (0, 1] (1: off)")

    def resolved_head_width(self, hidden_size: int) -> int:
        return self.head_width if self.head_width is not None else hidden_size

    def resolved_pixel_embed_dim(self, hidden_size: int) -> int:
        return self.pixel_embed_dim if self.pixel_embed_dim is not None else hidden_size // 2

    def validate_with_backbone(self, backbone: BackboneConfig, prefix: str = "mllm") -> None:
        """The checks that need the backbone's sizes."""
        d = backbone.hidden_size
        pixel = self.resolved_pixel_embed_dim(d)
        if not 1 <= pixel < d:
            raise ConfigError(f"{prefix}.pixel_embed_dim", self.pixel_embed_dim,
                              f"an integer in [1, backbone.hidden_size={d}) (the semantic branch gets the rest)")
        width = self.resolved_head_width(d)
        if width % self.head_heads:
            raise ConfigError(f"{prefix}.head_heads", self.head_heads,
                              f"a divisor of the head width {width} (backbone.hidden_size unless {prefix}.head_width is set)")
        for name, value in self.tokens.ids().items():
            if value >= backbone.vocab_size:
                raise ConfigError(f"{prefix}.tokens.{name}", value, f"an id below backbone.vocab_size={backbone.vocab_size}")


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
    tokenizer: Optional[TokenizerConfig] = None
    images: Optional[ImageDataConfig] = None
    tokenizer_train: Optional[TokenizerTrainConfig] = None
    mllm: Optional[MLLMConfig] = None
    # Extra DeepSpeed JSON keys passed through verbatim (merged last).
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Validate every present section, then the combinations that span sections."""
        for name in ("run", "backbone", "parallel", "optim", "train", "data", "loader", "tokenizer", "images",
                     "tokenizer_train", "mllm"):
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
        if self.mllm is not None:
            if self.backbone is None:
                raise ConfigError("backbone", None, "a 'backbone:' section (the 'mllm:' section extends a backbone)")
            self.mllm.validate_with_backbone(self.backbone)
            if self.parallel.pp > 1 and (self.mllm.trainable_stage != "all" or self.mllm.code_init != "learned"):
                key, value = (("mllm.trainable_stage", self.mllm.trainable_stage) if self.mllm.trainable_stage != "all"
                              else ("mllm.code_init", self.mllm.code_init))
                raise ConfigError(key, value, f"{'all' if key.endswith('stage') else 'learned'} with "
                                  f"parallel.pp={self.parallel.pp} (pipeline stages do not yet freeze parts or load "
                                  "the tokenizer's code tables), or parallel.pp=1")
        if self.backbone is not None and self.parallel.pp > self.backbone.num_layers:
            raise ConfigError(
                "parallel.pp", self.parallel.pp, f"at most backbone.num_layers={self.backbone.num_layers}"
            )

    def require(self, *sections: str, command: str) -> None:
        """Raise a ConfigError if a section `command` needs is absent."""
        for name in sections:
            if getattr(self, name) is None:
                raise ConfigError(name, None, f"a '{name}:' section (the '{command}' command needs it)")
