"""The offload runtime: a planned model (layers on gpu and cpu, experts on gpu, cpu and disk,
the "gpu" being the CPU device here) gives the unplaced engine's tokens and logits; routing
statistics are recorded, saved and used by the planner.

Tolerances, measured on tiny random checkpoints (seeds 0-4, this layout):
- float schemes: exact (max |logit difference| 0.0; asserted <= 1e-5), same greedy tokens.
- q8/q4: against the unplaced engine on the same weights rounded to q8/q4 (or on the same
  localv3 quantized checkpoint), with every block matrix dequantised per call (the GPU path):
  exact as well (0.0; asserted <= 1e-5), same greedy tokens. With ggml's CPU kernels, which
  quantise activations to 8 bits, the same comparison measures 1.7-1.9% relative RMS logit
  error, except where a router's top-k choice is a near tie on these random weights and the
  noise flips it (14-25%): so the kernels are tested on their own (test_quant_kernels.py) and
  end to end on the trained tiny model (test_quantize.py), not here.
- bf16 compute on the same rounded q4/q8 weights: against the fp32 unplaced engine with the
  bf16 engine's expert choices imposed on it, at most 2.0-3.2% relative RMS logit error per
  position (seeds 0-7, bf16 on the CPU; asserted <= 6%). Left to route freely, the fp32
  reference picks other experts where a router's top-k is a near tie (0-2 of the 40 routings
  per seed: asserted at least 85% the same) and every later position differs by 21-96%; the
  rounding to q4/q8 itself moves the logits 12-32% from the unrounded fp32 weights (argmax
  agreement 0.65-0.9). Neither says anything about the bf16 path, so neither is the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import localv3
from cli import app
from localv3.checkpoint import CheckpointReader
from localv3.config import ModelConfig
from localv3.model.moe import DenseExpertBank
from kernel_paths import dequantise_products
from localv3.formats import ggml
from localv3.formats.blocks import quantize_to, quantize_weight
from localv3.formats.table import FORMATS, Q8_0
from localv3.quantize import QuantizeSettings, quantize_checkpoint
from localv3.synthetic import TINY_V3, checkpoint_tensors, write_checkpoint
from localv3.offload.banks import BankSlice, DiskExpertBank, PlacedExperts
from localv3.offload.hardware import Hardware
from localv3.offload.layout import CPU, DISK, GPU
from localv3.offload.planner import Policy, plan
from localv3.offload.quant import Quantization
from localv3.offload.routing_stats import PROFILE_FILE, RoutingStats, find_profile, load_profile, moe_layers
from localv3.offload.runtime import MIN_HIDDEN_FOR_THREADS, PlannedEngine, default_cpu_threads, load_planned
from localv3.offload.shape import ModelShape

CONTEXT = 2048  # long enough that a layer's KV rows decide which layers fit on the "GPU"
PROMPT = list(range(2, 60, 3))
FLOAT = Quantization(experts="fp32", dense="fp32", embeddings="fp32")
TIGHT = Policy(cuda_context_bytes=0, ram_reserve_bytes=0, prefill_chunk=1)


def made_up_hardware(config: ModelConfig, quant: Quantization, gpu_experts: int = 3, ram_experts: int = 12) -> Hardware:
    """A machine whose GPU holds layers 0-1, the head, the embeddings and `gpu_experts` experts,
    and whose RAM holds the other layers and `ram_experts` experts: the rest go to disk."""
    shape = ModelShape.from_config(config, "tiny")
    kv = CONTEXT * shape.kv_bytes_per_token_per_layer

    def layer(i: int) -> int:
        return sum(g.bytes(quant) for g in shape.layer_groups(i) if g.kind != "routed_expert") + kv

    expert = shape.group("routed_expert", 1).unit_bytes(quant)
    head = sum(shape.group(kind).bytes(quant) for kind in ("norm", "lm_head", "embedding"))
    gpu = layer(0) + layer(1) + head + gpu_experts * expert + shape.activation_bytes(1) + 100
    ram = layer(2) + layer(3) + ram_experts * expert + 100
    return Hardware("test", "Test GPU", gpu, gpu, 1e12, 1e14, "Test CPU", 2, ram, ram, 50e9, 1e11, 25e9, 3e9)


def planned(model_dir: Path, quant: Quantization, **kwargs):
    config = ModelConfig.from_file(model_dir)
    hardware = made_up_hardware(config, quant)
    return load_planned(
        model_dir, hardware, CONTEXT, TIGHT, quant, gpu_device="cpu", dtype=torch.float32, cpu_threads=1, **kwargs
    )


def unplaced(model_dir: Path):
    return localv3.load(model_dir, device="cpu", dtype=torch.float32)


def write_rounded_checkpoint(out: Path, quant: Quantization, seed: int = 0) -> Path:
    """TINY_V3 with every matrix the runtime quantises already rounded to its format, so the
    unplaced engine on it computes what the quantised runtime should, up to the kernels."""
    config = ModelConfig.from_dict(TINY_V3)
    tensors = checkpoint_tensors(config, seed)
    for name, weight in tensors.items():
        if "kv_b_proj" in name and FORMATS[quant.dense].quantized:
            tensors[name] = rounded_as_absorbed(weight, config)
        if weight.dim() != 2 or "_proj" not in name or "eh_proj" in name or "kv_b_proj" in name:
            continue
        fmt = FORMATS[quant.experts if ".experts." in name else quant.dense]
        if fmt.takes(tuple(weight.shape)):
            tensors[name] = quantize_weight(weight, fmt).dequantize()
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(TINY_V3))
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(out / "model.safetensors"))
    return out


def rounded_as_absorbed(kv_b: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """kv_b_proj [H*(nope+v), C] with W_UK (per head [C, nope]) and W_UV ([v, C]) rounded to the
    Q8_0 blocks the runtime holds them in, where their rows take them."""
    heads, nope, rank = config.num_attention_heads, config.qk_nope_head_dim, config.kv_lora_rank
    per_head = kv_b.view(heads, -1, rank).clone()  # [H, nope+v, C]
    uk, uv = per_head[:, :nope], per_head[:, nope:]
    if rank % Q8_0.block == 0:
        uv.copy_(quantize_to(uv.reshape(-1, rank), Q8_0).dequantize().view_as(uv))
    if nope % Q8_0.block == 0:
        rounded = quantize_to(uk.transpose(1, 2).reshape(-1, nope), Q8_0).dequantize()  # rows [C, nope]
        uk.copy_(rounded.view(heads, rank, nope).transpose(1, 2))
    return per_head.view_as(kv_b)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny-v3"), TINY_V3, dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(model_dir):
    engine = unplaced(model_dir)
    return engine, engine.logits(PROMPT), engine.generate(PROMPT, 16)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALV3_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: a second thread only waits for a busy core
    (100x slower decode under load, measured). load_planned sets 1 too (cpu_threads=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----- placement ---------------------------------------------------------------------------------
def test_the_made_up_machine_uses_every_place(model_dir):
    config = ModelConfig.from_file(model_dir)
    result = plan(ModelShape.from_config(config, "tiny"), FLOAT, made_up_hardware(config, FLOAT), CONTEXT, TIGHT)
    layout = result.layout
    assert layout.layer_devices == (GPU, GPU, CPU, CPU)  # layer 3 is the MTP layer
    assert layout.experts_on(1, GPU) and layout.experts_on(1, CPU)  # a GPU layer with experts in RAM
    assert layout.experts_on(2, CPU) and layout.experts_on(2, DISK)  # a CPU layer with experts on disk
    assert layout.experts_on(3, DISK)


def test_float_plan_matches_the_unplaced_engine_exactly(model_dir, reference):
    ref, ref_logits, ref_tokens = reference
    engine = planned(model_dir, FLOAT)
    torch.testing.assert_close(engine.logits(PROMPT), ref_logits, atol=1e-5, rtol=0)
    assert engine.generate(PROMPT, 16) == ref_tokens
    mlp = engine.model.model.layers[1].mlp
    assert mlp.shared_experts is None and isinstance(mlp.experts, PlacedExperts)
    assert [s.device.type for s in mlp.experts.slices] == ["cpu", "cpu"]  # "gpu" and cpu slices
    assert "2/4 layers on gpu" in engine.placement


def test_the_python_api_plans_and_offloads_as_the_cli_does(model_dir, reference):
    """localv3.load is the one load path: it takes the placement options and returns the
    planned engine the CLI gets, with the unplaced logits."""
    config = ModelConfig.from_file(model_dir)
    hardware = made_up_hardware(config, FLOAT)
    engine = localv3.load(
        model_dir, "cpu", torch.float32, CONTEXT, hardware=hardware, policy=TIGHT, quantization=FLOAT, cpu_threads=1
    )
    cli = planned(model_dir, FLOAT)
    assert isinstance(engine, PlannedEngine) and engine.plan.layout == cli.plan.layout
    assert engine.placement == cli.placement and "2/4 layers on gpu" in engine.placement
    torch.testing.assert_close(engine.logits(PROMPT), reference[1], atol=1e-5, rtol=0)


def test_mtp_head_matches_on_its_placed_device(model_dir, reference):
    ref = reference[0]
    engine = planned(model_dir, FLOAT)
    outputs = []
    for e in (ref, engine):
        session = e.new_session(len(PROMPT))
        session.forward(PROMPT[:-1])
        next_tokens = torch.tensor([PROMPT[1:]])
        outputs.append(e.model.mtp_forward(session.last_hidden, next_tokens, 0, session.cache)[0])
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("experts,dense", [("q8", "q8"), ("q4", "q8"), ("q4", "q4")])
def test_quantised_plan_places_the_stored_blocks_exactly(tmp_path, dequantised_products, experts, dense, seed):
    """With the kernels' arithmetic taken out (every block matrix dequantised per call, as on a
    GPU), a quantised plan computes exactly what the unplaced engine computes on the same
    rounded weights: the blocks, banks and slices are placed and wired right. The ggml kernels'
    own error (8-bit activations) is tested in test_quant_kernels.py, end to end on the trained
    tiny model in test_quantize.py."""
    quant = Quantization(experts=experts, dense=dense, embeddings="fp32")
    rounded = write_rounded_checkpoint(tmp_path / "rounded", quant, seed)
    engine, ref = planned(rounded, quant), unplaced(rounded)
    torch.testing.assert_close(engine.logits(PROMPT), ref.logits(PROMPT), atol=1e-5, rtol=0)
    assert engine.generate(PROMPT, 16) == ref.generate(PROMPT, 16)


BF16_QUANT = Quantization(experts="q4", dense="q8", embeddings="bf16")


def bf16_error_under_the_same_routing(rounded: Path, gpu_device: str) -> tuple[torch.Tensor, float]:
    """A bf16 plan of `rounded` (q4/q8 weights already rounded) against the unplaced fp32 engine
    on the same weights, with the bf16 engine's routing (expert ids and weights) imposed on the
    reference. -> (relative RMS logit difference per prompt position [T], the share of (layer,
    token) routings where the reference's own router picked the same experts)."""
    config = ModelConfig.from_file(rounded)
    engine = load_planned(
        rounded, made_up_hardware(config, BF16_QUANT), CONTEXT, TIGHT, BF16_QUANT, gpu_device=gpu_device, dtype=torch.bfloat16, cpu_threads=1
    )
    routed = {}
    for layer, moe in moe_layers(engine.model):
        moe.gate.register_forward_hook(lambda router, inputs, out, layer=layer: routed.setdefault(layer, out))
    logits = engine.logits(PROMPT)  # [T, V]
    reference = unplaced(rounded)

    same = []

    def impose(out, layer):
        indices, weights = routed[layer]  # [T, k] each: the one forward over the prompt
        assert indices.shape == out[0].shape
        same.append((indices.cpu().sort(-1).values == out[0].sort(-1).values).all(-1))  # [T]
        return indices.cpu(), weights.float().cpu()

    for layer, moe in moe_layers(reference.model):
        moe.gate.register_forward_hook(lambda router, inputs, out, layer=layer: impose(out, layer))
    expected = reference.logits(PROMPT)  # [T, V]
    error = (logits - expected).pow(2).mean(-1).sqrt() / expected.pow(2).mean(-1).sqrt()
    return error, torch.cat(same).float().mean().item()


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_bf16_plan_matches_the_fp32_reference_under_the_same_routing(tmp_path, dequantised_products, seed):
    rounded = write_rounded_checkpoint(tmp_path / "rounded", Quantization(experts="q4", dense="q8", embeddings="fp32"), seed)
    error, same_routing = bf16_error_under_the_same_routing(rounded, "cpu")
    assert error.max() <= 0.06 and same_routing >= 0.85


def test_localv3_quantized_checkpoint_is_placed_as_stored(tmp_path, model_dir, monkeypatch):
    target = tmp_path / "tiny-q4"
    quantize_checkpoint(model_dir, target, QuantizeSettings(experts="q4", dense="q8"), {"model": "tiny"})
    dequantise_products(monkeypatch)  # exact arithmetic, as above
    engine = planned(target, Quantization(experts="q4", dense="q8", embeddings="fp32"))
    assert engine.plan.layout.experts_on(2, DISK)  # disk experts dequantise the stored q4 per use
    assert engine.model.model.layers[1].mlp.experts.slices[0].bank.gate_up.block_type.name == "q4_0"
    ref = unplaced(target)
    torch.testing.assert_close(engine.logits(PROMPT), ref.logits(PROMPT), atol=1e-5, rtol=0)


def test_disk_experts_are_read_per_use(model_dir):
    engine = planned(model_dir, FLOAT)
    disk = [s for s in engine.model.mtp[0].block.mlp.experts.slices if isinstance(s.bank, DiskExpertBank)]
    assert len(disk) == 1 and disk[0].bank.expert_ids == list(range(8))
    assert not list(disk[0].bank.parameters()) and not list(disk[0].bank.buffers())
    reads = []
    reader = disk[0].bank.reader
    original = reader.get
    reader.get = lambda name, *args: reads.append(name) or original(name, *args)
    x = torch.randn(3, 64)
    disk[0](x, torch.tensor([[0, 5], [5, 6], [1, 0]]), torch.ones(3, 2))
    assert len(reads) == 3 * 4  # experts 0, 1, 5, 6: gate, up and down each, read on use


def test_slices_and_shared_expert_sum_like_one_bank():
    torch.manual_seed(0)
    n, dim, hidden, tokens = 8, 16, 8, 5
    whole = DenseExpertBank(n, dim, hidden)
    torch.nn.init.normal_(whole.gate_up, std=0.3)
    torch.nn.init.normal_(whole.down, std=0.3)
    parts = ([1, 4, 6], [0, 2, 3, 5, 7])
    slices = []
    for ids in parts:
        bank = DenseExpertBank(len(ids), dim, hidden)
        bank.gate_up.data.copy_(whole.gate_up.data[ids])
        bank.down.data.copy_(whole.down.data[ids])
        slices.append(BankSlice(bank, ids, n, "cpu"))
    shared = torch.nn.Linear(dim, dim)
    x = torch.randn(tokens, dim)
    indices = torch.stack([torch.randperm(n)[:3] for _ in range(tokens)])
    weights = torch.rand(tokens, 3)
    with torch.no_grad():
        expected = whole(x, indices, weights) + shared(x)
        torch.testing.assert_close(PlacedExperts(slices, shared)(x, indices, weights), expected, atol=1e-6, rtol=0)
        untouched = torch.tensor([[1, 4], [6, 1]])  # tokens routed only to the first slice's experts
        assert torch.equal(slices[1](x[:2], untouched, weights[:2, :2]), torch.zeros(2, dim))


# ----- routing statistics ----------------------------------------------------------------------
def test_routing_is_recorded_saved_and_resumed(tmp_path):
    model_dir = write_checkpoint(tmp_path / "model", TINY_V3, dtype=torch.float32)
    engine = planned(model_dir, FLOAT, record_routing=True)
    engine.generate(PROMPT, 6, speculative=False)
    assert not (model_dir / PROFILE_FILE).exists()  # the model's directory is left as it was
    saved = load_profile(find_profile(model_dir))
    assert sorted(saved) == [1, 2]  # plain decoding never runs the MTP layer (3)
    tokens = len(PROMPT) + 5  # the prompt, then each generated token but the last is fed back
    assert sum(saved[1]) == sum(saved[2]) == tokens * TINY_V3["num_experts_per_tok"]

    again = planned(model_dir, FLOAT, record_routing=True)  # resumes from the saved counts
    again.generate(PROMPT, 6, speculative=False)
    assert load_profile(find_profile(model_dir))[1] == [2 * c for c in saved[1]]
    again.generate(PROMPT, 6, speculative=True)  # MTP drafting routes too, beside its own expert counter
    assert sorted(load_profile(find_profile(model_dir))) == [1, 2, 3]


def test_profile_of_a_hub_snapshot_is_named_after_its_repository(tmp_path):
    model_dir = tmp_path / "models--owner--tiny" / "snapshots" / "abc123"
    write_checkpoint(model_dir, TINY_V3, dtype=torch.float32)
    stats = RoutingStats(8)
    stats.record(1, torch.tensor([[0, 3], [3, 7]]))
    path = stats.save(model_dir)
    assert path == tmp_path / "home" / "profiles" / "models--owner--tiny.json"
    assert find_profile(model_dir) == path
    assert load_profile(path) == {1: [1, 0, 0, 2, 0, 0, 0, 1]}


def test_planner_puts_the_recorded_hottest_experts_on_the_gpu(tmp_path):
    model_dir = write_checkpoint(tmp_path / "model", TINY_V3, dtype=torch.float32)
    stats = RoutingStats(8)
    stats.record(1, torch.tensor([[6, 2]] * 5))  # layer 1 uses only experts 2 and 6
    stats.save(model_dir)
    engine = planned(model_dir, FLOAT)  # room for 3 experts on the "GPU"
    layout = engine.plan.layout
    assert layout.experts_on(1, GPU) == [2, 6]
    assert layout.experts_on(2, GPU) == [0]  # unrecorded layer 2 is uniform: hotter than layer 1's rest
    assert engine.model.model.layers[1].mlp.experts.slices[0].expert_ids == [2, 6]


def test_plan_command_uses_the_models_profile(tmp_path):
    model_dir = write_checkpoint(tmp_path / "model", TINY_V3, dtype=torch.float32)
    config = str(model_dir / "config.json")
    args = ["plan", config, "--profile", "cpu-only", "--gpu-mem", "2GiB", "--gpu-experts", "2", "--json"]

    def gpu_experts(*extra: str) -> list[int]:
        result = CliRunner().invoke(app, args + list(extra))
        assert result.exit_code == 0, result.output
        groups = json.loads(result.stdout)["groups"]
        layer_2 = [g for g in groups if g["kind"] == "routed_expert" and g["layer"] == 2]
        return next(g["experts"] for g in layer_2 if g["device"] == GPU)

    assert gpu_experts() == [0, 1]  # uniform
    stats = RoutingStats(8)
    stats.record(2, torch.tensor([[4, 7], [4, 7], [4, 3]]))
    stats.save(model_dir)
    assert gpu_experts() == [4, 7]
    other = RoutingStats(8)
    other.record(2, torch.tensor([[5, 6]]))
    assert gpu_experts("--routing-profile", str(other.save(tmp_path / "elsewhere"))) == [5, 6]


# ----- CUDA: the real GPU, pinned staging and the overlapped host experts -------------------------
@pytest.mark.gpu
def test_cuda_plan_overlaps_host_experts_and_matches(model_dir, reference):
    ref, ref_logits, ref_tokens = reference
    config = ModelConfig.from_file(model_dir)
    engine = load_planned(
        model_dir, made_up_hardware(config, FLOAT), CONTEXT, TIGHT, FLOAT, gpu_device="cuda", dtype=torch.float32
    )
    torch.testing.assert_close(engine.logits(PROMPT), ref_logits, atol=1e-4, rtol=1e-4)
    assert engine.generate(PROMPT, 16) == ref_tokens
    experts = engine.model.model.layers[1].mlp.experts  # a CUDA layer with experts in RAM
    assert experts.slices[0].device.type == "cuda" and experts.shared.gate_proj.weight.is_cuda
    assert experts.stage.buffers and all(b.is_pinned() for b in experts.stage.buffers.values())


@pytest.mark.gpu
def test_cuda_bf16_default_dtype_and_kv_rows_per_layer(model_dir):
    config = ModelConfig.from_file(model_dir)
    engine = load_planned(model_dir, made_up_hardware(config, BF16_QUANT), CONTEXT, TIGHT, BF16_QUANT, gpu_device="cuda")
    assert engine.dtype == torch.bfloat16
    cache = engine.new_session(8).cache
    assert [t.device.type for t in cache.latent] == ["cuda", "cuda", "cpu", "cpu"]


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_cuda_bf16_plan_matches_the_fp32_reference_under_the_same_routing(tmp_path, dequantised_products, seed):
    """The bound measured with bf16 on the CPU (module docstring): cuBLAS accumulates bf16 products
    in fp32 as the CPU does; not yet measured on a GPU."""
    rounded = write_rounded_checkpoint(tmp_path / "rounded", Quantization(experts="q4", dense="q8", embeddings="fp32"), seed)
    error, same_routing = bf16_error_under_the_same_routing(rounded, "cuda")
    assert error.max() <= 0.06 and same_routing >= 0.85


@pytest.mark.parametrize("mtp_speedup, expected", [(1.4, True), (0.8, False)])
def test_mtp_is_on_by_default_only_where_the_plan_says_it_pays(model_dir, mtp_speedup, expected):
    from dataclasses import replace

    from localv3.generate import plain_steps

    engine = planned(model_dir, FLOAT)
    predicted = engine.plan.predicted
    engine.plan = replace(engine.plan, predicted=replace(predicted, mtp_decode_tok_s=predicted.decode_tok_s * mtp_speedup))
    assert (engine.step_strategy(None) is not plain_steps) is expected
    assert engine.step_strategy(False) is plain_steps  # an explicit choice wins


def test_small_models_decode_on_one_thread(monkeypatch):
    monkeypatch.setattr("psutil.cpu_count", lambda logical=True: 16)
    small = ModelConfig.from_dict(TINY_V3)
    large = ModelConfig.from_dict({**TINY_V3, "hidden_size": MIN_HIDDEN_FOR_THREADS})
    assert (default_cpu_threads(small), default_cpu_threads(large)) == (1, 16)


@pytest.mark.skipif(not ggml.available(), reason="needs llama-cpp-python's ggml")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_bf16_lm_head_is_held_in_bf16_on_the_cpu(tmp_path, seed):
    """A checkpoint storing lm_head and the embedding table in bf16, computed in float32 on the
    CPU: both keep their two bytes per weight (what the plan sizes); the table's rows are its
    stored values, widened; the head gives the logits of its stored weights to within ggml's
    rounding of the activations to bf16."""
    model_dir = write_checkpoint(tmp_path, TINY_V3, seed=seed, dtype=torch.bfloat16)
    engine = localv3.load(model_dir, device="cpu", dtype=torch.float32, cpu_threads=1)
    head, table = engine.model.lm_head, engine.model.model.embed_tokens
    config = engine.config
    assert sum(t.nbytes for t in head.buffers()) == config.vocab_size * config.hidden_size * 2
    assert table.weight.dtype == torch.bfloat16 and engine.dtype == engine.model.compute_dtype == torch.float32
    stored_table = CheckpointReader(model_dir).get("model.embed_tokens.weight", torch.float32)
    assert torch.equal(table(torch.tensor(PROMPT)), stored_table[PROMPT])
    session = engine.new_session(len(PROMPT))
    logits = session.forward(PROMPT)  # [S, V]
    with torch.inference_mode():
        hidden = engine.model.hidden_states(torch.tensor([PROMPT]), 0, engine.model.new_cache(len(PROMPT)))  # [1, S, D]
    stored = CheckpointReader(model_dir).get("lm_head.weight", torch.float32)  # bf16 values
    expected = hidden[0] @ stored.T  # [S, V]
    assert ((logits - expected).abs().max() / expected.abs().max()).item() < 0.01
