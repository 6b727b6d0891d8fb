"""The demo's report: report.md in the run directory, with the stages' PNGs beside it.

Every figure in the report comes from a stage's `stage.json` (written when the stage ran), so a
rerun that reuses stages reports the same numbers it measured the first time. report.json holds
them all, machine-readable; report.md shows them beside their targets, chance levels and ceilings.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

from PIL import Image

from megadual.data.scenes import ATTRIBUTES

from .stages import StageRecord

# The targets the full run is held to (fractions of held-out scenes; seconds of all stages).
TARGETS = {"psnr": 24.0, "generation_both": 0.80, "caption_both": 0.90, "wall_time_s": 900.0}
_SCALE = 4  # 32 px images are drawn 4x larger
_LINE_COLOURS = ("black", "tab:blue", "tab:orange", "tab:purple", "tab:brown")  # "both", then each attribute
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


def _verdict(value: float, target: float, lower_is_better: bool = False) -> str:
    hit = value <= target if lower_is_better else value >= target
    return "hit" if hit else f"miss by {abs(target - value):.3g}"


def _rel(out_dir: str, path: str) -> str:
    return os.path.relpath(path, out_dir)


def _latest_png(directory: str, suffix: str) -> Optional[str]:
    if not os.path.isdir(directory):
        return None
    names = sorted(n for n in os.listdir(directory) if n.endswith(suffix))
    return os.path.join(directory, names[-1]) if names else None


def probe_ceiling(probe: dict) -> dict[str, float]:
    """Attribute -> the best probe accuracy over branches and probe kinds."""
    return {a: max(cell["best"] for cell in branches.values()) for a, branches in probe.items()}


def build_results(records: list[StageRecord], quick: bool, wall_s: float) -> dict:
    """report.json: every figure of the run; accuracies are fractions in [0, 1]."""
    by = {r.name: r for r in records}
    ev, probe, mllm = by["evaluate"].figures, by["probe"].figures, by["mllm"].figures
    chance = dict(probe["chance"])
    chance["both"] = math.prod(chance.values())
    final = {"step": mllm["steps"], "caption": ev["caption"], "generation": ev["generation"]}
    return {
        "quick": quick,
        "wall_time_s": sum(r.seconds for r in records),  # the stages' own time when they ran
        "this_invocation_s": wall_s,
        "stages": {r.name: r.seconds for r in records},
        "reused": [r.name for r in records if r.reused],
        "held_out": ev["held_out"],
        "tokenizer": {"psnr": ev["psnr"], "ssim": ev["ssim"], "reconstruction_read": ev["reconstruction_read"]},
        "reader_on_originals": ev["reader"],
        "caption": ev["caption"],
        "generation": ev["generation"],
        "chance": chance,
        "probe": probe["probe"],
        "probe_ceiling": probe_ceiling(probe["probe"]),
        "curve": [*by["curve"].figures["points"], final],
        "targets": TARGETS,
    }


def plot_curve(results: dict, path: str) -> None:
    """Held-out captioning and generation over the unified model's steps, beside chance and ceilings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in results["curve"]]
    ceilings = {"caption": results["probe_ceiling"],  # what a reader of the codes can get
                "generation": {a: results["tokenizer"]["reconstruction_read"][a] for a in ATTRIBUTES}}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, task, title in zip(axes, ("caption", "generation"), ("captions", "generated images")):
        for key, colour in zip(("both", *ATTRIBUTES), _LINE_COLOURS):
            label = "every attribute" if key == "both" else key
            ax.plot(steps, [p[task][key] for p in results["curve"]], marker="o", color=colour, label=label)
            ax.axhline(results["chance"][key], color=colour, linestyle=":", linewidth=1)
        for a, colour in zip(ATTRIBUTES, _LINE_COLOURS[1:]):
            ax.axhline(ceilings[task][a], color=colour, linestyle="--", linewidth=1)
        ax.axhline(TARGETS[f"{task}_both"], color="tab:green", linewidth=1)
        ax.set_title(f"held-out {title}")
        ax.set_xlabel("unified-model step")
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("right (fraction)")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.text(0.01, 0.01, "dotted: chance; dashed: ceiling (probe on the codes / checker on reconstructions); "
             "green: target", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.0%}"


def _scores_line(scores: dict) -> str:
    return (f"{_pct(scores['both'])} (" + ", ".join(f"{a} {_pct(scores[a])}" for a in ATTRIBUTES)
            + f"; unseen combinations {_pct(scores['unseen_combinations_both'])} of {scores['num_unseen']}, "
            f"seen {_pct(scores['seen_combinations_both'])})")


def _probe_table(results: dict) -> list[str]:
    probe, chance = results["probe"], results["chance"]
    branches = list(next(iter(probe.values())))
    lines = ["| attribute | chance | " + " | ".join(f"{b} codes: linear / conv" for b in branches)
             + " | the unified model's captions |", "|---|---|" + "---|" * (len(branches) + 1)]
    for a, cells in probe.items():
        lines.append(f"| {a} | {_pct(chance[a])} | "
                     + " | ".join(f"{_pct(cells[b]['linear'])} / {_pct(cells[b]['conv'])}" for b in branches)
                     + f" | {_pct(results['caption'][a])} |")
    return lines


def write_report(out_dir: str, records: list[StageRecord], quick: bool, wall_s: float) -> str:
    """Write OUT/report.json, OUT/report.md and OUT/curve.png from the stage records; returns report.md's path."""
    by = {r.name: r for r in records}
    tok, mllm, tokens, ev = (by[n].figures for n in ("tokenizer", "mllm", "tokens", "evaluate"))
    results = build_results(records, quick, wall_s)
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    plot_curve(results, os.path.join(out_dir, "curve.png"))
    made_s = results["wall_time_s"]
    cap, gen = results["caption"], results["generation"]
    lines = [
        f"# MegaDual demo run{' (--quick: a smoke run, figures not meaningful)' if quick else ''}",
        "",
        f"Stages' own wall time when they ran: {made_s:.0f} s ({made_s / 60:.1f} min; target <= "
        f"{TARGETS['wall_time_s']:.0f} s: {_verdict(made_s, TARGETS['wall_time_s'], lower_is_better=True)}); "
        f"this invocation: {wall_s:.0f} s{' (finished stages reused)' if results['reused'] else ''}. "
        "Every figure is also in report.json.",
        "",
        "## Results on held-out scenes",
        "",
        "| measure | value | target | |",
        "|---|---|---|---|",
        f"| tokenizer reconstruction PSNR | {ev['psnr']:.2f} dB | >= {TARGETS['psnr']:.0f} dB | "
        f"{_verdict(ev['psnr'], TARGETS['psnr'])} |",
        f"| tokenizer reconstruction SSIM | {ev['ssim']:.3f} | | |",
        f"| captions naming every attribute right | {_scores_line(cap)} | >= {_pct(TARGETS['caption_both'])} | "
        f"{_verdict(cap['both'], TARGETS['caption_both'])} |",
        f"| generated images with every named attribute right | {_scores_line(gen)} | "
        f">= {_pct(TARGETS['generation_both'])} | {_verdict(gen['both'], TARGETS['generation_both'])} |",
        f"| chance (a uniform guess) | " + ", ".join(f"{k} {_pct(v)}" for k, v in results["chance"].items())
        + " | | |",
        f"| the image checker on the held-out originals | {_scores_line(results['reader_on_originals'])} "
        "| (its own accuracy) | |",
        f"| reconstructions the checker reads right | {_scores_line(ev['reconstruction_read'])} "
        "| (what the pixel codes keep: the generation ceiling) | |",
        "",
        f"{ev['held_out']} held-out scenes (a seed never trained on), drawn from every attribute combination; "
        f"{cap['num_unseen']} of them show a combination training never showed (compositional generalisation). "
        "Images are judged by `megadual.data.scene_reader.read_scene` from pixels alone; captions by the "
        "scene grammar.",
        "",
        "### What the codes carry (probes on the token shards, scored on the held-out codes)",
        "",
        *_probe_table(results),
        "",
        "### Learning: held-out scores at the unified model's checkpoints",
        "",
        "| step | captions: every attribute | generation: every attribute |",
        "|---|---|---|",
        *[f"| {p['step']} | {_scores_line(p['caption'])} | {_scores_line(p['generation'])} |"
          for p in results["curve"]],
        "",
        "![learning curve](curve.png)",
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
        "reconstruction's attributes right:",
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
        "Generated images, one per held-out caption (green frame: every attribute right):",
        "",
        f"![generations]({_rel(out_dir, os.path.join(by['evaluate'].directory, 'generations.png'))})",
        "",
        "| held-out caption | generated image read as | |",
        "|---|---|---|",
        *[f"| {caption} | {' '.join(str(seen[a]) for a in ('colour', 'shape'))} | {'right' if ok else 'wrong'} |"
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
