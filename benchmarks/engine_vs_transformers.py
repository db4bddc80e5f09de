"""Decode and prefill speed of the native engine vs Hugging Face transformers, same weights.

A random ~110M-parameter DeepSeek-V3-shaped model (MLA, 1 dense + 7 MoE layers, 32 experts,
top-4 of 2 groups, MTP layer), fp32 on the CPU, same thread count for both. Prints a table and JSON.

    python benchmarks/engine_vs_transformers.py [--threads N] [--prompt 32] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import localv3
from localv3.synthetic import TINY_V3, write_checkpoint

V3_110M = {
    **TINY_V3,
    "vocab_size": 16000,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 8,
    "first_k_dense_replace": 1,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "n_routed_experts": 32,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "q_lora_rank": 256,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 32,
    "v_head_dim": 64,
}


def time_ours(model_dir: Path, prompt: list[int], n_tokens: int) -> tuple[float, float, list[int]]:
    engine = localv3.load(model_dir, device="cpu", dtype=torch.float32)
    session = engine.new_session(len(prompt) + n_tokens + 1)
    start = time.perf_counter()
    logits = session.prefill(prompt)
    prefill_s = time.perf_counter() - start
    tokens = [int(logits.argmax())]
    start = time.perf_counter()
    for _ in range(n_tokens - 1):
        tokens.append(int(session.decode(tokens[-1]).argmax()))
    return prefill_s, time.perf_counter() - start, tokens


def time_transformers(model_dir: Path, prompt: list[int], n_tokens: int) -> tuple[float, float, list[int]]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill_s = time.perf_counter() - start
        cache = out.past_key_values
        tokens = [int(out.logits[0, -1].argmax())]
        start = time.perf_counter()
        for _ in range(n_tokens - 1):
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
    return prefill_s, time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_checkpoint(Path(tmp), V3_110M, seed=0, dtype=torch.float32)
        params = localv3.load(model_dir, device="cpu", dtype=torch.float32).model
        n_params = sum(p.numel() for p in params.parameters())
        del params
        prompt = torch.randint(2, V3_110M["vocab_size"], (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
        rows = []
        tokens_by_engine = {}
        for name, fn in (("localv3", time_ours), ("transformers", time_transformers)):
            fn(model_dir, prompt, 4)  # warm-up
            runs = [fn(model_dir, prompt, args.tokens) for _ in range(args.repeats)]
            decode = [(args.tokens - 1) / r[1] for r in runs]
            prefill = [args.prompt / r[0] for r in runs]
            tokens_by_engine[name] = runs[0][2]
            rows.append(
                {
                    "engine": name,
                    "params": n_params,
                    "threads": args.threads,
                    "prefill_tok_s": statistics.mean(prefill),
                    "decode_tok_s": statistics.mean(decode),
                    "decode_tok_s_std": statistics.pstdev(decode),
                }
            )
    same = tokens_by_engine["localv3"] == tokens_by_engine["transformers"]
    ratio = rows[0]["decode_tok_s"] / rows[1]["decode_tok_s"]
    print(f"{'engine':<14}{'params':>12}{'threads':>8}{'pp' + str(args.prompt) + ' t/s':>14}{'tg' + str(args.tokens) + ' t/s':>18}")
    for r in rows:
        print(
            f"{r['engine']:<14}{r['params']:>12,}{r['threads']:>8}{r['prefill_tok_s']:>14.1f}"
            f"{r['decode_tok_s']:>12.1f} ± {r['decode_tok_s_std']:.1f}"
        )
    print(f"decode speed ratio localv3/transformers: {ratio:.2f}x; greedy tokens identical: {same}")
    print(json.dumps({"results": rows, "decode_ratio": ratio, "greedy_tokens_identical": same}))


if __name__ == "__main__":
    main()
