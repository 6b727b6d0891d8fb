"""Backbone forward+backward: MegaDual's Qwen2 vs transformers' Qwen2ForCausalLM, time and MFU.

    python benchmarks/backbone.py                                 # small CPU shapes, fp32, 1 thread
    python benchmarks/backbone.py --device cuda --dtype bf16 --preset qwen2.5-3b --seq 4096 --docs 4

Both models are built with the same sizes straight on --device in --dtype (random weights:
the arithmetic, not the values, sets the time) and run the same token batch; runs are
interleaved (ours, HF, ours, HF, ...) so load from elsewhere hits both alike, and the table
reports medians. A step is forward, cross entropy over every token, backward.

--docs N packs N documents of seeded random lengths into each row: MegaDual gets them as
position_ids + cu_seqlens (document-causal attention: flash-attn, FlexAttention or SDPA, as
`attn_impl=auto` picks), transformers with SDPA sees each row as one causal sequence (it has
no packed SDPA path), so it does more attention work for the same tokens. MFU counts each
model's own work: 6 x matmul parameters x tokens (the lm_head included, the embedding lookup
not) plus causal attention, 6 x layers x heads*head_dim x sum over sequences of L^2 (QK^T and
AV, half the square each, forward + 2x backward), against --peak-tflops (default: H100/H200
dense bf16).

Targets: CPU, plain rows: megadual / transformers time <= 1.05; H200, bf16, qwen2.5-3b, seq
4096 packed: MFU >= 45%.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import H100_BF16_PEAK_TFLOPS, add_device_arguments, device_name, resolve_device, write_json  # noqa: E402

# Sizes from each model's Hugging Face config.json (both tie the embedding).
PRESETS = {
    "small": dict(hidden=256, layers=4, heads=8, kv_heads=2, intermediate=704, vocab=4096, tie=False),
    "qwen2.5-1.5b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151936, tie=True),
    "qwen2.5-3b": dict(hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008, vocab=151936, tie=True),
}
TARGET_CPU_RATIO = 1.05
TARGET_MFU = 0.45


def document_lengths(seq: int, docs: int, generator: torch.Generator) -> list[int]:
    """`docs` lengths summing to `seq`, each at least seq // (4 * docs): seeded random cut points."""
    if docs == 1:
        return [seq]
    floor = max(1, seq // (4 * docs))
    spare = seq - floor * docs
    cuts = sorted(torch.randint(0, spare + 1, (docs - 1,), generator=generator).tolist())
    return [floor + b - a for a, b in zip([0] + cuts, cuts + [spare])]


def step_flops(shape: dict, tokens: int, sequence_lengths: list[int]) -> float:
    """Model FLOPs of one forward+backward (see the module docstring)."""
    h, kv_dim = shape["hidden"], shape["hidden"] // shape["heads"] * shape["kv_heads"]
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * shape["intermediate"]
    matmul_params = shape["layers"] * per_layer + h * shape["vocab"]
    attention = 6 * shape["layers"] * h * sum(length * length for length in sequence_lengths)
    return 6 * matmul_params * tokens + attention


def build_models(shape: dict, device: torch.device, dtype: torch.dtype):
    # megadual first: importing megadual.models patches torchvision for the CPU torch, which
    # transformers' Qwen2 import needs (it fails with "operator torchvision::nms does not exist").
    from megadual.config.schema import BackboneConfig
    from megadual.models.qwen2 import Qwen2ForCausalLM as Ours

    from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: I001

    cfg = BackboneConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                         intermediate_size=shape["intermediate"], num_layers=shape["layers"],
                         num_heads=shape["heads"], num_kv_heads=shape["kv_heads"], tie_embeddings=shape["tie"],
                         check_token_ids=False)
    hf_config = Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                            intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                            num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                            tie_word_embeddings=shape["tie"], use_cache=False, attn_implementation="sdpa")
    with torch.device(device):
        ours = Ours(cfg).to(dtype).train()
        hf = Qwen2ForCausalLM(hf_config).to(dtype).train()
    return ours, hf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model sizes (default small)")
    parser.add_argument("--layers", type=int, help="override the preset's layer count (e.g. for a quick run)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--docs", type=int, default=1, help="packed documents per row (default 1: plain causal rows)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK_TFLOPS,
                        help=f"the device's peak for MFU (default {H100_BF16_PEAK_TFLOPS:.0f}: H100/H200 bf16 dense)")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    if not 1 <= args.docs <= args.seq:
        raise SystemExit(f"--docs {args.docs}: must be between 1 and --seq ({args.seq})")
    torch.set_num_threads(args.threads)
    device, dtype, sync = resolve_device(args)
    shape = dict(PRESETS[args.preset], **({"layers": args.layers} if args.layers else {}))

    torch.manual_seed(0)
    ours, hf = build_models(shape, device, dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab"], (args.batch, args.seq), generator=g).to(device)
    targets = torch.randint(0, shape["vocab"], (args.batch, args.seq), generator=g).to(device)
    lengths = [document_lengths(args.seq, args.docs, g) for _ in range(args.batch)]
    packed = {}
    if args.docs > 1:
        flat = [n for row in lengths for n in row]
        offsets = torch.tensor([0] + flat).cumsum(0)
        positions = torch.cat([torch.arange(n) for n in flat]).view(args.batch, args.seq)
        packed = dict(position_ids=positions.to(device), cu_seqlens=offsets.to(device, torch.int32))

    def step(model, call):
        model.zero_grad(set_to_none=True)
        logits = call()
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()

    runners = {
        "megadual": lambda: step(ours, lambda: ours(ids, **packed)),
        "transformers": lambda: step(hf, lambda: hf(input_ids=ids).logits),
    }
    tokens = args.batch * args.seq
    work = {"megadual": step_flops(shape, tokens, [n for row in lengths for n in row]),
            "transformers": step_flops(shape, tokens, [args.seq] * args.batch)}
    for run in runners.values():  # warm-up apart, so compilation and autotuning never hit a timed run
        for _ in range(args.warmup):
            run()
    times = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["transformers"])
    params = sum(p.numel() for p in ours.parameters())
    result = {"device": device_name(device), "dtype": args.dtype, "preset": args.preset, "shape": shape,
              "parameters": params, "batch": args.batch, "seq": args.seq, "docs_per_row": args.docs,
              "tokens_per_step": tokens, "peak_tflops": args.peak_tflops, "rows": {}}
    print(f"Qwen2 forward+backward, {args.dtype}, {result['device']}: preset {args.preset} "
          f"({params / 1e9:.2f}B parameters; hidden {shape['hidden']}, {shape['layers']} layers, "
          f"{shape['heads']}/{shape['kv_heads']} heads, vocab {shape['vocab']}), batch {args.batch} x seq {args.seq}, "
          f"{args.docs} document(s) per row, median of {args.repeats}")
    print(f"{'implementation':<14} {'median ms':>10} {'tokens/s':>10} {'MFU':>7} {'time vs transformers':>21}")
    for name, values in times.items():
        median = statistics.median(values)
        mfu = work[name] / median / (args.peak_tflops * 1e12)
        result["rows"][name] = {"step_s": median, "tokens_per_s": tokens / median, "mfu": mfu,
                                "flops_per_step": work[name], "time_vs_transformers": median / base}
        print(f"{name:<14} {median * 1e3:>10.1f} {tokens / median:>10.0f} {100 * mfu:>6.1f}% {median / base:>21.3f}")
    if device.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        print(f"peak GPU memory: {result['peak_memory_bytes'] / 2**30:.1f} GiB")
        print(f"target: MFU >= {100 * TARGET_MFU:.0f}% (at qwen2.5-3b, seq 4096, packed)")
    else:
        print(f"target: megadual / transformers <= {TARGET_CPU_RATIO} (plain rows)")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
