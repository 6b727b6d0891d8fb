"""Multimodal training sequences (understanding and generation) and their collation into batches.

Legend: B rows per batch, T tokens per row (seq_len), L tokens of one sequence,
V visual positions of one image, R residual depth.

Layouts ([...] are special ids from `SpecialTokens`, <v> the V visual positions):

    understanding:  [bos] [image_start] <v> [image_end] caption [eos]
    generation:     [bos] caption [generation_marker] [image_start] <v> [image_end] [eos]

`[bos]` and `[generation_marker]` appear only when their id is set. In a generation
sequence whose caption is dropped for classifier-free guidance the caption is replaced by
`SpecialTokens.uncond_prompt_ids` (often empty).

Targets: understanding trains the caption and eos (the image is context); generation trains
every visual position (the codes of the next position), image_end and eos (the caption is
the prompt). A position's target is always the *next* position's token or codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .token_shards import TokenSample

IGNORE_INDEX = -100  # the cross-entropy ignore value, for text and code targets
CODE_FILL = 0  # code input at text positions: a valid index, never read (modality_mask is False)

UNDERSTANDING, GENERATION = "understanding", "generation"


@dataclass(frozen=True)
class SpecialTokens:
    """Text-vocabulary ids the layouts need; the text tokenizer decides them, the caller fills them.

    Args:
        image_start_id, image_end_id: around the visual positions.
        eos_id: ends every sequence.
        pad_id: fills the tail of a row.
        generation_marker_id: before image_start in generation sequences (None: none).
        bos_id: first token of every sequence (None for Qwen, which has no BOS).
        visual_placeholder_id: the text id at visual positions (None: pad_id); the model
            replaces its embedding there, so it only has to be a valid id.
        uncond_prompt_ids: the caption of an unconditional (CFG-dropped) generation sample.
    """

    image_start_id: int
    image_end_id: int
    eos_id: int
    pad_id: int
    generation_marker_id: Optional[int] = None
    bos_id: Optional[int] = None
    visual_placeholder_id: Optional[int] = None
    uncond_prompt_ids: tuple[int, ...] = ()

    def __post_init__(self):
        named = {n: getattr(self, n) for n in ("image_start_id", "image_end_id", "eos_id", "pad_id")}
        named.update({n: getattr(self, n) for n in ("generation_marker_id", "bos_id", "visual_placeholder_id")
                      if getattr(self, n) is not None})
        for name, value in named.items():
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"SpecialTokens.{name} must be a non-negative token id, got {value!r}")
        if self.image_start_id == self.image_end_id:
            raise ValueError(
                f"SpecialTokens.image_start_id and image_end_id are both {self.image_start_id}; use two distinct ids"
            )

    @property
    def placeholder(self) -> int:
        return self.pad_id if self.visual_placeholder_id is None else self.visual_placeholder_id

    def overhead(self, task: str) -> int:
        """Special tokens a sequence of `task` adds around caption and image."""
        n = 3 + (self.bos_id is not None)  # image_start, image_end, eos
        return n + (task == GENERATION and self.generation_marker_id is not None)


@dataclass
class MMSequence:
    """One sample laid out as a training sequence.

    Shapes:
        input_ids: int64 [L] (visual positions hold the placeholder id);
        pixel_codes, semantic_codes: uint16 [V, R].

    `visual_start` is the index of the first visual position; tokens at [target_start, L)
    are trained. `meta` is a small tuple identifying the sample (for logs and tests).
    """

    input_ids: np.ndarray
    visual_start: int
    pixel_codes: np.ndarray
    semantic_codes: np.ndarray
    target_start: int
    meta: tuple

    def __len__(self) -> int:
        return len(self.input_ids)


def build_sequence(sample: TokenSample, task: str, drop_caption: bool, tokens: SpecialTokens, meta: tuple = ()) -> MMSequence:
    """Lay out `sample` for `task` ("understanding" or "generation").

    Args:
        drop_caption: generation only: use `tokens.uncond_prompt_ids` instead of the caption.

    Returns:
        The sequence with its visual span and first trained index.
    """
    num_visual = sample.pixel_codes.shape[0]
    bos = [tokens.bos_id] if tokens.bos_id is not None else []
    visual = [tokens.placeholder] * num_visual
    if task == UNDERSTANDING:
        ids = bos + [tokens.image_start_id] + visual + [tokens.image_end_id] + sample.text_ids.tolist() + [tokens.eos_id]
        visual_start = len(bos) + 1
        target_start = visual_start + num_visual + 1  # the first caption token
    elif task == GENERATION:
        prompt = list(tokens.uncond_prompt_ids) if drop_caption else sample.text_ids.tolist()
        marker = [tokens.generation_marker_id] if tokens.generation_marker_id is not None else []
        ids = bos + prompt + marker + [tokens.image_start_id] + visual + [tokens.image_end_id, tokens.eos_id]
        visual_start = len(bos) + len(prompt) + len(marker) + 1
        target_start = visual_start  # the first visual position, predicted from image_start
    else:
        raise ValueError(f"task must be {UNDERSTANDING!r} or {GENERATION!r}, got {task!r}")
    return MMSequence(
        input_ids=np.asarray(ids, dtype=np.int64),
        visual_start=visual_start,
        pixel_codes=sample.pixel_codes,
        semantic_codes=sample.semantic_codes,
        target_start=target_start,
        meta=meta,
    )


def collate_rows(rows: list[list[MMSequence]], seq_len: int, depth: int, tokens: SpecialTokens) -> dict:
    """Pack rows of sequences into one batch; the tail of each row is padding.

    Args:
        rows: B rows, each a list of sequences whose lengths sum to at most `seq_len`.
        depth: R, the residual depth of the codes.

    Returns:
        input_ids: int64 [B, T]; pad_id on padding, the placeholder at visual positions.
        pixel_codes, semantic_codes: int64 [B, T, R]; CODE_FILL at text positions.
        modality_mask: bool [B, T]; True at visual positions.
        labels: int64 [B, T]; next text token, IGNORE_INDEX where none is trained.
        pixel_labels, semantic_labels: int64 [B, T, R]; codes of the next visual position
            where that position is trained, IGNORE_INDEX elsewhere.
        loss_mask: bool [B, T]; positions with a text or a visual target.
        position_ids: int64 [B, T]; restart at 0 for every sequence and for the padding.
        cu_seqlens: int64 [num_segments + 1]; segment offsets over the B*T flattened tokens
            (the padding of a row is its own segment, so no sequence attends to it).
        samples: B lists of each sequence's `meta`.
    """
    b = len(rows)
    input_ids = np.full((b, seq_len), tokens.pad_id, dtype=np.int64)
    codes = np.full((2, b, seq_len, depth), CODE_FILL, dtype=np.int64)  # pixel, semantic
    code_labels = np.full((2, b, seq_len, depth), IGNORE_INDEX, dtype=np.int64)
    modality = np.zeros((b, seq_len), dtype=bool)
    labels = np.full((b, seq_len), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((b, seq_len), dtype=np.int64)
    offsets = [0]
    for r, row in enumerate(rows):
        o = 0
        for seq in row:
            n, v0, nv = len(seq), seq.visual_start, seq.pixel_codes.shape[0]
            if o + n > seq_len:
                raise ValueError(f"row {r} holds {o + n} tokens, more than seq_len={seq_len}")
            input_ids[r, o : o + n] = seq.input_ids
            position_ids[r, o : o + n] = np.arange(n)
            vs = slice(o + v0, o + v0 + nv)
            modality[r, vs] = True
            codes[0, r, vs] = seq.pixel_codes
            codes[1, r, vs] = seq.semantic_codes
            # Position j predicts token j + 1; trained predictions are j in [ts - 1, n - 1).
            ts = seq.target_start
            labels[r, o + ts - 1 : o + n - 1] = seq.input_ids[ts:n]
            # Predictions whose target is a visual position get codes, not a text label.
            first = max(ts, v0)  # first trained visual target (index in the sequence)
            if first < v0 + nv:
                labels[r, o + first - 1 : o + v0 + nv - 1] = IGNORE_INDEX
                code_labels[0, r, o + first - 1 : o + v0 + nv - 1] = seq.pixel_codes[first - v0 :]
                code_labels[1, r, o + first - 1 : o + v0 + nv - 1] = seq.semantic_codes[first - v0 :]
            o += n
            offsets.append(r * seq_len + o)
        if o < seq_len:
            position_ids[r, o:] = np.arange(seq_len - o)
            offsets.append((r + 1) * seq_len)
    loss_mask = (labels != IGNORE_INDEX) | (code_labels[0, :, :, 0] != IGNORE_INDEX)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "pixel_codes": torch.from_numpy(codes[0]),
        "semantic_codes": torch.from_numpy(codes[1]),
        "modality_mask": torch.from_numpy(modality),
        "labels": torch.from_numpy(labels),
        "pixel_labels": torch.from_numpy(code_labels[0]),
        "semantic_labels": torch.from_numpy(code_labels[1]),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids),
        "cu_seqlens": torch.tensor(offsets, dtype=torch.int64),
        "samples": [[seq.meta for seq in row] for row in rows],
    }
