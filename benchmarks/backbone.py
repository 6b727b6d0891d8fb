"""Backbone forward+backward time: MegaDual's Qwen2 vs transformers' Qwen2ForCausalLM.

Both models hold the same weights (ours is loaded from the HF model's save_pretrained
directory) and run the same batch. Runs are interleaved (ours, HF, ours, HF, ...) so
load from other processes hits both alike; the table reports medians.

    python benchmarks/backbone.py [--threads 1] [--hidden 256 --layers 4 --seq 512 --batch 2]

Target: ratio ours / transformers <= 1.05.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def _step_seconds(model_call, ids, targets) -> float:
    start = time.perf_counter()
    logits = model_call(ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # megadual first: importing megadual.models patches torchvision for the CPU torch, which
    # transformers' Qwen2 import needs (it fails with "operator torchvision::nms does not exist").
    from megadual.models.qwen2 import load_hf

    from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: I001

    torch.manual_seed(0)
    hf_config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        use_cache=False,
        attn_implementation="sdpa",
    )
    hf = Qwen2ForCausalLM(hf_config).float().train()
    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(path)
        ours = load_hf(path).train()

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    targets = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    runners = {
        "megadual": lambda x: ours(x),
        "transformers": lambda x: hf(input_ids=x).logits,
    }
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(args.warmup + args.repeats):
        for name, run in runners.items():
            model = ours if name == "megadual" else hf
            model.zero_grad(set_to_none=True)
            seconds = _step_seconds(run, ids, targets)
            if i >= args.warmup:
                times[name].append(seconds)

    base = statistics.median(times["transformers"])
    print(
        f"Qwen2 forward+backward, fp32, CPU, {args.threads} thread(s): hidden {args.hidden}, {args.layers} layers, "
        f"{args.heads}/{args.kv_heads} heads, vocab {args.vocab}, batch {args.batch} x seq {args.seq}, "
        f"median of {args.repeats}"
    )
    print(f"{'implementation':<14} {'median ms':>10} {'min ms':>8} {'ratio vs transformers':>22}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<14} {median * 1e3:>10.1f} {min(values) * 1e3:>8.1f} {median / base:>22.3f}")
    print("target: megadual / transformers <= 1.05")


if __name__ == "__main__":
    main()
