"""Unified DualToken MLLM on the debug model: training tokens/s, where a step's time goes,
and generation images/s and captions/s, each against a baseline in the same run.

    .venv/bin/python benchmarks/mllm.py                          # configs/debug/mllm.yaml, CPU, 1 thread
    .venv/bin/python benchmarks/mllm.py --threads 2 --repeats 20
    .venv/bin/python benchmarks/mllm.py --device cuda --dtype bf16   # on a GPU (skips cleanly without one)

Data: token shards of synthetic scenes (tests/train/mm_fixtures.py) read back through the
real `PackedMultimodalLoader`, so batches have the trainer's shape (loader.batch_size rows
of loader.seq_len tokens, understanding and generation sequences packed, cu_seqlens).
Tokens/s counts every row token, padding included, as the trainer's tokens_per_step does.
A training step is zero_grad + forward + backward + grad-norm clip + AdamW step (the
trainer's recipe: decay on matrices only, optim.grad_clip), in --dtype (bf16: weights cast
to bf16, as DeepSpeed's bf16 mode runs forward and backward; its fp32 master copy is not
modelled).

Table 1, training (tokens/s, ratio vs the baseline row):
- backbone alone (baseline): the same Qwen2 (megadual, same seed) as a text-only LM step on
  the same packed batches: next-token loss over every non-padding token.
- transformers Qwen2ForCausalLM: the same sizes, each row one causal sequence (no packing).
- DualTokenMLLM step: `forward(batch)` with the visual embedding and both depth heads.

Table 2, share of the DualTokenMLLM step time, measured inside the real step (module hooks
mark where each part's forward and backward start and end; see StepTimeline): the visual
embedding of the visual positions, the backbone decoder (input embeddings to final norm),
the text head (lm_head on text targets), the pixel and the semantic depth head (teacher
forcing on visual targets), the optimizer (clip + AdamW step), and "rest", the step minus
the parts (zero_grad, token lookup, the scatter of visual embeddings, target gathers, the
cross entropies and loss arithmetic). Medians per part over the timed steps, which run
interleaved with table 1's; the hooks add a few autograd nodes, so the instrumented step
runs a little slower than table 1's.
"FLOP share": each part's matmul + attention FLOPs (torch's FlopCounterMode, forward +
backward, the part run alone on the same inputs) over the whole step's; a part whose time
share is far above its FLOP share is bound by per-op overhead rather than arithmetic.

Table 3, generation (batched, sampling settings of the mllm section, seeded):
- `generate_image_codes` with CFG scale 3 (conditional + unconditional rows) and without
  (scale 1), images/s; baseline: the same loop without the KV cache, recomputing the whole
  left-padded prefix for every visual position.
- captioning: `generate_text` after `understanding_prefix` (image codes in, a fixed number of
  new tokens out), captions/s; baseline: a full forward over prefix + tokens so far per token.
A line after the table says whether both paths pick the same greedy codes/tokens.

Times are medians over --repeats runs (--gen-repeats for table 3) after --warmup runs; the
cases of a table run interleaved (a, b, c, a, b, c, ...; table 2's steps with table 1's) so
load from other processes hits them alike. Absolute times swing with such load; compare
rows of one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(REPO, "configs", "debug", "mllm.yaml")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def interleaved_medians(cases: dict[str, Callable[[int], None]], warmup: int, repeats: int,
                        sync: Callable[[], None]) -> dict[str, float]:
    """Median seconds of each case; case(i) runs repeat i (e.g. to pick the i-th batch)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(warmup + repeats):
        for name, run in cases.items():
            sync()
            start = time.perf_counter()
            run(i)
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def adamw(model, optim_cfg):
    """The trainer's optimizer: weight decay on matrices only."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim_cfg.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=optim_cfg.lr, betas=optim_cfg.betas, eps=optim_cfg.eps,
    )


def loader_batches(cfg, count: int, device) -> list[dict]:
    """`count` batches of the real loader over freshly written scene token shards."""
    import torch

    from megadual.data.mm_sequence import SpecialTokens
    from megadual.data.packed_loader import PackedMultimodalLoader
    from tests.train.mm_fixtures import write_scene_token_shards

    m = cfg.mllm
    with tempfile.TemporaryDirectory() as shards:
        write_scene_token_shards(shards, num_samples=max(64, 8 * count * cfg.loader.batch_size),
                                 num_positions=m.num_positions, depth=m.depth, codebook=m.pixel_codebook_size)
        loader_cfg = type(cfg.loader)(**{**asdict(cfg.loader), "paths": [shards], "num_workers": 0})
        loader = PackedMultimodalLoader(loader_cfg, SpecialTokens(**asdict(m.tokens)))
        try:
            batches = [next(loader) for _ in range(count)]
        finally:
            loader.close()
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]


def next_token_labels(batch: dict, pad_id: int, ignore_index: int):
    """Text-only LM targets of a packed batch: the next token wherever it is not padding.

    Sequence boundaries inside a row are ignored (one more target per boundary): the cost
    of the step does not depend on which tokens are targets."""
    import torch

    ids = batch["input_ids"]
    labels = torch.full_like(ids, ignore_index)
    labels[:, :-1] = ids[:, 1:].masked_fill(ids[:, 1:] == pad_id, ignore_index)
    return labels


# ---------------------------------------------------------------------------------------- training

OPTIMIZER = "optimizer (clip + AdamW step)"
REST = "rest (zero_grad, token lookup, gathers, loss)"
HEADS = "both depth heads (pixel + semantic)"
STEP = "full DualTokenMLLM step"


class StepTimeline:
    """Forward and backward time of each part of a DualTokenMLLM step, recorded by module
    hooks inside the real step.

    Autograd runs one backward node at a time, the most recent forward op first, so each
    part's backward is one interval: from the hook that sees its output gradient to the one
    that sees its input gradient (semantic head, pixel head, text head, backbone, visual
    embedding, in that order). The visual embedding's inputs are integer codes, so no module
    hook sees the end of its backward; its code tables' gradients are its last work.
    """

    PARTS = {
        "visual embedding (both code MLPs)": "visual_embed",
        "backbone decoder (layers + final norm)": "lm.backbone",
        "text head (lm_head on text targets)": "lm.lm_head",
        "pixel depth head": "pixel_head",
        "semantic depth head": "semantic_head",
    }

    def __init__(self, model, sync: Callable[[], None]):
        self.sync, self.marks, self.handles = sync, {}, []
        for part, path in self.PARTS.items():
            module = model.get_submodule(path)
            self.handles += [module.register_forward_pre_hook(self._mark(part, "forward", "start")),
                             module.register_forward_hook(self._mark(part, "forward", "end"))]
            if module is not model.visual_embed:
                self.handles += [module.register_full_backward_pre_hook(self._mark(part, "backward", "start")),
                                 module.register_full_backward_hook(self._mark(part, "backward", "end"))]
        visual = next(p for p, path in self.PARTS.items() if path == "visual_embed")
        start_backward = self._mark(visual, "backward", "start")

        def watch_output_gradient(_module, _inputs, output):  # returns None: the output stays as it is
            output.register_hook(start_backward)
        # (A full backward hook on a module without differentiable inputs fires early and warns.)
        self.handles.append(model.visual_embed.register_forward_hook(watch_output_gradient))
        for table in (model.visual_embed.pixel.codebook, model.visual_embed.semantic.codebook):
            # The later of the two marks wins: both tables' gradients are then in place.
            self.handles.append(table.register_post_accumulate_grad_hook(self._mark(visual, "backward", "end")))

    def _mark(self, part: str, phase: str, edge: str):
        def hook(*_):
            self.sync()
            self.marks[part, phase, edge] = time.perf_counter()
        return hook

    def part_seconds(self) -> dict[str, float]:
        """Seconds per part (forward + backward) of the step that ran last."""
        return {part: sum(self.marks[part, phase, "end"] - self.marks[part, phase, "start"]
                          for phase in ("forward", "backward"))
                for part in self.PARTS}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def training_table(cfg, batches, device, dtype, warmup, repeats, sync):
    """Rows of tables 1 and 2, [(case, ms, tokens/s, ratio vs baseline)] and
    [(part, ms, time share, FLOP share)], and the trained model (for table 3)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from megadual.distributed.tensor_parallel import vocab_parallel_cross_entropy
    from megadual.models.mllm import IGNORE_INDEX, DualTokenMLLM, apply_trainable_stage
    from megadual.models.qwen2 import Qwen2ForCausalLM

    from transformers import Qwen2Config  # noqa: I001  (after megadual: see benchmarks/backbone.py)
    from transformers import Qwen2ForCausalLM as HFQwen2ForCausalLM

    bb, optim_cfg, clip = cfg.backbone, cfg.optim, cfg.optim.grad_clip
    mllm = DualTokenMLLM(bb, cfg.mllm, seed=cfg.run.seed).to(device, dtype).train()
    apply_trainable_stage(mllm, cfg.mllm.trainable_stage)
    lm = Qwen2ForCausalLM(bb, seed=cfg.run.seed).to(device, dtype).train()
    hf = HFQwen2ForCausalLM(Qwen2Config(
        vocab_size=bb.vocab_size, hidden_size=bb.hidden_size, intermediate_size=bb.intermediate_size,
        num_hidden_layers=bb.num_layers, num_attention_heads=bb.num_heads, num_key_value_heads=bb.num_kv_heads,
        rope_theta=bb.rope_theta, rms_norm_eps=bb.rms_norm_eps, max_position_embeddings=bb.max_position_embeddings,
        tie_word_embeddings=bb.tie_embeddings, use_cache=False, attn_implementation="sdpa",
    )).to(device, dtype).train()
    labels = [next_token_labels(b, cfg.mllm.tokens.pad_id, IGNORE_INDEX) for b in batches]
    pick = lambda i: batches[i % len(batches)]  # noqa: E731

    def step(model, optimizer, loss_fn):
        def run(i):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(i).backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        return run

    def lm_step_loss(i):  # the LM trainer's loss (train/engine.py lm_loss)
        b, target = pick(i), labels[i % len(batches)]
        nll = vocab_parallel_cross_entropy(lm(b["input_ids"], b["position_ids"], b["cu_seqlens"]), target)
        return nll.sum() / (target != IGNORE_INDEX).sum().clamp(min=1)

    def hf_step_loss(i):
        logits = hf(input_ids=pick(i)["input_ids"]).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels[i % len(batches)].flatten(),
                               ignore_index=IGNORE_INDEX)

    # Table 2, times: the parts of the real step, measured inside it by module hooks. The
    # instrumented step runs interleaved with table 1's cases; its own total is not a row there.
    per_step: dict[str, list[float]] = {}

    def instrumented_step(i):
        timeline = StepTimeline(mllm, sync)
        sync()
        start = time.perf_counter()
        mllm_opt.zero_grad(set_to_none=True)
        mllm(pick(i)).loss.backward()
        sync()
        optimizer_start = time.perf_counter()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(mllm.parameters(), clip)
        mllm_opt.step()
        sync()
        end = time.perf_counter()
        timeline.remove()
        if i >= warmup:
            parts = timeline.part_seconds()
            parts[OPTIMIZER] = end - optimizer_start
            parts[REST] = (end - start) - sum(parts.values())
            parts[HEADS] = parts["pixel depth head"] + parts["semantic depth head"]
            parts[STEP] = end - start
            for name, seconds in parts.items():
                per_step.setdefault(name, []).append(seconds)

    mllm_opt = adamw(mllm, optim_cfg)
    cases = {
        "backbone alone: text-only LM step (baseline)": step(lm, adamw(lm, optim_cfg), lm_step_loss),
        "transformers Qwen2ForCausalLM: text-only LM step": step(hf, adamw(hf, optim_cfg), hf_step_loss),
        "DualTokenMLLM step (embed + backbone + heads)": step(mllm, mllm_opt, lambda i: mllm(pick(i)).loss),
        "instrumented": instrumented_step,
    }
    medians = interleaved_medians(cases, warmup, repeats, sync)
    del medians["instrumented"]
    tokens = batches[0]["input_ids"].numel()
    base = medians["backbone alone: text-only LM step (baseline)"]
    speed_rows = [(name, s * 1e3, f"{tokens / s:.0f}", f"{base / s:.2f}x") for name, s in medians.items()]
    medians = {name: statistics.median(values) for name, values in per_step.items()}

    # Table 2, FLOPs: matmul + attention FLOPs (forward + backward) of each part run alone
    # from detached copies of its inputs in the step; they tell whether a part's time share
    # follows its arithmetic or its per-op overhead.
    b = pick(0)
    with torch.no_grad():
        embeds = mllm.embed_inputs(b["input_ids"], b["pixel_codes"], b["semantic_codes"], b["modality_mask"])
        hidden = mllm.lm.backbone(None, b["position_ids"], b["cu_seqlens"], embeds)
    text_mask = (b["labels"] != IGNORE_INDEX) & b["loss_mask"]
    visual_mask = (b["pixel_labels"][..., 0] != IGNORE_INDEX) & b["loss_mask"]
    leaf = lambda t: t.detach().requires_grad_()  # noqa: E731

    def depth_head_loss(head, targets):
        codes = targets[visual_mask]
        return F.cross_entropy(head(leaf(hidden[visual_mask]), codes).flatten(0, 1).float(), codes.flatten())

    alone = {
        "visual embedding (both code MLPs)":
            lambda: mllm.visual_embed(*(b[k][b["modality_mask"]] for k in ("pixel_codes", "semantic_codes"))).sum(),
        "backbone decoder (layers + final norm)":
            lambda: mllm.lm.backbone(None, b["position_ids"], b["cu_seqlens"], leaf(embeds)).sum(),
        "text head (lm_head on text targets)": lambda: vocab_parallel_cross_entropy(
            mllm.lm.lm_head(leaf(hidden[text_mask])), b["labels"][text_mask]).sum(),
        "pixel depth head": lambda: depth_head_loss(mllm.pixel_head, b["pixel_labels"]),
        "semantic depth head": lambda: depth_head_loss(mllm.semantic_head, b["semantic_labels"]),
        STEP: lambda: mllm(b).loss,
    }
    flops = {}
    for name, loss in alone.items():
        with FlopCounterMode(display=False) as counter:
            loss().backward()
        flops[name] = counter.get_total_flops()
    mllm_opt.zero_grad(set_to_none=True)
    flops[HEADS] = flops["pixel depth head"] + flops["semantic depth head"]
    share_rows = [(name, medians[name] * 1e3, f"{100 * medians[name] / medians[STEP]:.1f}%",
                   f"{100 * flops[name] / flops[STEP]:.1f}%" if name in flops else "-")
                  for name in (*StepTimeline.PARTS, OPTIMIZER, REST, HEADS, STEP)]
    return speed_rows, share_rows, mllm


# ---------------------------------------------------------------------------------------- generation


def image_codes_without_cache(model, prompts, cfg_scale, temperature, top_k, top_p, generator):
    """`generate_image_codes` without the KV cache: every visual position re-runs the whole
    (left-padded) prefix plus the positions generated so far. The prefill of a fresh cache is
    the backbone path that takes a left-padding mask, so it does the recomputation."""
    import torch

    t = model.cfg.tokens
    rows = [model.generation_prefix(p) for p in prompts]
    b, guided = len(rows), cfg_scale != 1.0
    if guided:
        rows += [model.generation_prefix(t.uncond_prompt_ids)] * b
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.tensor([[t.pad_id] * (width - len(r)) + r for r in rows], device=device)
    real = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], device=device)
    n, depth = ids.shape[0], model.cfg.depth
    placeholder = t.pad_id if t.visual_placeholder_id is None else t.visual_placeholder_id
    pixel = torch.zeros(n, 0, depth, dtype=torch.long, device=device)
    semantic = torch.zeros_like(pixel)
    text_codes = torch.zeros(n, width, depth, dtype=torch.long, device=device)
    for i in range(model.cfg.num_positions):
        visual = torch.ones(n, i, dtype=torch.bool, device=device)
        h = model.hidden_states(
            torch.cat([ids, torch.full((n, i), placeholder, device=device)], dim=1),
            torch.cat([text_codes, pixel], dim=1), torch.cat([text_codes, semantic], dim=1),
            torch.cat([torch.zeros_like(real), visual], dim=1),
            kv_cache=model.new_kv_cache(), attention_mask=torch.cat([real, visual], dim=1),
        )[:, -1]
        px, sm = model.sample_visual_codes(h[:b], h[b:] if guided else None, cfg_scale, temperature, top_k, top_p,
                                           generator)
        if guided:
            px, sm = torch.cat([px, px]), torch.cat([sm, sm])
        pixel, semantic = torch.cat([pixel, px[:, None]], dim=1), torch.cat([semantic, sm[:, None]], dim=1)
    return pixel[:b], semantic[:b]


def text_without_cache(model, ids, pixel_codes, semantic_codes, modality_mask, new_tokens, temperature, generator):
    """`generate_text` for unpadded prompts without the KV cache: a full forward over the
    prompt and the tokens so far for every new token (fixed length, no stop id)."""
    import torch

    new = []
    for _ in range(new_tokens):
        extra = len(new)
        pad = torch.zeros(ids.shape[0], extra, pixel_codes.shape[-1], dtype=torch.long, device=ids.device)
        full = torch.cat([ids, torch.stack(new, dim=1)], dim=1) if new else ids
        h = model.hidden_states(full, torch.cat([pixel_codes, pad], 1), torch.cat([semantic_codes, pad], 1),
                                torch.cat([modality_mask, torch.zeros_like(pad[..., 0], dtype=torch.bool)], 1))[:, -1]
        new.append(model.next_text_token(h, temperature, generator=generator))
    return torch.stack(new, dim=1)


def generation_table(model, cfg, batch_size, caption_tokens, device, warmup, repeats, sync):
    """Rows of table 3 [(case, ms, rate string, ratio)] and the greedy-agreement note."""
    import torch

    from megadual.data.scenes import describe, sample_scene
    from megadual.data.text_lm import ByteTokenizer

    m = cfg.mllm
    model.eval()
    text = ByteTokenizer()
    prompts = [text.encode(describe(sample_scene(1, i)), bos=False, eos=False) for i in range(batch_size)]
    g = torch.Generator(device=device).manual_seed(0)
    ids, mask = (x.to(device) for x in model.understanding_prefix(batch_size, m.num_positions))
    codes = [torch.zeros(*ids.shape, m.depth, dtype=torch.long, device=device) for _ in range(2)]
    for c, k in zip(codes, (m.pixel_codebook_size, m.semantic_codebook_size)):
        c[mask] = torch.randint(0, k, (int(mask.sum()), m.depth), generator=g, device=device)
    sampling = dict(temperature=m.temperature, top_k=m.top_k, top_p=m.top_p)
    never = cfg.backbone.vocab_size  # a stop id no row emits: every caption gets caption_tokens tokens
    seeded = lambda: torch.Generator(device=device).manual_seed(0)  # noqa: E731

    cases = {
        "images, CFG 3: no KV cache (baseline)":
            lambda i: image_codes_without_cache(model, prompts, 3.0, generator=seeded(), **sampling),
        "images, CFG 3: generate_image_codes (KV cache)":
            lambda i: model.generate_image_codes(prompts, cfg_scale=3.0, generator=seeded(), **sampling),
        "images, no CFG: no KV cache (baseline)":
            lambda i: image_codes_without_cache(model, prompts, 1.0, generator=seeded(), **sampling),
        "images, no CFG: generate_image_codes (KV cache)":
            lambda i: model.generate_image_codes(prompts, cfg_scale=1.0, generator=seeded(), **sampling),
        "captions: full forward per token (baseline)":
            lambda i: text_without_cache(model, ids, *codes, mask, caption_tokens, m.temperature, seeded()),
        "captions: generate_text (KV cache)":
            lambda i: model.generate_text(ids, caption_tokens, *codes, mask, stop_id=never,
                                          temperature=m.temperature, generator=seeded()),
    }
    with torch.no_grad():
        medians = interleaved_medians(cases, warmup, repeats, sync)
        # Greedy agreement: the baselines must compute what the cached paths compute.
        agree = [
            all(torch.equal(a, b) for a, b in zip(model.generate_image_codes(prompts, cfg_scale=3.0, temperature=0.0),
                                                    image_codes_without_cache(model, prompts, 3.0, 0.0, 0, 1.0, None))),
            torch.equal(model.generate_text(ids, caption_tokens, *codes, mask, stop_id=never),
                        text_without_cache(model, ids, *codes, mask, caption_tokens, 0.0, None)),
        ]
    rows, baseline = [], None
    for name, s in medians.items():
        unit = "captions/s" if name.startswith("captions") else "images/s"
        baseline = s if "baseline" in name else baseline
        rows.append((name, s * 1e3, f"{batch_size / s:.2f} {unit}", f"{baseline / s:.2f}x"))
    note = (f"greedy outputs of the baselines equal the cached paths: images (CFG 3) {agree[0]}, "
            f"captions {agree[1]}")
    return rows, note


# ---------------------------------------------------------------------------------------- main


def print_table(header: tuple[str, ...], rows: list[tuple], widths: tuple[int, ...]) -> None:
    """A Markdown table: first column left-aligned, the others right-aligned; floats to 0.1."""
    def line(cells):
        return "| " + " | ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line([f"{value:.1f}" if isinstance(value, float) else str(value) for value in row]))
    print()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEBUG, help="model config (default configs/debug/mllm.yaml)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: skipped when absent")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights and activations")
    parser.add_argument("--repeats", type=int, default=15, help="timed training steps per case (default 15)")
    parser.add_argument("--gen-repeats", type=int, default=3, help="timed generation calls per case (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before each case (default 2)")
    parser.add_argument("--batches", type=int, default=4, help="distinct loader batches cycled through (default 4)")
    parser.add_argument("--gen-batch", type=int, default=8, help="prompts / images per generation call (default 8)")
    parser.add_argument("--caption-tokens", type=int, default=48, help="new tokens per caption (default 48)")
    parser.add_argument("--json", metavar="PATH", help="also write the three tables as one JSON object to PATH")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available on this machine; nothing measured (skipped)")
        return 0
    device, dtype = torch.device(args.device), getattr(torch, DTYPES[args.dtype])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    from megadual.config import load_config

    cfg = load_config([args.config])
    batches = loader_batches(cfg, args.batches, device)
    b, t = batches[0]["input_ids"].shape
    padding = sum(float((x["input_ids"] == cfg.mllm.tokens.pad_id).float().mean()) for x in batches) / len(batches)
    visual = sum(float(x["modality_mask"].float().mean()) for x in batches) / len(batches)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"\nDualTokenMLLM, {os.path.relpath(args.config, REPO)}: hidden {cfg.backbone.hidden_size}, "
          f"{cfg.backbone.num_layers} layers; heads {cfg.mllm.head_layers} layers x depth {cfg.mllm.depth}; "
          f"{args.dtype}, {where}")
    print(f"batches: {b} rows x {t} tokens from the packed loader, {100 * visual:.0f}% visual positions, "
          f"{100 * padding:.0f}% padding; medians of {args.repeats} steps after {args.warmup} warm-up\n")

    speed_rows, share_rows, model = training_table(cfg, batches, device, dtype, args.warmup, args.repeats, sync)
    print_table(("training step (fwd + bwd + clip + AdamW)", "median ms", "tokens/s", "vs baseline"),
                speed_rows, (48, 9, 9, 11))
    print_table(("part of the DualTokenMLLM step (fwd + bwd)", "median ms", "time share", "FLOP share"),
                share_rows, (48, 9, 10, 10))
    gen_rows, note = generation_table(model, cfg, args.gen_batch, args.caption_tokens, device,
                                      min(args.warmup, 1), args.gen_repeats, sync)
    print(f"generation: {args.gen_batch} prompts per call, {cfg.mllm.num_positions} positions per image, "
          f"{args.caption_tokens} tokens per caption; medians of {args.gen_repeats} calls\n")
    print_table(("generation (batched)", "median ms", "rate", "vs baseline"), gen_rows, (48, 9, 18, 11))
    print(note)
    if args.json:
        from _common import write_json

        write_json(args.json, {
            "config": os.path.relpath(args.config, REPO), "device": where, "dtype": args.dtype,
            "tokens_per_step": b * t,
            "training": {name: {"median_ms": ms, "tokens_per_s": float(rate), "vs_baseline": float(ratio[:-1])}
                         for name, ms, rate, ratio in speed_rows},
            "step_share": {name: {"median_ms": ms, "time_share": float(share[:-1]) / 100}
                           for name, ms, share, _ in share_rows},
            "generation": {name: {"median_ms": ms, "rate": rate, "vs_baseline": float(ratio[:-1])}
                           for name, ms, rate, ratio in gen_rows},
            "note": note})
    return 0


if __name__ == "__main__":
    sys.exit(main())
