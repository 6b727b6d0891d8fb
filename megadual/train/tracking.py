"""Where a run's numbers go: metrics.jsonl, wandb (opt-in) and PNG loss curves.

wandb runs on rank 0 only, offline unless WANDB_MODE says otherwise (no network needed;
`wandb sync` uploads later). Loss curves are drawn from metrics.jsonl with matplotlib's
Agg backend, so they work headless.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional


class WandbTracker:
    """Logs step records to wandb when a project is given; a no-op otherwise."""

    def __init__(self, project: Optional[str], run_dir: str, config: dict[str, Any], enabled: bool = True):
        self.run = None
        if enabled and project:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            self.run = wandb.init(project=project, dir=run_dir, config=config,
                                  name=os.path.basename(os.path.abspath(run_dir)))

    def log(self, record: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if v is not None}, step=record["step"])

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


class StepLog:
    """One record per optimizer step into metrics.jsonl and wandb, on the writing rank only.

    The file is appended to (a resumed run continues it) and flushed every `log_every` steps
    and at the last step, so a reader sees whole lines without a flush per step.
    """

    def __init__(self, run_dir: str, wandb_project: Optional[str], config: dict[str, Any], enabled: bool,
                 log_every: int, total_steps: int):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None
        self._tracker = WandbTracker(wandb_project, run_dir, config, enabled=enabled)
        self._log_every, self._total = log_every, total_steps

    def write(self, record: dict[str, Any]) -> bool:
        """Append `record` (it has "step"); True when this step is a logging step on the writer."""
        if self._file is None:
            return False
        self._file.write(json.dumps(record) + "\n")
        self._tracker.log(record)
        step = record["step"]
        if step % self._log_every == 0 or step == self._total:
            self._file.flush()
            return True
        return False

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        self._tracker.finish()
        if self._file is not None:
            self._file.close()


def plot_losses(metrics_path: str, png_path: str, keys: Iterable[str] = ("loss",)) -> Optional[str]:
    """Draw the given keys of metrics.jsonl against step (last record per step wins, as after a
    resume); returns the PNG path, or None when there is nothing to draw."""
    if not os.path.isfile(metrics_path):
        return None
    by_step: dict[int, dict] = {}
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            by_step[record["step"]] = record
    if not by_step:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        points = [(s, by_step[s][key]) for s in steps if by_step[s].get(key) is not None]
        if points:
            ax.plot(*zip(*points), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
