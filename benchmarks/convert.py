"""Peak memory and time of `megadual convert to-hf` against the size of what it converts.

Trains nothing: it writes a random debug-size (or --hidden/--layers sized) MegaDual init
checkpoint at tp=2, then converts it to HF in a fresh process and reports that process's
peak resident memory (VmHWM) next to a baseline process that only imports the same modules.
The difference is what conversion itself holds: compare it with the largest tensor and one
output shard.

    python benchmarks/convert.py [--hidden 512 --layers 8 --vocab 32000] [--max-shard-size 50MB]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

IMPORTS = "import megadual.convert.commands"


def _peak_rss_mib(code: str) -> tuple[float, float]:
    script = f"{code}\nprint('VmHWM', [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    line = [l for l in out.splitlines() if l.startswith("VmHWM")][-1]
    return int(line.split()[1]) / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--max-shard-size", default="50MB")
    args = parser.parse_args()

    import torch

    from megadual.config.schema import BackboneConfig
    from megadual.convert.sharding import partition_dims, split_tensor_parallel
    from megadual.convert.writers import write_init_checkpoint
    from megadual.models.qwen2 import build_qwen2

    cfg = BackboneConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_layers=args.layers, num_heads=8, num_kv_heads=2)
    model = build_qwen2(cfg, seed=0)
    state = model.state_dict()
    total = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
    largest = max(t.numel() * t.element_size() for t in state.values()) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "init")
        write_init_checkpoint(split_tensor_parallel(state, partition_dims(model), 2), cfg, src)
        del model, state
        base, _ = _peak_rss_mib(IMPORTS)
        conv, seconds = _peak_rss_mib(
            f"{IMPORTS}\nmegadual.convert.commands.to_hf({src!r}, {os.path.join(tmp, 'hf')!r}, "
            f"max_shard_size={args.max_shard_size!r})"
        )
    print(f"to-hf of a tp=2 init checkpoint: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"fp32, shards of {args.max_shard_size}; {torch.get_num_threads()} thread(s)")
    print(f"{'model size MiB':>15} {'largest tensor MiB':>19} {'import-only RSS MiB':>20} {'to-hf RSS MiB':>14} "
          f"{'held by to-hf MiB':>18} {'seconds':>8}")
    print(f"{total:>15.1f} {largest:>19.1f} {base:>20.1f} {conv:>14.1f} {conv - base:>18.1f} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
