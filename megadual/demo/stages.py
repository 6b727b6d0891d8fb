"""Run the demo's stages in order, each at most once per set of inputs.

A stage owns one directory under the run directory. When its work returns, the stage writes
`stage.json` there (atomically): its figures, its wall time, and a fingerprint of what it was
given (its settings and the fingerprints of the stages it read). On a rerun a stage whose
`stage.json` carries the same fingerprint is reused without doing any work; any other stage
directory (half-written by a crash, made with other settings or from an earlier stage that
has since changed, or `force`) is removed and the stage runs again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger(__name__)

MARKER = "stage.json"


@dataclass
class StageRecord:
    name: str
    title: str
    directory: str
    fingerprint: str
    seconds: float  # wall time of the run that made it
    figures: dict[str, Any]
    reused: bool  # True when this invocation found it finished


def fingerprint(name: str, settings: dict[str, Any], upstream: list[StageRecord]) -> str:
    payload = json.dumps({"name": name, "settings": settings, "upstream": [u.fingerprint for u in upstream]},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


class StageRunner:
    """Runs stages under `root`; `records` lists them in the order they ran (or were reused)."""

    def __init__(self, root: str, force: bool = False):
        self.root = root
        self.force = force
        self.records: list[StageRecord] = []

    def run(self, name: str, title: str, settings: dict[str, Any], upstream: list[StageRecord],
            work: Callable[[str], dict[str, Any]]) -> StageRecord:
        """Reuse stage `name` if it finished with these inputs, else run `work(directory)`.

        Args:
            settings: everything besides the upstream stages that decides the stage's output.
            upstream: the stages whose outputs `work` reads.
            work: does the stage in the (fresh, empty) directory it is given; returns its figures.
        """
        directory = os.path.join(self.root, name)
        marker = os.path.join(directory, MARKER)
        print_ = fingerprint(name, settings, upstream)
        step = f"[{len(self.records) + 1}] {title}"
        if not self.force and os.path.isfile(marker):
            with open(marker, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("fingerprint") == print_:
                logger.info("%s: finished earlier, reusing %s", step, directory)
                record = StageRecord(name, title, directory, print_, saved["seconds"], saved["figures"], True)
                self.records.append(record)
                return record
            logger.info("%s: %s was made from other inputs; redoing it", step, directory)
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.makedirs(directory)
        logger.info("%s -> %s", step, directory)
        started = time.perf_counter()
        # Through JSON, so a stage reports the same values (lists, not tuples) run or reused.
        figures = json.loads(json.dumps(work(directory)))
        seconds = time.perf_counter() - started
        tmp = marker + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"fingerprint": print_, "seconds": seconds, "figures": figures}, f, indent=1, sort_keys=True)
        os.replace(tmp, marker)
        logger.info("%s: done in %.1f s", step, seconds)
        record = StageRecord(name, title, directory, print_, seconds, figures, False)
        self.records.append(record)
        return record
