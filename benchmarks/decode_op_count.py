"""Aten ops and wall time of one decode step, per layer type, on a random DeepSeek-V3-shaped model.

    python benchmarks/decode_op_count.py [--dtype float32] [--context 64] [--repeats 30]
                                         [--threads 2] [--hidden 1024] [--heads 16] [--json out.json]

A decode step on a small model is dispatch-bound (docs/ARCHITECTURE.md): its time is the number of
aten ops times a few microseconds. This counts every op that reaches the dispatcher (views
included) with a TorchDispatchMode, split by where it ran: per dense layer and per MoE layer
(averaged over the layers of each kind), the MTP step (embedding, eh_proj, its block, norm,
lm_head), and the rest of the decode step (embedding, RoPE tables, final norm, lm_head). It
also times a decode step and an MTP step (median wall and CPU time over `repeats`), and the
absorbed MLA up-projections (W_UK, W_UV) at real V3 width by storage dtype and layout.

The model keeps V3's head dimensions, routing (sigmoid, noaux_tc, 8 groups, top-4 groups,
8 of 64 experts) and layer mix (dense, then MoE, then MTP) at a smaller width. It is built
directly from localv3.model with random weights, so it runs against any copy of the package
(PYTHONPATH=/tmp/old python benchmarks/decode_op_count.py measures an older model code);
`absorb_kv_b` is called where the model code has it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from localv3.config import ModelConfig
from localv3.model.transformer import Transformer

REPO = Path(__file__).resolve().parent.parent
V3_CONFIG = REPO / "localv3" / "assets" / "configs" / "deepseek-v3.json"
FP32_NAMES = ("gate.weight", "e_score_correction_bias")  # the router stays fp32, as the loader keeps it


def bench_config(hidden: int, heads: int) -> ModelConfig:
    """DeepSeek-V3's config.json at width `hidden`: V3 head dims and routing (8 of 64 experts
    here), V3's ratios of FFN, q LoRA and vocab sizes to the width, 3 layers + MTP."""
    config = json.loads(V3_CONFIG.read_text())
    config.pop("quantization_config", None)
    config.update(
        vocab_size=8 * hidden,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        moe_intermediate_size=hidden // 4,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        n_routed_experts=64,
        q_lora_rank=3 * hidden // 8,
    )
    return ModelConfig.from_dict(config)


def random_model(config: ModelConfig, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """Weights scaled like a trained model's (std 1/sqrt(fan_in)), norms near 1, router fp32."""
    g = torch.Generator().manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name == "rotary.inv_freq":
                continue
            if name.endswith("e_score_correction_bias"):
                value = 0.1 * torch.randn(tensor.shape, generator=g)
            elif tensor.dim() == 1:
                value = 1.0 + 0.1 * torch.randn(tensor.shape, generator=g)
            elif "embed_tokens" in name:
                value = torch.randn(tensor.shape, generator=g)
            else:
                value = torch.randn(tensor.shape, generator=g) / tensor.shape[-1] ** 0.5
            tensor.data = value.to(torch.float32 if name.endswith(FP32_NAMES) else dtype)
    if hasattr(model, "absorb_kv_b"):
        model.absorb_kv_b()
    return model.eval()


class OpCounter(TorchDispatchMode):
    """Counts aten ops by the section the model is in; forward hooks set the section."""

    def __init__(self):
        super().__init__()
        self.section = "rest"
        self.counts: dict[str, Counter] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts.setdefault(self.section, Counter())[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def enter_on_forward(self, module: torch.nn.Module, section: str) -> list:
        """Hooks that put ops inside `module` into `section`, then back into 'rest'."""

        def pre(*_):
            self.section = section

        def post(*_):
            self.section = "rest"

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def hook_layers(model: Transformer, counter: OpCounter) -> list:
    """Put each main layer's ops into its own section, 'layer {i}'."""
    return [h for i, block in enumerate(model.model.layers) for h in counter.enter_on_forward(block, f"layer {i}")]


def count_ops(model: Transformer, context: int) -> dict[str, Counter]:
    """Ops of one decode step at `context` cached tokens by section ('layer {i}', 'rest'), then
    of one MTP step ('mtp step': embedding, eh_proj, its block, norm, lm_head)."""
    cache = model.new_cache(context + 2)
    token, draft = torch.tensor([[7]]), torch.tensor([[9]])  # [B=1, S=1]
    with torch.inference_mode():
        _, hidden = model(torch.arange(context)[None] % model.config.vocab_size, 0, cache, 1)
        counter = OpCounter()
        hooks = hook_layers(model, counter)
        with counter:
            _, hidden = model(token, context, cache, 1)
            counter.section = "mtp step"
            model.mtp_forward(hidden, draft, context, cache, logits_rows=1)
    for hook in hooks:
        hook.remove()
    return counter.counts


def by_layer_type(model: Transformer, counts: dict[str, Counter]) -> dict[str, Counter]:
    """Sections 'dense layer' and 'moe layer' (ops per layer, averaged over layers of the type),
    'mtp step', 'rest' (of the decode step: embedding, RoPE tables, final norm, lm_head)."""
    config = model.config
    layers = {"dense layer": [], "moe layer": []}
    for i in range(config.num_hidden_layers):
        layers["moe layer" if config.is_moe_layer(i) else "dense layer"].append(counts[f"layer {i}"])
    table = {kind: _mean(found) for kind, found in layers.items()}
    return {**table, "mtp step": counts["mtp step"], "rest": counts["rest"]}


def _mean(counters: list[Counter]) -> Counter:
    total = sum(counters, Counter())
    return Counter({name: round(n / len(counters), 1) for name, n in total.items()})


def timed_ms(fn, repeats: int) -> dict[str, float]:
    """Medians over `repeats` calls of wall time and of this process's CPU time (all threads):
    on a shared machine the CPU time still counts the work when waiting for a core inflates the
    wall time."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return {"wall_ms": 1000 * statistics.median(wall), "cpu_ms": 1000 * statistics.median(cpu)}


def time_steps(model: Transformer, context: int, repeats: int) -> dict[str, dict[str, float]]:
    """Timings of a decode step and of an MTP step, each rewriting the same cache row."""
    cache = model.new_cache(context + 2)
    token, draft = torch.tensor([[7]]), torch.tensor([[9]])  # [B=1, S=1]
    with torch.inference_mode():
        _, hidden = model(torch.arange(context)[None] % model.config.vocab_size, 0, cache, 1)
        last = hidden[:, -1:]  # [1, 1, D]
        return {
            "decode_step": timed_ms(lambda: model(token, context, cache, 1), repeats),
            "mtp_step": timed_ms(lambda: model.mtp_forward(last, draft, context, cache, logits_rows=1), repeats),
        }


def up_projection_ms(dtype: torch.dtype, weight_dtype: torch.dtype, repeats: int) -> dict[str, dict[str, float]]:
    """Absorbed MLA up-projections at V3 width (128 heads, nope = v = 128, C = 512), batch 1.

    q_latent = q_nope @ W_UK (per head [1, nope] @ [nope, C]) plus out = context @ W_UV (per head
    [1, C] @ [C, v]), with the weights stored as MLA stores them ([H, nope, C], [H, C, v]) or
    with the reduced dimension innermost ([H, C, nope], [H, v, C], used transposed);
    activations in `dtype` are cast to `weight_dtype` and back where they differ, as a model would.
    """
    heads, nope, v, c = 128, 128, 128, 512
    g = torch.Generator().manual_seed(0)
    w_uk = torch.randn(heads, nope, c, generator=g).to(weight_dtype)  # [H, nope, C]
    w_uv = torch.randn(heads, c, v, generator=g).to(weight_dtype)  # [H, C, v]
    q = torch.randn(heads, 1, nope, generator=g).to(dtype)  # [H, B*S, nope]
    context = torch.randn(heads, 1, c, generator=g).to(dtype)  # [H, B*S, C]
    layouts = {"as_stored": (w_uk, w_uv), "reduction_inner": (_reduction_inner(w_uk), _reduction_inner(w_uv))}

    def run(uk, uv):
        q_latent = torch.bmm(q.to(weight_dtype), uk)  # [H, 1, C]
        out = torch.bmm(context.to(weight_dtype), uv)  # [H, 1, v]
        return q_latent.to(dtype), out.to(dtype)

    with torch.inference_mode():
        return {name: timed_ms(lambda: run(*pair), repeats) for name, pair in layouts.items()}


def _reduction_inner(weight: torch.Tensor) -> torch.Tensor:
    """The same [H, K, N] matrices, stored [H, N, K] (K, the reduced dimension, innermost)."""
    return weight.transpose(1, 2).contiguous().transpose(1, 2)


def print_table(table: dict[str, Counter], times: dict[str, dict[str, float]]) -> None:
    print(f"{'section':<12} {'ops':>6}  top ops")
    for section, ops in table.items():
        top = ", ".join(f"{name} {n:g}" for name, n in ops.most_common(6))
        print(f"{section:<12} {sum(ops.values()):>6g}  {top}")
    for step, t in times.items():
        print(f"{step}: {t['wall_ms']:.2f} ms wall, {t['cpu_ms']:.2f} ms CPU (medians)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--context", type=int, default=64, help="tokens in the cache before the measured step")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (256: dispatch-bound)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the JSON line to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = random_model(bench_config(args.hidden, args.heads), dtype)
    counts = count_ops(model, args.context)
    table = by_layer_type(model, counts)
    times = time_steps(model, args.context, args.repeats)
    up_proj = {
        f"{w}_weights": up_projection_ms(dtype, getattr(torch, w), args.repeats) for w in ("float32", "bfloat16")
    }
    print_table(table, times)
    for name, by_layout in up_proj.items():
        layouts = ", ".join(f"{layout} {t['wall_ms']:.2f} ms ({t['cpu_ms']:.2f} CPU)" for layout, t in by_layout.items())
        print(f"V3-width absorbed up-projections, {args.dtype} activations, {name}: {layouts}")
    result = {
        "dtype": args.dtype,
        "threads": args.threads,
        "context": args.context,
        "hidden": args.hidden,
        "heads": args.heads,
        "ops": {section: sum(ops.values()) for section, ops in table.items()},
        "decode_step_ops": sum(sum(ops.values()) for section, ops in counts.items() if section != "mtp step"),
        "ops_by_name": {section: dict(ops.most_common()) for section, ops in table.items()},
        "times": times,
        "v3_up_projection_ms": up_proj,
    }
    line = json.dumps(result)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")


if __name__ == "__main__":
    main()
