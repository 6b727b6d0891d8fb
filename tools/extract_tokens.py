#!/usr/bin/env python
"""Offline token extraction; the same as `megadual extract ...`.

    python tools/extract_tokens.py --input data/shapes --out data/shapes-tokens --tokenizer runs/tok/tokenizer
    torchrun --nproc_per_node 8 tools/extract_tokens.py --input /data/raw --out /data/tokens \\
        --tokenizer /ckpt/dualtoken --text-tokenizer /models/Qwen2.5-3B --batch-size 128 --num-workers 6
"""

import sys

from megadual.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
