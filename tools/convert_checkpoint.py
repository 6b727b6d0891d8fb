#!/usr/bin/env python
"""Checkpoint conversion; the same as `megadual convert ...`.

    python tools/convert_checkpoint.py to-hf   --src runs/lm --out hf/lm [--dtype bf16] [--dry-run]
    python tools/convert_checkpoint.py to-hf   --src runs/mllm --out hf/mllm   # unified model + tokenizers
    python tools/convert_checkpoint.py from-hf --hf /models/Qwen2.5-3B --out init/qwen3b-tp4 --tp 4
    python tools/convert_checkpoint.py from-hf --hf hf/mllm --out init/mllm-tp2 --tp 2   # every part
    python tools/convert_checkpoint.py reshard --src runs/lm --out init/lm-tp1 --tp 1
"""

import sys

from megadual.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
