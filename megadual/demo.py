"""The embedded end-to-end run (`megadual demo`, README's `make demo`).

Today it trains the debug Qwen2 backbone on the synthetic scene captions, on 2 ranks
started by the `deepspeed` launcher (data parallel, ZeRO-1), and checks what it learned
against the scene grammar on held-out scenes. Later stages (tokenizer,
token extraction, the unified model) join it as they land. A finished stage is reused on
rerun unless `force` is set.

Report (report.md in the run directory):
- prefix completion: held-out captions cut after "a <size> <colour>"; the completion must
  make a caption that parses and keeps the given size and colour;
- free generation: sampled captions from nothing; the share that parse, and the share of
  those that never occur in the training set.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass

import torch

from megadual.config import Config, load_config
from megadual.data.scenes import parse_caption, sample_scene
from megadual.data.text_lm import ByteTokenizer, load_documents
from megadual.inference.text import complete
from megadual.models.qwen2 import Qwen2ForCausalLM
from megadual.train.checkpoint import load_model_state
from megadual.launch import run_deepspeed
from megadual.train.lm import latest_step

logger = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = "configs/debug/lm.yaml"
# Held-out scenes come from a different seed than training, so no held-out caption is a
# training caption by construction of its index stream (a few may coincide by chance).
HELD_OUT_SEED_OFFSET = 1_000_003


@dataclass
class LanguageCheck:
    prefix_total: int
    prefix_correct: int
    free_total: int
    free_parsed: int
    free_novel: int
    samples: list[tuple[str, str]]


def resolve_config_path(path: str) -> str:
    """`path` as given, else relative to the repository (an editable install run elsewhere)."""
    if os.path.isfile(path) or os.path.isabs(path):
        return path
    candidate = os.path.join(REPO_ROOT, path)
    return candidate if os.path.isfile(candidate) else path


def check_language(model: Qwen2ForCausalLM, cfg: Config, num_prompts: int, num_free: int) -> LanguageCheck:
    """Judge the trained LM's captions with the scene grammar (see module docstring)."""
    tokenizer = ByteTokenizer()
    model.eval()
    max_new = cfg.train.seq_len
    samples: list[tuple[str, str]] = []
    correct = 0
    for i in range(num_prompts):
        scene = sample_scene(cfg.run.seed + HELD_OUT_SEED_OFFSET, i)
        prefix = f"a {scene.size} {scene.colour}"
        new = complete(model, tokenizer.encode(prefix, eos=False), max_new, tokenizer.eos_id)
        text = prefix + tokenizer.decode(new)
        parsed = parse_caption(text)
        correct += parsed is not None and parsed.size == scene.size and parsed.colour == scene.colour
        if i < 5:
            samples.append((prefix, text))

    training = set(load_documents(cfg.data, cfg.run.seed))
    generator = torch.Generator().manual_seed(cfg.run.seed)
    parsed_count = novel = 0
    for i in range(num_free):
        new = complete(model, [tokenizer.bos_id], max_new, tokenizer.eos_id, temperature=0.8, generator=generator)
        text = tokenizer.decode(new)
        if parse_caption(text) is not None:
            parsed_count += 1
            novel += text not in training
        if i < 5:
            samples.append(("<free>", text))
    return LanguageCheck(num_prompts, correct, num_free, parsed_count, novel, samples)


def _write_report(path: str, cfg: Config, metrics: list[dict], check: LanguageCheck, wall: float) -> None:
    tokens = sum(m["tokens"] for m in metrics)
    train_time = sum(m["step_time"] for m in metrics)
    lines = [
        "# MegaDual demo run",
        "",
        "## Stage: backbone language model on the synthetic scene captions",
        "",
        f"- model: Qwen2, {cfg.backbone.num_layers} layers, hidden {cfg.backbone.hidden_size}, "
        f"{cfg.backbone.num_heads}/{cfg.backbone.num_kv_heads} heads, vocab {cfg.backbone.vocab_size}",
        f"- layout: {DEMO_RANKS} ranks from the `deepspeed` launcher, {', '.join(DEMO_LAYOUT)}",
        f"- steps: {len(metrics)}, tokens: {tokens}, training time: {train_time:.1f} s "
        f"({tokens / max(train_time, 1e-9):.0f} tokens/s)",
        f"- loss: {metrics[0]['loss']:.3f} at step 1 -> {metrics[-1]['loss']:.3f} at step {metrics[-1]['step']}",
        f"- held-out prefix completion, caption parses and keeps size and colour: "
        f"{check.prefix_correct}/{check.prefix_total} ({100 * check.prefix_correct / check.prefix_total:.0f}%)",
        f"- free sampling (temperature 0.8), caption parses: {check.free_parsed}/{check.free_total} "
        f"({100 * check.free_parsed / check.free_total:.0f}%), of which not in the training set: {check.free_novel}",
        f"- wall time of this invocation: {wall:.1f} s",
        "",
        "## Samples",
        "",
        *[f"- `{prompt}` -> `{text}`" for prompt, text in check.samples],
        "",
    ]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


# The training stage's layout: 2 data-parallel ranks with ZeRO-1 (optimizer states split).
DEMO_RANKS = 2
DEMO_LAYOUT = ("parallel.tp=1", "parallel.pp=1", "parallel.zero_stage=1")
STAGE_TIMEOUT_S = 1800


def run_demo(out_dir: str, config_path: str = DEFAULT_CONFIG, overrides: tuple[str, ...] = (),
             quick: bool = False, force: bool = False) -> dict:
    """Run every stage that exists, reusing finished ones; returns the report's figures."""
    started = time.perf_counter()
    config_path = resolve_config_path(config_path)
    lm_dir = os.path.join(out_dir, "lm")
    all_overrides = [*DEMO_LAYOUT, *(["train.steps=30", "data.num_samples=512"] if quick else []), *overrides,
                     f"run.out_dir={lm_dir}"]
    cfg = load_config(config_path, all_overrides)
    if force and os.path.isdir(lm_dir):
        shutil.rmtree(lm_dir)

    if latest_step(lm_dir) == cfg.train.steps:
        logger.info("stage 1/1: backbone language model: finished earlier, reusing %s", lm_dir)
    else:
        logger.info("stage 1/1: backbone language model on %d ranks -> %s", DEMO_RANKS, lm_dir)
        os.makedirs(lm_dir, exist_ok=True)
        args = ["train-lm", "--config", config_path, *[a for o in all_overrides for a in ("--set", o)], "--resume"]
        run_deepspeed(DEMO_RANKS, args, timeout=STAGE_TIMEOUT_S, log_path=os.path.join(lm_dir, "launch.log"))
    model = Qwen2ForCausalLM(cfg.backbone)
    model.load_state_dict(load_model_state(cfg.run.out_dir))
    check = check_language(model, cfg, num_prompts=10 if quick else 50, num_free=10 if quick else 50)

    with open(os.path.join(cfg.run.out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        metrics = [json.loads(line) for line in f]
    # A resumed run appends; keep the last record of each step.
    metrics = list({m["step"]: m for m in metrics}.values())
    report = os.path.join(out_dir, "report.md")
    _write_report(report, cfg, metrics, check, time.perf_counter() - started)
    figures = {
        "report": report,
        "first_loss": metrics[0]["loss"],
        "last_loss": metrics[-1]["loss"],
        "prefix_accuracy": check.prefix_correct / check.prefix_total,
        "free_parse_rate": check.free_parsed / check.free_total,
    }
    return figures


def main(args) -> int:
    """`megadual demo`: run the embedded end-to-end job and print where the report is."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    figures = run_demo(args.out, args.config, tuple(args.overrides), quick=args.quick, force=args.force)
    print(open(figures["report"], encoding="utf-8").read())
    print(f"report: {figures['report']}")
    return 0
