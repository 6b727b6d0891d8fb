"""The unified DualToken MLLM: Qwen2 backbone + visual input embedding + pixel and semantic depth heads.

Legend: B rows, T tokens per row, D hidden, V vocabulary (V/p per tensor-parallel rank),
R residual depth, K codebook size, P visual positions per image, Nt text targets,
Nv visual targets.

    model = DualTokenMLLM(cfg.backbone, cfg.mllm, tp_group=tp_group, seed=cfg.run.seed)
    apply_trainable_stage(model, cfg.mllm.trainable_stage)
    out = model(batch)               # batch from PackedMultimodalLoader (mm_sequence.collate_rows)
    out.loss.backward()              # out.text_loss, out.visual_loss, ... for logging

The loss (one next-token NLL over text and visual tokens). A trained position j predicts
position j+1: a text token (its target in `labels`) or a visual position (its R pixel and
R semantic codes in `pixel_labels` / `semantic_labels`). A text target contributes its
cross entropy over the vocabulary (vocab-parallel, never gathered); a visual target
contributes ONE term, the mean of its 2R code cross entropies (over depths and both
branches), so an image position weighs like one token, whatever R is. With `w` =
mllm.visual_loss_weight,

    loss = (sum_text nll + w * sum_visual mean_{branch, depth} nll) / (Nt + Nv)

normalised by this micro-batch's trained positions (the loader's `loss_mask`). The parts
returned for logging are plain means: text_loss over Nt, visual_loss over Nv, pixel_loss
and semantic_loss over Nv and the R depths (visual_loss is their average). Counts are
returned so a trainer can re-weight across micro-batches or data-parallel ranks.

Pipeline-friendly split: `embed_inputs` (first stage), `lm.backbone` layers, `losses`
(last stage: lm_head + both heads). Tensor parallelism: the backbone and the text logits
are sharded (vocab-parallel embedding, lm_head and cross entropy); the visual embedding
and the depth heads are replicated, so their outputs and gradients agree on every rank.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megadual.config.schema import MLLM_STAGES, BackboneConfig, MLLMConfig
from megadual.distributed.comm import ProcessGroup, group_size
from megadual.distributed.tensor_parallel import gather_vocab_logits, vocab_parallel_cross_entropy

from .heads import DepthHead
from .qwen2.cache import KVCache
from .qwen2.model import Qwen2ForCausalLM, block_rng
from .sampling import apply_cfg, sample_logits
from .visual_embedding import VisualEmbedding

IGNORE_INDEX = -100  # the loader's ignore value (megadual.data.mm_sequence.IGNORE_INDEX; models may not import data)

# The paper's four training stages -> the parts that train (everything else is frozen).
TRAINABLE_PARTS: dict[str, tuple[str, ...]] = {
    "projector": ("visual_embed",),  # stage 1: align visual inputs to a frozen LLM
    "projector_llm": ("visual_embed", "lm"),  # stage 2: + the LLM
    "heads": ("visual_embed", "pixel_head", "semantic_head"),  # stage 3: LLM frozen, generation parts
    "all": ("visual_embed", "lm", "pixel_head", "semantic_head"),  # stage 4
}
assert tuple(TRAINABLE_PARTS) == MLLM_STAGES


class MLLMLosses(NamedTuple):
    """What `DualTokenMLLM.forward` returns. Every entry is a scalar tensor; only `loss` has a graph.

    Parts with no target in the micro-batch are 0 (their count says so).
    """

    loss: torch.Tensor
    text_loss: torch.Tensor
    visual_loss: torch.Tensor
    pixel_loss: torch.Tensor
    semantic_loss: torch.Tensor
    num_text_targets: torch.Tensor
    num_visual_targets: torch.Tensor


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids -> (ids [B, T], attention_mask bool [B, T]) padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = True
    return ids.to(device), mask.to(device)


class DualTokenMLLM(nn.Module):
    """The unified model.

    Args:
        backbone_cfg: the `backbone` section; mllm_cfg: the `mllm` section.
        tp_group: tensor-parallel group of the backbone (None: plain).
        seed: layout-independent init: backbone blocks as `Qwen2ForCausalLM` (indices 0..L+1),
            then the visual embedding (L+2), pixel head (L+3), semantic head (L+4). The same
            seed gives the same model at any tp size (shards = slices of the tp=1 weights).

    Attributes:
        lm: the `Qwen2ForCausalLM` (backbone + lm_head; load HF weights into it).
        visual_embed: `VisualEmbedding`; pixel_head, semantic_head: `DepthHead`s.
    """

    def __init__(self, backbone_cfg: BackboneConfig, mllm_cfg: MLLMConfig, tp_group: ProcessGroup = None,
                 seed: Optional[int] = None):
        super().__init__()
        mllm_cfg.validate()
        mllm_cfg.validate_with_backbone(backbone_cfg)
        self.cfg, self.backbone_cfg, self.tp_group = mllm_cfg, backbone_cfg, tp_group
        self.lm = Qwen2ForCausalLM(backbone_cfg, tp_group, seed)
        d, n = backbone_cfg.hidden_size, backbone_cfg.num_layers
        with block_rng(seed, n + 2):
            self.visual_embed = VisualEmbedding(mllm_cfg, d)
        head_kw = dict(hidden_size=d, depth=mllm_cfg.depth, width=mllm_cfg.resolved_head_width(d),
                       num_layers=mllm_cfg.head_layers, num_heads=mllm_cfg.head_heads,
                       mlp_ratio=mllm_cfg.head_mlp_ratio, init_std=mllm_cfg.init_std)
        with block_rng(seed, n + 3):
            self.pixel_head = DepthHead(codebook_size=mllm_cfg.pixel_codebook_size, **head_kw)
        with block_rng(seed, n + 4):
            self.semantic_head = DepthHead(codebook_size=mllm_cfg.semantic_codebook_size, **head_kw)

    # ------------------------------------------------------------------ Hugging Face-style directories

    @classmethod
    def from_pretrained(cls, path: str, dtype: Optional[torch.dtype] = torch.float32,
                        device: str | torch.device = "cpu") -> "DualTokenMLLM":
        """The model of an export directory (`megadual convert to-hf` of a stage-2 run, or
        `save_pretrained`; layout in megadual/models/mllm_export.py), tp = 1, eval mode.

        `model.cfg.tokenizer_path` / `model.cfg.text_tokenizer` then point into the directory.
        dtype None keeps the stored dtype.
        """
        from .mllm_export import load_mllm_export

        return load_mllm_export(path, dtype, device)

    def save_pretrained(self, path: str, visual_tokenizer: Optional[str] = None, text_tokenizer: Optional[str] = None,
                        max_shard_size: str = "5GB", dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> list[str]:
        """Write this (tp = 1) model as an export directory that `from_pretrained` reads.

        Args:
            visual_tokenizer: a `DualTokenizer.save_pretrained` directory to copy in (default:
                mllm.tokenizer_path, if set).
            text_tokenizer: "bytes" or a Hugging Face tokenizer directory (default: mllm.text_tokenizer).
            max_shard_size: safetensors shard size, e.g. "5GB"; dtype: cast the weights.

        Returns:
            The files written, relative to `path`.
        """
        from .hf_directory import parse_size
        from .mllm_export import write_mllm_export

        if group_size(self.tp_group) > 1:
            raise ValueError("save_pretrained writes a tp=1 model; convert a tensor-parallel run with "
                             "`megadual convert to-hf`")
        return write_mllm_export(
            self.state_dict().items(), self.backbone_cfg, self.cfg, path,
            visual_tokenizer=visual_tokenizer if visual_tokenizer is not None else self.cfg.tokenizer_path,
            text_tokenizer=text_tokenizer if text_tokenizer is not None else self.cfg.text_tokenizer,
            max_shard_bytes=parse_size(max_shard_size), dtype=dtype, overwrite=overwrite,
            source="DualTokenMLLM.save_pretrained",
        )

    # ------------------------------------------------------------------ inputs

    def init_code_embeddings_(self, pixel_codebook: torch.Tensor, semantic_codebook: torch.Tensor,
                              pixel_projection=None, semantic_projection=None) -> None:
        """Initialise the input code tables from the tokenizer's codebooks [K, Dc], optionally
        projected ([K, Dc] -> [K, mllm.code_embed_dim]); see `VisualEmbedding.init_from_codebooks_`."""
        self.visual_embed.init_from_codebooks_(pixel_codebook, semantic_codebook, pixel_projection, semantic_projection)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_codes: Optional[torch.Tensor] = None,
                     semantic_codes: Optional[torch.Tensor] = None,
                     modality_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Input embeddings: the token embedding at text positions, the visual embedding where
        `modality_mask` is True.

        Args:
            input_ids: int64 [B, T] (any valid id at visual positions: it is replaced).
            pixel_codes, semantic_codes: int64 [B, T, R] (read only where modality_mask is True).
            modality_mask: bool [B, T], or None for text only.

        Returns:
            [B, T, D], replicated on tensor-parallel ranks.
        """
        backbone = self.lm.backbone
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        if self.backbone_cfg.check_token_ids:
            backbone.check_token_ids(input_ids)
        x = backbone.embed_tokens(input_ids)
        if modality_mask is None:
            return x
        if pixel_codes is None or semantic_codes is None:
            raise ValueError("modality_mask marks visual positions: pass pixel_codes and semantic_codes too")
        if modality_mask.shape != input_ids.shape:
            raise ValueError(f"modality_mask {tuple(modality_mask.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
        for name, codes in (("pixel_codes", pixel_codes), ("semantic_codes", semantic_codes)):
            if codes.shape != (*input_ids.shape, self.cfg.depth):
                raise ValueError(
                    f"{name} has shape {tuple(codes.shape)}, expected {(*input_ids.shape, self.cfg.depth)} "
                    f"([batch, seq_len, mllm.depth]); an image tokenized at another resolution has another depth"
                )
        visual = self.visual_embed(pixel_codes[modality_mask], semantic_codes[modality_mask])  # [Nvis, D]
        return x.index_put((modality_mask,), visual.to(x.dtype))

    def hidden_states(self, input_ids: torch.Tensor, pixel_codes=None, semantic_codes=None, modality_mask=None,
                      position_ids=None, cu_seqlens=None, kv_cache: Optional[KVCache] = None,
                      attention_mask=None) -> torch.Tensor:
        """Backbone output for a (packed, or cached) multimodal sequence: [B, T, D].

        Arguments as `embed_inputs` and `Qwen2Model.forward` (`kv_cache` / `attention_mask`
        for incremental decoding; inference only)."""
        x = self.embed_inputs(input_ids, pixel_codes, semantic_codes, modality_mask)
        return self.lm.backbone(None, position_ids, cu_seqlens, x, kv_cache, attention_mask)

    # ------------------------------------------------------------------ training

    def forward(self, batch: dict) -> MLLMLosses:
        """Losses of one packed batch (keys of `mm_sequence.collate_rows`: input_ids, pixel_codes,
        semantic_codes, modality_mask, labels, pixel_labels, semantic_labels, position_ids,
        cu_seqlens, and optionally loss_mask). See the module docstring for the formula."""
        hidden = self.hidden_states(batch["input_ids"], batch["pixel_codes"], batch["semantic_codes"],
                                    batch["modality_mask"], batch.get("position_ids"), batch.get("cu_seqlens"))
        return self.losses(hidden, batch)

    def losses(self, hidden: torch.Tensor, batch: dict) -> MLLMLosses:
        """Text and visual NLL from final hidden states [B, T, D] (the last pipeline stage's work).

        Only positions with a target go through the lm_head and the heads.
        """
        return compute_losses(hidden, batch, self.lm.lm_head, self.pixel_head, self.semantic_head,
                              self.cfg.visual_loss_weight, self.tp_group)

    # ------------------------------------------------------------------ generation

    def new_kv_cache(self) -> KVCache:
        """An empty backbone cache for this model."""
        return KVCache(self.backbone_cfg.num_layers)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits for sampling: [..., D] -> [..., V] (gathered over tensor-parallel ranks)."""
        return gather_vocab_logits(self.lm.lm_head(hidden), self.tp_group)

    @torch.no_grad()
    def next_text_token(self, hidden: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The next text token after hidden states [B, D] -> int64 [B] (temperature 0: greedy)."""
        return sample_logits(self.text_logits(hidden), temperature, top_k, top_p, generator)

    @torch.no_grad()
    def sample_visual_codes(self, hidden: torch.Tensor, uncond_hidden: Optional[torch.Tensor] = None,
                            cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                            generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes of the next visual position, sampled depth by depth in both heads.

        Args:
            hidden: conditional backbone hidden states [B, D] (the position before the new one).
            uncond_hidden: the same rows run with the unconditional prompt [B, D], or None
                (no guidance). With it, at every depth both rows are scored and the code is
                drawn from `uncond + cfg_scale * (cond - uncond)`; both rows then continue
                with that same code.
            temperature, top_k, top_p: see `sampling.sample_logits` (temperature 0: greedy).
            generator: on the logits' device; seed it identically on tensor-parallel peers.

        Returns:
            (pixel codes [B, R], semantic codes [B, R]), int64.
        """
        b = hidden.shape[0]
        if uncond_hidden is None:
            def choose(logits, _depth):
                return sample_logits(logits, temperature, top_k, top_p, generator)
            rows = hidden
        else:
            if uncond_hidden.shape != hidden.shape:
                raise ValueError(f"uncond_hidden {tuple(uncond_hidden.shape)} must match hidden {tuple(hidden.shape)}")

            def choose(logits, _depth):  # logits [2B, K]: conditional rows first
                mixed = apply_cfg(logits[:b], logits[b:], cfg_scale)
                codes = sample_logits(mixed, temperature, top_k, top_p, generator)
                return torch.cat([codes, codes])
            rows = torch.cat([hidden, uncond_hidden])
        pixel = self.pixel_head.generate(rows, choose)[:b]
        semantic = self.semantic_head.generate(rows, choose)[:b]
        return pixel, semantic

    def generation_prefix(self, prompt_ids: list[int]) -> list[int]:
        """[bos] prompt [generation_marker] [image_start]: the layout the loader trains (mm_sequence)."""
        t = self.cfg.tokens
        return ([t.bos_id] if t.bos_id is not None else []) + list(prompt_ids) + (
            [t.generation_marker_id] if t.generation_marker_id is not None else []) + [t.image_start_id]

    def _check_context(self, length: int, what: str) -> None:
        limit = self.backbone_cfg.max_position_embeddings
        if length > limit:
            raise ValueError(
                f"{what} needs {length} positions, more than backbone.max_position_embeddings={limit}; "
                "shorten the prompt or ask for fewer new tokens"
            )

    @torch.no_grad()
    def generate_image_codes(self, prompts: list[list[int]], num_positions: Optional[int] = None,
                             cfg_scale: Optional[float] = None, temperature: Optional[float] = None,
                             top_k: Optional[int] = None, top_p: Optional[float] = None,
                             generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-to-image codes with classifier-free guidance and a backbone KV cache.

        Args:
            prompts: B caption id lists (without special tokens).
            num_positions: P (default mllm.num_positions); cfg_scale, temperature, top_k,
                top_p: default to the mllm section. cfg_scale 1 runs no unconditional rows.
                The unconditional prompt is mllm.tokens.uncond_prompt_ids, as in training.

        Returns:
            (pixel codes [B, P, R], semantic codes [B, P, R]) int64, ready for the tokenizer's decoder.
        """
        c = self.cfg
        num_positions = c.num_positions if num_positions is None else num_positions
        cfg_scale = c.cfg_scale if cfg_scale is None else cfg_scale
        sampling = dict(temperature=c.temperature if temperature is None else temperature,
                        top_k=c.top_k if top_k is None else top_k, top_p=c.top_p if top_p is None else top_p,
                        generator=generator)
        if not prompts:
            raise ValueError("prompts is empty: pass at least one caption")
        rows = [self.generation_prefix(p) for p in prompts]
        self._check_context(max(len(r) for r in rows) + num_positions, "a prompt plus the image")
        guided = cfg_scale != 1.0
        b = len(rows)
        if guided:
            rows += [self.generation_prefix(c.tokens.uncond_prompt_ids)] * b
        device = next(self.parameters()).device
        ids, mask = _left_pad(rows, c.tokens.pad_id, device)
        cache = self.new_kv_cache()
        h = self.hidden_states(ids, kv_cache=cache, attention_mask=mask)[:, -1]  # [B or 2B, D]
        pixel, semantic = [], []
        for i in range(num_positions):
            px, sm = self.sample_visual_codes(h[:b], h[b:] if guided else None, cfg_scale, **sampling)
            pixel.append(px)
            semantic.append(sm)
            if i + 1 < num_positions:
                both = (torch.cat([px, px]), torch.cat([sm, sm])) if guided else (px, sm)
                x = self.visual_embed(*both)[:, None]  # [rows, 1, D]
                h = self.lm.backbone(inputs_embeds=x, kv_cache=cache)[:, -1]
        return torch.stack(pixel, dim=1), torch.stack(semantic, dim=1)

    def understanding_prefix(self, num_images: int, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[bos] [image_start] <P visual> [image_end]: the captioning prompt of the loader's layout.

        Returns:
            (input_ids int64 [num_images, L], modality_mask bool [num_images, L]), on CPU.
        """
        t = self.cfg.tokens
        bos = [t.bos_id] if t.bos_id is not None else []
        placeholder = t.pad_id if t.visual_placeholder_id is None else t.visual_placeholder_id
        ids = bos + [t.image_start_id] + [placeholder] * num_positions + [t.image_end_id]
        mask = [False] * (len(bos) + 1) + [True] * num_positions + [False]
        return (torch.tensor([ids] * num_images, dtype=torch.long),
                torch.tensor([mask] * num_images, dtype=torch.bool))

    @torch.no_grad()
    def generate_text(self, input_ids: torch.Tensor, max_new_tokens: int, pixel_codes=None, semantic_codes=None,
                      modality_mask=None, attention_mask=None, stop_id: Optional[int] = None,
                      temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Continue (multimodal) prompts with text, using a backbone KV cache.

        Args:
            input_ids, pixel_codes, semantic_codes, modality_mask: the prompt as in `embed_inputs`
                (e.g. from `understanding_prefix`, codes scattered to its visual positions).
            attention_mask: bool [B, T], False on left padding.
            stop_id: a row stops after emitting it (default mllm.tokens.eos_id).
            temperature 0: greedy.

        Returns:
            int64 [B, n] new ids (n <= max_new_tokens); a row that stopped early is filled
            with mllm.tokens.pad_id after its stop id.
        """
        stop_id = self.cfg.tokens.eos_id if stop_id is None else stop_id
        self._check_context(input_ids.shape[1] + max_new_tokens, "the prompt plus max_new_tokens")
        cache = self.new_kv_cache()
        h = self.hidden_states(input_ids, pixel_codes, semantic_codes, modality_mask, kv_cache=cache,
                               attention_mask=attention_mask)[:, -1]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new = []
        for _ in range(max_new_tokens):
            nxt = self.next_text_token(h, temperature, top_k, top_p, generator)
            nxt = nxt.masked_fill(done, self.cfg.tokens.pad_id)
            new.append(nxt)
            done |= nxt == stop_id
            if bool(done.all()):
                break
            h = self.lm.backbone(nxt[:, None], kv_cache=cache)[:, -1]
        return torch.stack(new, dim=1) if new else input_ids.new_zeros((input_ids.shape[0], 0))


def compute_losses(hidden: torch.Tensor, batch: dict, lm_head, pixel_head: DepthHead, semantic_head: DepthHead,
                   visual_loss_weight: float, tp_group: ProcessGroup = None) -> MLLMLosses:
    """The unified loss (module docstring) from final hidden states [B, T, D].

    Args:
        lm_head: maps [N, D] to this rank's text logits [N, V/p] (the model's lm_head, or a
            pipeline stage's tied embedding projection).
        batch: needs labels, pixel_labels, semantic_labels (and optionally loss_mask).
    """
    labels, pixel_labels, semantic_labels = batch["labels"], batch["pixel_labels"], batch["semantic_labels"]
    text_mask = labels != IGNORE_INDEX  # [B, T]
    visual_mask = pixel_labels[..., 0] != IGNORE_INDEX  # code targets come as whole [R] rows
    if "loss_mask" in batch:
        text_mask = text_mask & batch["loss_mask"]
        visual_mask = visual_mask & batch["loss_mask"]

    text_logits = lm_head(hidden[text_mask])  # [Nt, V/p]
    text_nll = vocab_parallel_cross_entropy(text_logits, labels[text_mask], tp_group)  # [Nt]

    h_visual = hidden[visual_mask]  # [Nv, D]
    branch_nll = []
    for head, targets in ((pixel_head, pixel_labels), (semantic_head, semantic_labels)):
        codes = targets[visual_mask]  # [Nv, R]
        logits = head(h_visual, codes)  # [Nv, R, K]
        nll = F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten(), reduction="none")
        branch_nll.append(nll.view(codes.shape))  # [Nv, R]
    pixel_nll, semantic_nll = branch_nll
    visual_nll = 0.5 * (pixel_nll.mean(dim=1) + semantic_nll.mean(dim=1))  # [Nv]: one term per position

    num_text = text_mask.sum()
    num_visual = visual_mask.sum()
    loss = (text_nll.sum() + visual_loss_weight * visual_nll.sum()) / (num_text + num_visual).clamp(min=1)
    with torch.no_grad():
        nt, nv = num_text.clamp(min=1), num_visual.clamp(min=1)
        return MLLMLosses(
            loss=loss,
            text_loss=text_nll.sum() / nt,
            visual_loss=visual_nll.sum() / nv,
            pixel_loss=pixel_nll.mean(dim=1).sum() / nv,
            semantic_loss=semantic_nll.mean(dim=1).sum() / nv,
            num_text_targets=num_text,
            num_visual_targets=num_visual,
        )


def apply_trainable_stage(model: DualTokenMLLM, stage: str) -> dict[str, int]:
    """Set `requires_grad` for one of the paper's training stages.

    Args:
        model: a `DualTokenMLLM` (or any module with the children named in TRAINABLE_PARTS).
        stage: "projector" (1: visual embedding only), "projector_llm" (2: + backbone, embeddings
            and lm_head), "heads" (3: backbone frozen; visual embedding + both heads), "all" (4).

    Returns:
        Trainable parameter count per part ({"visual_embed": n, "lm": 0, ...}).
    """
    if stage not in TRAINABLE_PARTS:
        raise ValueError(f"trainable stage {stage!r} is not one of {list(TRAINABLE_PARTS)} (mllm.trainable_stage)")
    trainable = set(TRAINABLE_PARTS[stage])
    counts = {}
    for name in TRAINABLE_PARTS["all"]:
        part = getattr(model, name)
        for p in part.parameters():
            p.requires_grad_(name in trainable)
        counts[name] = sum(p.numel() for p in part.parameters() if p.requires_grad)
    return counts
