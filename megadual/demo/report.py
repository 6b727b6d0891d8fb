"""The demo's report: report.md in the run directory, with the stages' PNGs beside it.

Every figure in the report comes from a stage's `stage.json` (written when the stage ran), so a
rerun that reuses stages reports the same numbers it measured the first time.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from PIL import Image

from .stages import StageRecord

# The targets, checked in the report.
TARGETS = {"psnr": 24.0, "generation_accuracy": 0.80, "caption_accuracy": 0.90}
_SCALE = 4  # 32 px images are drawn 4x larger
_PAD = 3


def save_judged_grid(columns: Sequence[tuple[Image.Image, ...]], correct: Optional[Sequence[bool]], path: str,
                     per_row: int = 16) -> None:
    """Images in a grid, one column entry per item (e.g. original above reconstruction).

    With `correct`, each item gets a green (right) or red (wrong) frame.
    """
    if not columns:
        return
    w, h = columns[0][0].width * _SCALE, columns[0][0].height * _SCALE
    rows_per_item = len(columns[0])
    cell_w, cell_h = w + 2 * _PAD, rows_per_item * h + 2 * _PAD
    n_rows = (len(columns) + per_row - 1) // per_row
    grid = Image.new("RGB", (min(per_row, len(columns)) * cell_w, n_rows * cell_h), (128, 128, 128))
    for i, images in enumerate(columns):
        x, y = (i % per_row) * cell_w, (i // per_row) * cell_h
        if correct is not None:
            frame = (40, 170, 60) if correct[i] else (220, 40, 40)
            grid.paste(Image.new("RGB", (cell_w, cell_h), frame), (x, y))
        for k, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((w, h), Image.NEAREST), (x + _PAD, y + _PAD + k * h))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)


def _verdict(value: float, target: float) -> str:
    return "hit" if value >= target else f"miss by {target - value:.3g}"


def _target_row(measure: str, shown: str, value: float, key: str, target_shown: str) -> str:
    return f"| {measure} | {shown} | >= {target_shown} | {_verdict(value, TARGETS[key])} |"


def _rel(out_dir: str, path: str) -> str:
    return os.path.relpath(path, out_dir)


def _latest_png(directory: str, suffix: str) -> Optional[str]:
    if not os.path.isdir(directory):
        return None
    names = sorted(n for n in os.listdir(directory) if n.endswith(suffix))
    return os.path.join(directory, names[-1]) if names else None


def write_report(out_dir: str, records: list[StageRecord], quick: bool, wall_s: float) -> str:
    """Write OUT/report.md from the stage records; returns its path."""
    by = {r.name: r for r in records}
    tok, mllm, tokens, ev = (by[n].figures for n in ("tokenizer", "mllm", "tokens", "evaluate"))
    made_s = sum(r.seconds for r in records)
    lines = [
        f"# MegaDual demo run{' (--quick: a smoke run, figures not meaningful)' if quick else ''}",
        "",
        f"Stages' own wall time when they ran: {made_s:.0f} s ({made_s / 60:.1f} min); "
        f"this invocation: {wall_s:.0f} s{' (finished stages reused)' if any(r.reused for r in records) else ''}.",
        "",
        "## Results on held-out scenes",
        "",
        "| measure | value | target | |",
        "|---|---|---|---|",
        _target_row("tokenizer reconstruction PSNR", f"{ev['psnr']:.2f} dB", ev["psnr"], "psnr",
                    f"{TARGETS['psnr']:.0f} dB"),
        f"| tokenizer reconstruction SSIM | {ev['ssim']:.3f} | | |",
        _target_row("generated images with the caption's shape and colour", f"{ev['generation_accuracy']:.0%}",
                    ev["generation_accuracy"], "generation_accuracy", f"{TARGETS['generation_accuracy']:.0%}"),
        _target_row("captions naming the image's shape and colour", f"{ev['caption_accuracy']:.0%}",
                    ev["caption_accuracy"], "caption_accuracy", f"{TARGETS['caption_accuracy']:.0%}"),
        f"| ... colour alone / shape alone: generated | {ev['generation_colour']:.0%} / "
        f"{ev['generation_shape']:.0%} | | |",
        f"| ... colour alone / shape alone: captions | {ev['caption_colour']:.0%} / {ev['caption_shape']:.0%} | | |",
        f"| the image checker on the held-out originals | {ev['reader_accuracy']:.0%} | (its own accuracy) | |",
        f"| reconstructions whose shape and colour the checker reads right | "
        f"{ev['reconstruction_read_accuracy']:.0%} (colour {ev['reconstruction_colour']:.0%}, shape "
        f"{ev['reconstruction_shape']:.0%}) | (what the codes keep) | |",
        "",
        f"{ev['held_out']} held-out scenes (a seed never trained on). Images are judged by "
        "`megadual.data.scene_reader.read_scene` from pixels alone; captions by the scene grammar.",
        "",
        "## Stages",
        "",
        "| stage | wall time | throughput | |",
        "|---|---|---|---|",
    ]
    throughput = {
        "data": f"{by['data'].figures['images_per_s']:.0f} images/s rendered",
        "tokenizer": f"{tok['images_per_s']:.0f} training images/s ({tok['ranks']} ranks)",
        "tokens": f"{tokens['images_per_s_with_startup']:.0f} images/s incl. start-up",
        "mllm": f"{mllm['tokens_per_s']:.0f} tokens/s ({mllm['layout']})",
        "hf": f"{by['hf'].figures['bytes'] / 2**20:.1f} MiB written",
        "evaluate": f"generate {ev['generate_images_per_s']:.1f} images/s, caption {ev['caption_images_per_s']:.1f}"
                    f" images/s, reconstruct {ev['reconstruct_images_per_s']:.0f} images/s",
    }
    for r in records:
        lines.append(f"| {r.title} | {r.seconds:.1f} s | {throughput.get(r.name, '')} | "
                     f"{'reused' if r.reused else 'ran'} |")
    lines += [
        "",
        "## Tokenizer",
        "",
        f"- {tok['steps']} steps: loss {tok['first_loss']:.3f} -> {tok['last_loss']:.3f}, training-batch PSNR "
        f"{tok['train_psnr']:.2f} dB; codebook usage at the end: pixel {tok['usage_pixel']:.0%}, "
        f"semantic {tok['usage_semantic']:.0%}",
        f"- {tokens['samples']} training images extracted to token shards, {tokens['skipped']} skipped",
        "",
        f"![tokenizer loss]({_rel(out_dir, os.path.join(by['tokenizer'].directory, 'loss.png'))})",
        "",
        "Held-out originals (top) and their reconstructions (bottom); green frame: the checker reads the "
        "reconstruction's shape and colour right:",
        "",
        f"![reconstructions]({_rel(out_dir, os.path.join(by['evaluate'].directory, 'reconstructions.png'))})",
        "",
    ]
    usage = _latest_png(os.path.join(by["tokenizer"].directory, "images"), "_usage.png")
    if usage:
        lines += ["Codebook usage (EMA counts, sorted):", "", f"![codebook usage]({_rel(out_dir, usage)})", ""]
    lines += [
        "## Unified model",
        "",
        f"- {mllm['steps']} steps on {mllm['ranks']} ranks: loss {mllm['first_loss']:.3f} -> {mllm['last_loss']:.3f} "
        f"(text {mllm['last_text_loss']:.3f}, visual {mllm['last_visual_loss']:.3f} at the end)",
        f"- exported to Hugging Face format: {', '.join(by['hf'].figures['files'][:6])}"
        f"{' ...' if len(by['hf'].figures['files']) > 6 else ''}",
        "",
        f"![unified model loss]({_rel(out_dir, os.path.join(by['mllm'].directory, 'loss.png'))})",
        "",
        "Generated images, one per held-out caption (green frame: shape and colour right):",
        "",
        f"![generations]({_rel(out_dir, os.path.join(by['evaluate'].directory, 'generations.png'))})",
        "",
        "| held-out caption | generated image read as | |",
        "|---|---|---|",
        *[f"| {caption} | {seen['colour']} {seen['shape']} | {'right' if ok else 'wrong'} |"
          for caption, seen, ok in ev["generation_samples"]],
        "",
        "| held-out image's caption | the model's caption |",
        "|---|---|",
        *[f"| {truth} | {said} |" for truth, said in ev["caption_samples"]],
        "",
    ]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path
