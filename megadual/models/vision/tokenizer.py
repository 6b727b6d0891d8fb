"""The visual tokenizer: one SigLIP tower, residual-quantized branches, a pixel decoder.

Shapes: B batch, H = W image side, T = g * g tokens (g = H // patch), C tower hidden size,
D codebook dim, R residual depth, K codes.

    images [B,3,H,W] -> tower taps
        pixel features [B,T,C] -> proj_in -> RQ (pixel codebook) -> proj_out -> grid [B,C,g,g] -> decoder -> [B,3,H,W]
        semantic features [B,T,C] -> proj_in -> RQ (semantic codebook) -> proj_out -> remaining tower layers,
                                     post-layernorm, pooling head -> pooled [B,C]

That is the "dualtoken" design (`tokenizer.design`). "tokenflow" keeps both branches' projections
but quantizes the two projected features with one JointResidualQuantizer (one index per position
and depth selects a semantic and a pixel code); "single" has the semantic branch only, and the
decoder reads its features too.

Public API (inference; the trainer uses `forward`):

    tok = DualTokenizer.from_pretrained(dir)        # config.json + model.safetensors
    pixel_codes, semantic_codes = tok.encode(images)    # int64 [B, T, R] each; images float [-1, 1]
                                                         # (tokenflow, single: the same tensor twice)
    images = tok.decode(pixel_codes)                     # float32 [B, 3, H, W] in [-1, 1]
    pixel_emb, semantic_emb = tok.embed_codes(pixel_codes, semantic_codes)   # [B, T, D] code-space sums
    tok.save_pretrained(dir)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from megadual.config.loader import section_from_dict
from megadual.config.schema import QuantizerConfig, TokenizerConfig
from megadual.fs import write_atomic

from .decoder import PixelDecoder
from .joint_quantizer import JointResidualQuantizer
from .quantizer import ResidualQuantizer, RQUsage
from .tower import SiglipTower, build_siglip

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "megadual-dualtoken"
FORMAT_VERSION = 1


class BranchOutput(NamedTuple):
    """One quantized branch's result.

    Attributes:
        features: [B, T, C] post-quant projection of the quantized vectors (straight-through grads).
        codes: [B, T, R] int64.
        commitment_loss: [] float32.
        usage: RQUsage of this batch (over the data-parallel group when training).
    """

    features: torch.Tensor
    codes: torch.Tensor
    commitment_loss: torch.Tensor
    usage: RQUsage


class QuantizedBranch(nn.Module):
    """Pre-quant projection C -> D, a ResidualQuantizer, post-quant projection D -> C.

    The pre-quant projection starts with a LayerNorm: tower features carry a few large
    outlier channels, and the codebook's EMA statistics are much better behaved on
    normalised inputs. With `quantize=False` the branch holds only its projections (TokenFlow's
    branches share one JointResidualQuantizer, which the tokenizer holds).
    """

    def __init__(self, hidden_size: int, cfg: QuantizerConfig, dp_group: Optional[dist.ProcessGroup] = None,
                 seed: int = 0, quantize: bool = True):
        super().__init__()
        self.proj_in = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, cfg.codebook_dim))
        self.rq = ResidualQuantizer(
            cfg.codebook_dim, cfg.codebook_size, cfg.depth, shared_codebook=cfg.shared_codebook, decay=cfg.decay,
            dead_code_threshold=cfg.dead_code_threshold, dp_group=dp_group, seed=seed,
        ) if quantize else None
        self.proj_out = nn.Linear(cfg.codebook_dim, hidden_size)

    def forward(self, x: torch.Tensor) -> BranchOutput:
        """Args: x [B, T, C]. Returns: BranchOutput (features [B, T, C], codes [B, T, R], ...)."""
        out = self.rq(self.proj_in(x))
        return BranchOutput(self.proj_out(out.quantized), out.codes.long(), out.commitment_loss, out.usage)


def code_vectors(codebook: torch.Tensor, codes: torch.Tensor, depth: int, per_depth: bool = False) -> torch.Tensor:
    """Codebook vectors of residual codes.

    Args:
        codebook: [K, D] shared by the depths, or [R, K, D] one per depth.
        codes: [B, T, R] integer codes in [0, K).
        depth: R, the quantizer's residual depth.
        per_depth: return every depth's vector instead of their sum.

    Returns:
        [B, T, D] (sum over depths: what the quantizer outputs) or [B, T, R, D].
    """
    num_codes = codebook.shape[-2]
    if codes.shape[-1] != depth:
        raise ValueError(f"codes: last dim must be the residual depth {depth}, got shape {list(codes.shape)}")
    codes = codes.long()
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= num_codes):
        raise ValueError(f"codes: values must lie in [0, {num_codes}), got [{int(codes.min())}, {int(codes.max())}]")
    if codebook.dim() == 2:
        vectors = codebook[codes]  # [B, T, R, D]
    else:
        depth_index = torch.arange(codebook.shape[0], device=codes.device).expand_as(codes)
        vectors = codebook[depth_index, codes]  # [B, T, R, D]
    return vectors if per_depth else vectors.sum(-2)


class TokenizerOutput(NamedTuple):
    """What `DualTokenizer.forward` returns (training).

    Attributes:
        reconstruction: [B, 3, H, W], unbounded decoder output.
        pixel, semantic: the two branches' outputs.
        pooled: [B, C] pooling head on the quantized semantic path.
        semantic_unquantized: [B, T, C] the tower's own features at semantic_layer.
        decoder_features: [B, ch, H, W] the decoder's last conv input (for the adaptive GAN weight).
    """

    reconstruction: torch.Tensor
    pixel: BranchOutput
    semantic: BranchOutput
    pooled: torch.Tensor
    semantic_unquantized: torch.Tensor
    decoder_features: torch.Tensor


@contextlib.contextmanager
def _eval(*modules: nn.Module):
    """Run in eval mode (no EMA update, no restart) and restore each module's mode after."""
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


class DualTokenizer(nn.Module):
    """SigLIP tower + quantized branches (as `cfg.design` says) + pixel decoder.

    Args:
        cfg: the `tokenizer` config section.
        dp_group: data-parallel group the codebook statistics are all-reduced over (None: local).
        seed: seeds the random tower (when cfg.tower.hf_path is None), the heads and the
            quantizers' restart generators.
        tower: an already built transformers SiglipVisionModel to use instead of building one.
    """

    def __init__(self, cfg: TokenizerConfig, dp_group: Optional[dist.ProcessGroup] = None, seed: int = 0,
                 tower=None):
        super().__init__()
        self.cfg = cfg
        model = tower if tower is not None else build_siglip(cfg.tower, seed)
        self.tower = SiglipTower(model, cfg.tower)
        hidden = self.tower.hidden_size
        self.design = cfg.design
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            if self.design != "single":
                self.pixel_branch = QuantizedBranch(hidden, cfg.pixel_quantizer, dp_group, seed=seed + 2,
                                                    quantize=self.design == "dualtoken")
            self.semantic_branch = QuantizedBranch(hidden, cfg.semantic_quantizer, dp_group, seed=seed + 3,
                                                   quantize=self.design != "tokenflow")
            self.decoder = PixelDecoder(hidden, cfg.decoder)
            if self.design == "tokenflow":
                sem, pix = cfg.semantic_quantizer, cfg.pixel_quantizer  # validated to agree but for the dims
                self.joint_rq = JointResidualQuantizer(
                    sem.codebook_dim, pix.codebook_dim, sem.codebook_size, sem.depth, pixel_weight=cfg.pixel_weight,
                    shared_codebook=sem.shared_codebook, decay=sem.decay, dead_code_threshold=sem.dead_code_threshold,
                    dp_group=dp_group, seed=seed + 2,
                )
        self.grid_size = cfg.tower.grid_size

    def quantizers(self) -> dict[str, nn.Module]:
        """The design's quantizers by name ("pixel" and "semantic", "joint", or "single"); each
        has a `cluster_size` buffer and a `dead_code_threshold`."""
        if self.design == "tokenflow":
            return {"joint": self.joint_rq}
        if self.design == "single":
            return {"single": self.semantic_branch.rq}
        return {"pixel": self.pixel_branch.rq, "semantic": self.semantic_branch.rq}

    def codebook(self, kind: str) -> torch.Tensor:
        """The codebook pixel ("pixel") or semantic ("semantic") codes index: [K, D] or [R, K, D]."""
        if self.design == "tokenflow":
            return self.joint_rq.codebook_pix if kind == "pixel" else self.joint_rq.codebook_sem
        if self.design == "single" or kind == "semantic":
            return self.semantic_branch.rq.codebook
        return self.pixel_branch.rq.codebook

    def _code_vectors(self, kind: str, codes: torch.Tensor, per_depth: bool = False) -> torch.Tensor:
        """`code_vectors` of pixel ("pixel") or semantic ("semantic") codes in their codebook."""
        quantizer = self.cfg.pixel_quantizer if kind == "pixel" and self.design == "dualtoken" else \
            self.cfg.semantic_quantizer  # tokenflow: validated equal depths; single: its one codebook
        return code_vectors(self.codebook(kind), codes, quantizer.depth, per_depth)

    def _pixel_projection(self) -> nn.Module:
        """The post-quant projection whose output the decoder reads."""
        return (self.semantic_branch if self.design == "single" else self.pixel_branch).proj_out

    def _quantize(self, taps) -> tuple[BranchOutput, BranchOutput]:
        """The design's (pixel, semantic) branch outputs for the tower's taps. With one codebook
        ("single") both are the semantic branch's, the pixel one carrying no second commitment
        loss; with a shared index ("tokenflow") both carry the same codes and usage."""
        if self.design == "dualtoken":
            return self.pixel_branch(taps.pixel), self.semantic_branch(taps.semantic)
        if self.design == "single":
            semantic = self.semantic_branch(taps.semantic)
            return semantic._replace(commitment_loss=torch.zeros_like(semantic.commitment_loss)), semantic
        out = self.joint_rq(self.semantic_branch.proj_in(taps.semantic), self.pixel_branch.proj_in(taps.pixel))
        codes = out.codes.long()
        return (BranchOutput(self.pixel_branch.proj_out(out.quantized_pix), codes, out.commitment_pix, out.usage),
                BranchOutput(self.semantic_branch.proj_out(out.quantized_sem), codes, out.commitment_sem, out.usage))

    @property
    def image_size(self) -> int:
        return self.cfg.tower.image_size

    def _check_images(self, images: torch.Tensor) -> None:
        s = self.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] != s or images.shape[-2] != s:
            raise ValueError(f"images: expected [B, 3, {s}, {s}] in [-1, 1], got shape {list(images.shape)}")

    def _grid(self, features: torch.Tensor) -> torch.Tensor:
        b, t, c = features.shape
        g = self.grid_size
        return features.transpose(1, 2).reshape(b, c, g, g)  # [B, T, C] -> [B, C, g, g]

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        """The full training pass: both branches, the decoder and the semantic tail.

        Args:
            images: [B, 3, H, W] float in [-1, 1].
        """
        self._check_images(images)
        taps = self.tower.taps(images)
        pixel, semantic = self._quantize(taps)
        decoder_features = self.decoder.features(self._grid(pixel.features))
        reconstruction = self.decoder.conv_out(decoder_features)
        _, pooled = self.tower.tail(semantic.features)
        return TokenizerOutput(reconstruction, pixel, semantic, pooled, taps.semantic, decoder_features)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images to codes (no codebook update, whatever the module's mode).

        Args:
            images: [B, 3, H, W] float in [-1, 1].

        Returns:
            (pixel_codes, semantic_codes), each int64 [B, T, R] (T = grid^2, row-major); for the
            "tokenflow" and "single" designs one tensor, twice (the shared index / the one codebook).
        """
        self._check_images(images)
        with _eval(self):
            taps = self.tower.taps(images.to(self.decoder.conv_out.weight.dtype))
            pixel, semantic = self._quantize(taps)
            return pixel.codes, semantic.codes

    @torch.no_grad()
    def decode(self, pixel_codes: torch.Tensor) -> torch.Tensor:
        """Pixel codes to images.

        Args:
            pixel_codes: [B, T, R] integers in [0, K) with T = grid^2.

        Returns:
            float32 [B, 3, H, W] in [-1, 1] (clamped).
        """
        if pixel_codes.dim() != 3 or pixel_codes.shape[1] != self.grid_size**2:
            raise ValueError(
                f"pixel_codes: expected [B, {self.grid_size ** 2}, R], got shape {list(pixel_codes.shape)}"
            )
        with _eval(self):
            features = self._pixel_projection()(self._code_vectors("pixel", pixel_codes))
            return self.decoder(self._grid(features)).float().clamp(-1, 1)

    def embed_codes(self, pixel_codes: Optional[torch.Tensor] = None, semantic_codes: Optional[torch.Tensor] = None,
                    per_depth: bool = False) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Codebook embeddings of codes, for the MLLM's input projectors and depth heads.

        Args:
            pixel_codes, semantic_codes: [B, T, R] codes of each branch (either may be None).
            per_depth: return [B, T, R, D] per-depth vectors instead of their sum [B, T, D].

        Returns:
            (pixel embeddings, semantic embeddings), None where no codes were given. The sum over
            depths equals the branch's quantized vector (before the post-quant projection).
        """
        pix = None if pixel_codes is None else self._code_vectors("pixel", pixel_codes, per_depth)
        sem = None if semantic_codes is None else self._code_vectors("semantic", semantic_codes, per_depth)
        return pix, sem

    # ----------------------------------------------------------------------------- persistence

    def save_pretrained(self, directory: str) -> None:
        """Write model.safetensors, then config.json (tokenizer section + the SigLIP config).

        Each file is replaced atomically, the weights first: a crash leaves the previous export,
        or new weights without their config.json (`is_complete_export` says no). The quantizers'
        restart generators (non-tensor state) are not saved: a pretrained tokenizer is for
        inference; training checkpoints keep them.
        """
        from safetensors.torch import save

        os.makedirs(directory, exist_ok=True)
        tokenizer_cfg = dataclasses.asdict(self.cfg)
        tokenizer_cfg["tower"]["hf_path"] = None  # the weights are in model.safetensors now
        tokenizer_cfg["loss"]["semantic_teacher_path"] = None  # a training input, not part of the model
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tokenizer": tokenizer_cfg,
            "siglip": self.tower.model.config.to_dict(),
        }
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if isinstance(v, torch.Tensor)}
        write_atomic(os.path.join(directory, WEIGHTS_NAME), save(state, metadata={"format": FORMAT}))
        write_atomic(os.path.join(directory, CONFIG_NAME), json.dumps(config, indent=1, sort_keys=True))

    @staticmethod
    def is_complete_export(directory: str) -> bool:
        """Whether `directory` holds a whole `save_pretrained` export (a readable config.json of
        this format beside its weights)."""
        try:
            with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as f:
                complete = json.load(f).get("format") == FORMAT
        except (OSError, ValueError):
            return False
        return complete and os.path.isfile(os.path.join(directory, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str, dp_group: Optional[dist.ProcessGroup] = None,
                        map_location: str | torch.device = "cpu") -> "DualTokenizer":
        """Load a directory written by `save_pretrained` (eval mode).

        Raises:
            FileNotFoundError: config.json or model.safetensors is missing.
            ValueError: not a MegaDual DualTokenizer directory, or the weights do not fit the config.
        """
        from safetensors.torch import load_file
        from transformers import SiglipVisionConfig, SiglipVisionModel

        config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing: is {directory!r} a directory written by save_pretrained?")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        if config.get("format") != FORMAT:
            raise ValueError(f"{config_path}: format {config.get('format')!r}, expected {FORMAT!r}")
        cfg = section_from_dict(TokenizerConfig, config["tokenizer"], "tokenizer")
        siglip = SiglipVisionConfig(**{k: v for k, v in config["siglip"].items() if k != "model_type"})
        siglip._attn_implementation = cfg.tower.attn_impl
        model = cls(cfg, dp_group=dp_group, tower=SiglipVisionModel(siglip).float())
        state = load_file(weights_path, device=str(map_location))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"{weights_path} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model.eval()
