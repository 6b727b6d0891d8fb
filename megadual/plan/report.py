"""How a plan is shown: a table per layout, the parts, the refusals, and a stacked-memory PNG."""

from __future__ import annotations

import re
from typing import Optional

from .layouts import MEMORY_PARTS, LayoutEstimate
from . import Plan

GIB = 2**30


def parse_bytes(text: str) -> float:
    """'80GiB', '80GB', '141 GiB', '8e10' -> bytes; ValueError naming the value otherwise."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "b": 1}
    clean = text.strip().lower().replace(" ", "")
    for unit in sorted(units, key=len, reverse=True):
        if clean.endswith(unit):
            number, scale = clean[: -len(unit)], units[unit]
            break
    else:
        number, scale = clean, 1
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"{text!r} is not a size: write it like 80GiB, 141GB or 8.6e10") from None
    if value <= 0:
        raise ValueError(f"{text!r}: a memory size must be positive")
    return value


def _layout_name(e: LayoutEstimate) -> str:
    lay = e.layout
    return (f"tp{lay.tp} pp{lay.pp} dp{lay.dp} z{lay.zero_stage} mbs{lay.micro_batch_size} ga{lay.grad_accum}"
            f"{' ac' if lay.activation_checkpointing else ''}")


def format_plan(plan: Plan, top: int = 10) -> str:
    c = plan.cluster
    rate = "positions/s" if plan.command == "train-tokenizer" else "tokens/s"  # image patches for the tokenizer
    lines = [f"{plan.command}: {plan.num_parameters / 1e9:.3f}B trainable parameters "
             f"({', '.join(f'{p.name} {p.params / 1e6:.1f}M' for p in plan.parts)})",
             f"cluster: {c.gpus} GPUs ({c.gpus_per_node} per node), {c.gpu_memory_bytes / GIB:.0f} GiB each "
             f"({c.reserve_bytes / GIB:.1f} GiB reserved), {c.peak_tflops:.0f} TFLOP/s peak at MFU {c.mfu:.2f}",
             "", "| layout | " + " | ".join(MEMORY_PARTS) + f" | total GiB | fits | step s | {rate} | bubble |",
             "|---" * (len(MEMORY_PARTS) + 6) + "|"]
    for e in plan.layouts[:top]:
        m = e.memory_per_rank_bytes
        cells = " | ".join(f"{m[k] / GIB:.2f}" for k in MEMORY_PARTS)
        lines.append(f"| {_layout_name(e)} | {cells} | {m['total'] / GIB:.2f} | {'yes' if e.fits else 'NO'} | "
                     f"{e.step_time_s:.2f} | {e.tokens_per_s:,.0f} | {100 * e.bubble:.0f}% |")
    fitting = sum(e.fits for e in plan.layouts)
    lines.append(f"\n{len(plan.layouts)} layouts estimated, {fitting} fit; memory per rank of the worst pipeline "
                 "stage, GiB; step time at the given MFU")
    if plan.refusals:
        # One line per kind of reason (its numbers aside), with its first instance.
        kinds: dict[str, list] = {}
        for _, reason in plan.refusals:
            kinds.setdefault(re.sub(r"\d+", "N", reason), [0, reason])[0] += 1
        lines.append(f"{len(plan.refusals)} layouts refused, e.g.:")
        lines += [f"  {n} x {example}" for n, example in sorted(kinds.values(), key=lambda kv: -kv[0])]
    return "\n".join(lines) + "\n"


def draw_plan(plan: Plan, path: str, top: int = 12, title: Optional[str] = None) -> None:
    """Stacked memory per rank of the `top` ranked layouts against the GPU's memory line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = plan.layouts[:top]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(rows) + 2), 4.5))
    bottoms = [0.0] * len(rows)
    for part in MEMORY_PARTS:
        values = [e.memory_per_rank_bytes[part] / GIB for e in rows]
        ax.bar(range(len(rows)), values, bottom=bottoms, label=part)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    usable = (plan.cluster.gpu_memory_bytes - plan.cluster.reserve_bytes) / GIB
    ax.axhline(plan.cluster.gpu_memory_bytes / GIB, color="black", linestyle="--", label="GPU memory")
    ax.axhline(usable, color="grey", linestyle=":", label="usable (less reserve)")
    ax.set_xticks(range(len(rows)), [_layout_name(e).replace(" ", "\n") for e in rows], fontsize=7)
    ax.set_ylabel("GiB per rank")
    ax.set_title(title or f"{plan.command}: {plan.num_parameters / 1e9:.2f}B on {plan.cluster.gpus} GPUs")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
