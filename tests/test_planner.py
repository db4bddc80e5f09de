"""The offload planner: shapes from config.json, sizes under each quantisation, placement,
overrides, refusals, and the roofline, checked against published figures; stated hardware
against the named profiles; a file's own tensor formats; what would change a plan."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from localv3.config import ConfigError, ModelConfig
from localv3.offload.hardware import Hardware, hardware_from_profile
from localv3.offload.profiles import load_profiles
from localv3.offload.stated import StatedHardware, stated_machine
from localv3.offload.layout import CPU, DISK, GPU
from localv3.offload.planner import Fix, Plan, PlanError, Policy, expert_probabilities, plan
from localv3.formats.table import QuantError
from localv3.offload.quant import Quantization, scheme
from localv3.offload.roofline import FixedCosts
from localv3.offload.shape import ModelShape

GiB = 2**30
CONFIGS = Path(__file__).resolve().parents[1] / "localv3" / "assets" / "configs"
KINDS = {"embedding", "attention", "dense_ffn", "shared_expert", "routed_expert", "router", "norm", "lm_head", "mtp", "kv_cache"}


def shape_of(name: str) -> ModelShape:
    return ModelShape.from_config(ModelConfig.from_file(CONFIGS / f"{name}.json"), name)


@pytest.fixture(scope="module")
def v3() -> ModelShape:
    return shape_of("deepseek-v3")


@pytest.fixture(scope="module")
def moonlight() -> ModelShape:
    return shape_of("moonlight-16b-a3b-instruct")


def machine(profile: str = "rtx4090-epyc-12ch", **stated) -> Hardware:
    return StatedHardware(**stated).apply(hardware_from_profile(profile))


def made_up(gpu_gib: float, ram_gib: float, cpu_bw: float = 300e9, gpu_bw: float = 1000e9) -> Hardware:
    """A machine that exists only in this test."""
    return Hardware(
        source="test",
        gpu_name="Test GPU" if gpu_gib else None,
        gpu_mem_bytes=int(gpu_gib * GiB),
        gpu_free_bytes=int(gpu_gib * GiB),
        gpu_bw=gpu_bw,
        gpu_flops=100e12,
        cpu_name="Test CPU",
        physical_cores=32,
        ram_bytes=int(ram_gib * GiB),
        ram_available_bytes=int(ram_gib * GiB),
        cpu_bw=cpu_bw,
        cpu_flops=4e12,
        pcie_bw=25e9 if gpu_gib else 0.0,
        disk_bw=7e9,
    )


def resident_devices(p: Plan) -> set[str]:
    return {g.device for g in p.groups if g.kind != "routed_expert"}


# ----- shapes and sizes ------------------------------------------------------------------------
def test_v3_shape_matches_the_published_parameter_counts(v3):
    main = sum(g.elements for g in v3.groups if not v3.is_mtp_layer(g.layer))
    mtp = v3.total_elements - main
    assert main / 1e9 == pytest.approx(671.0, abs=0.1)
    # DeepSeek reports 14B for the MTP module including its own copies of embed_tokens and the head
    shared_copies = v3.group("embedding").elements + v3.group("lm_head").elements
    assert (mtp + shared_copies) / 1e9 == pytest.approx(13.5, abs=0.6)
    assert len(v3.moe_layers) == 58 + 1 and v3.group("routed_expert", 3).count == 256
    assert v3.group("dense_ffn", 2) is not None and v3.group("dense_ffn", 3) is None
    assert v3.kv_bytes_per_token_per_layer * v3.num_layers == 70_272  # 61 layers x (512 + 64) bf16 values


@pytest.mark.parametrize(
    "name, billions", [("kimi-k2-instruct", 1026.4), ("moonlight-16b-a3b-instruct", 15.96), ("deepseek-v2-lite-chat", 15.71)]
)
def test_other_shipped_configs_give_their_published_sizes(name, billions):
    assert shape_of(name).total_elements / 1e9 == pytest.approx(billions, abs=0.05)


def test_v2_lite_has_no_q_lora_and_no_correction_bias():
    s = shape_of("deepseek-v2-lite-chat")
    attention = {t.name for t in s.group("attention", 0).tensors}
    assert "q_proj.weight" in attention and "q_a_proj.weight" not in attention
    assert [t.name for t in s.group("router", 1).tensors] == ["gate.weight"]


def test_bytes_per_weight_of_each_scheme():
    rows, cols = 2048, 7168
    assert scheme("bf16").matrix_bytes(rows, cols) == 2 * rows * cols
    assert scheme("fp32").matrix_bytes(rows, cols) == 4 * rows * cols
    assert scheme("q8").matrix_bytes(rows, cols) == rows * cols // 32 * 34  # Q8_0: 34 bytes per 32
    assert scheme("q4").matrix_bytes(rows, cols) == rows * cols // 256 * 144  # Q4_K: 144 bytes per 256
    assert scheme("q4").matrix_bytes(rows, 96) == rows * 96 // 32 * 18  # Q4_0 where 256 does not divide
    assert scheme("fp8").matrix_bytes(rows, cols) == rows * cols + 16 * 56 * 4
    assert scheme("q4").bits_per_weight == 4.5 and scheme("q8").bits_per_weight == 8.5
    assert scheme("fp8").matrix_bytes(129, 130) == 129 * 130 + 2 * 2 * 4  # partial edge blocks
    assert scheme("q4").matrix_bytes(1, 33) == 33 * 2  # no block type divides 33: held in bf16


def test_routed_expert_bytes_follow_the_experts_scheme(v3):
    experts = v3.group("routed_expert", 10)
    elements = 3 * 7168 * 2048
    assert experts.unit_elements == elements
    assert experts.unit_bytes(Quantization(experts="q4")) == elements * 4.5 / 8
    assert experts.bytes(Quantization(experts="bf16")) == 256 * 2 * elements
    router = v3.group("router", 10)
    assert router.bytes(Quantization(dense="q4")) == 4 * (256 * 7168 + 256)  # fp32 whatever the dense scheme


def test_unknown_quantisation_names_the_choices():
    with pytest.raises(QuantError, match="q4"):
        Quantization(experts="int3")


# ----- reality checks ------------------------------------------------------------------------
def test_v3_q4_on_24gib_and_512gib_keeps_non_experts_and_a_useful_context_on_gpu(v3):
    p = plan(v3, Quantization(experts="q4"), machine(ram=512 * GiB), context=8192)
    assert resident_devices(p) == {GPU}
    assert p.kv_cache.device_bytes == {GPU: p.kv_cache.bytes} and p.kv_cache.max_context >= 32768
    assert p.layout.count_experts(DISK) == 0
    assert p.layout.count_experts(CPU) > 0.95 * 59 * 256  # spare VRAM takes a few hot ones
    gpu = p.device(GPU)
    assert gpu.used_bytes + gpu.reserved_bytes <= gpu.capacity_bytes
    every_expert_in_ram = plan(v3, Quantization(experts="q4"), machine(ram=512 * GiB), 8192, Policy(cpu_moe=True))
    assert every_expert_in_ram.layout.count_experts(CPU) == 59 * 256
    assert resident_devices(every_expert_in_ram) == {GPU}


@pytest.mark.parametrize("name", ["moonlight-16b-a3b-instruct", "deepseek-v2-lite-chat"])
def test_small_moe_models_in_q4_need_no_offload_on_24gib(name):
    p = plan(shape_of(name), Quantization(experts="q4"), machine(ram=64 * GiB), context=8192)
    assert {g.device for g in p.groups} == {GPU}
    assert p.predicted.bottleneck.startswith("GPU")


@pytest.mark.parametrize("name", ["moonlight-16b-a3b-instruct", "deepseek-v2-lite-chat"])
def test_small_moe_models_in_q4_offload_experts_on_8gib_and_32gib(name):
    p = plan(shape_of(name), Quantization(experts="q4"), made_up(gpu_gib=8, ram_gib=32), context=8192)
    assert resident_devices(p) == {GPU}
    assert 0 < p.layout.count_experts(CPU) < 26 * 64 and p.layout.count_experts(GPU) > 0
    assert p.layout.count_experts(DISK) == 0


def test_v3_on_256gib_spills_the_coldest_experts_to_disk_and_says_what_it_costs(v3):
    p = plan(v3, Quantization(), machine(ram=256 * GiB), context=8192)
    assert resident_devices(p) == {GPU}
    spilled = p.layout.count_experts(DISK)
    assert spilled > 0 and p.device(DISK).used_bytes > 50 * GiB
    assert p.layout.expert_devices[61].count(DISK) == 256  # the MTP experts are the coldest
    assert p.predicted.decode_tok_s < p.predicted.decode_tok_s_all_in_ram / 5
    assert p.predicted.bottleneck == "disk reads"
    assert any(f"{spilled} routed experts" in note and "more RAM" in note for note in p.notes)
    ram = p.device(CPU)
    assert ram.used_bytes + ram.reserved_bytes <= ram.capacity_bytes


def test_cpu_only_places_everything_on_the_cpu(v3):
    p = plan(v3, Quantization(), hardware_from_profile("cpu-only"), context=4096)
    assert {g.device for g in p.groups} == {CPU}
    assert [d.name for d in p.devices] == [CPU]
    assert p.predicted.bottleneck.startswith("CPU") and "PCIe transfers" not in p.predicted.decode_seconds


def test_a_gpu_too_small_for_the_non_expert_weights_runs_some_layers_on_the_cpu(v3):
    p = plan(v3, Quantization(), machine("rtx4060ti-desktop", gpu_mem=8 * GiB, ram=512 * GiB), context=4096)
    layers = p.layout.layer_devices
    assert GPU in layers and CPU in layers
    assert any("run attention on the CPU" in note for note in p.notes)
    for g in p.groups:  # a layer's parts and its cache rows share the layer's device
        if g.layer is not None and g.kind != "routed_expert":
            assert g.device == layers[g.layer]


# ----- placement details -------------------------------------------------------------------------
def test_uniform_hot_experts_fill_whole_layers_in_order(moonlight):
    p = plan(moonlight, Quantization(), made_up(gpu_gib=8, ram_gib=32), context=4096)
    gpu_layers = [layer for layer, d in p.layout.expert_devices.items() if GPU in d]
    assert gpu_layers == list(range(1, 1 + len(gpu_layers)))
    assert all(set(p.layout.expert_devices[layer]) == {GPU} for layer in gpu_layers[:-1])


def test_a_routing_profile_puts_the_hottest_experts_on_the_gpu(moonlight):
    counts = [1] * 64
    counts[5], counts[7] = 500, 400
    policy = Policy(gpu_experts=2, routing_profile={1: counts})
    p = plan(moonlight, Quantization(), made_up(gpu_gib=8, ram_gib=32), 4096, policy)
    assert p.layout.experts_on(1, GPU) == [5, 7]
    assert all(len(p.layout.experts_on(layer, GPU)) == 2 for layer in p.layout.expert_devices)
    profiled = plan(moonlight, Quantization(), machine(gpu_mem=int(3.1 * GiB), ram=32 * GiB), 1024,
                    Policy(routing_profile={20: counts}))
    assert set(profiled.layout.experts_on(20, GPU)) >= {5, 7}  # hotter than any uniform expert


def test_routing_profile_probabilities():
    s = shape_of("moonlight-16b-a3b-instruct")
    probabilities = expert_probabilities(s, {"2": [3] + [1] * 63})
    assert sum(probabilities[2]) == pytest.approx(6.0) and probabilities[2][0] == pytest.approx(3 * probabilities[2][1])
    assert probabilities[3] == [6 / 64] * 64
    with pytest.raises(PlanError, match="64 non-negative counts"):
        expert_probabilities(s, {2: [1, 2, 3]})


def test_cpu_moe_keeps_every_expert_off_the_gpu(moonlight):
    p = plan(moonlight, Quantization(), machine(ram=64 * GiB), 4096, Policy(cpu_moe=True))
    assert p.layout.count_experts(GPU) == 0 and p.layout.count_experts(CPU) == 26 * 64


def test_n_cpu_moe_keeps_the_first_layers_experts_in_ram(moonlight):
    p = plan(moonlight, Quantization(), machine(ram=64 * GiB), 4096, Policy(n_cpu_moe=20))
    for layer, devices in p.layout.expert_devices.items():
        assert set(devices) == ({CPU} if layer < 20 else {GPU})


def test_n_cpu_moe_that_does_not_fit_names_the_smallest_that_does(moonlight):
    hardware = made_up(gpu_gib=8, ram_gib=32)
    with pytest.raises(PlanError) as error:
        plan(moonlight, Quantization(), hardware, 4096, Policy(n_cpu_moe=1))
    assert error.value.fix.setting == "n_cpu_moe"
    fit = error.value.fix.value
    assert "does not fit" in str(error.value) and str(error.value).endswith(f"the smallest change that fits: n_cpu_moe {fit}") and fit > 1
    plan(moonlight, Quantization(), hardware, 4096, Policy(n_cpu_moe=fit))
    with pytest.raises(PlanError):
        plan(moonlight, Quantization(), hardware, 4096, Policy(n_cpu_moe=fit - 1))


def test_gpu_experts_that_do_not_fit_names_the_largest_that_does(moonlight):
    hardware = made_up(gpu_gib=8, ram_gib=32)
    with pytest.raises(PlanError) as error:
        plan(moonlight, Quantization(), hardware, 4096, Policy(gpu_experts=64))
    assert error.value.fix.setting == "gpu_experts"
    fit = error.value.fix.value
    assert 0 < fit < 64
    assert plan(moonlight, Quantization(), hardware, 4096, Policy(gpu_experts=fit)).layout.count_experts(GPU) == 26 * fit


@pytest.mark.parametrize(
    "policy, hardware, match",
    [
        (Policy(cpu_moe=True, n_cpu_moe=3), "rtx4090-epyc-12ch", "contradict"),
        (Policy(n_cpu_moe=3, gpu_experts=2), "rtx4090-epyc-12ch", "contradict"),
        (Policy(gpu_experts=65), "rtx4090-epyc-12ch", "64 experts per layer"),
        (Policy(n_cpu_moe=-1), "rtx4090-epyc-12ch", "negative"),
        (Policy(gpu_experts=4), "cpu-only", "no GPU"),
    ],
)
def test_contradictory_requests_are_refused(moonlight, policy, hardware, match):
    with pytest.raises(PlanError, match=match):
        plan(moonlight, Quantization(), hardware_from_profile(hardware), 4096, policy)


def test_a_context_beyond_the_model_is_refused(moonlight):
    with pytest.raises(PlanError, match=r"^context 16384: longer than moonlight-16b-a3b-instruct supports") as error:
        plan(moonlight, Quantization(), machine(), 16384)
    assert error.value.fix == Fix("context", 8192)
    assert error.value.render({"context": "--ctx"}).startswith("--ctx 16384: longer than")


@pytest.mark.parametrize("field", ["tie_word_embeddings", "attention_bias"])
def test_a_config_the_engine_cannot_load_is_not_planned_either(field):
    """The planner reads the same validated config as the loader: no plan for a model that
    would then be refused at load."""
    config = json.loads((CONFIGS / "moonlight-16b-a3b-instruct.json").read_text())
    with pytest.raises(ConfigError, match=rf"^moonlight.json: {field} true is not supported"):
        ModelConfig.from_dict({**config, field: True}, source="moonlight.json")


def test_leaving_out_mtp_drops_its_groups_and_cache_row(v3):
    with_mtp = plan(v3, Quantization(), machine(ram=512 * GiB), 4096)
    without = plan(v3, Quantization(), machine(ram=512 * GiB), 4096, Policy(include_mtp=False))
    assert len(with_mtp.layout.layer_devices) == 62 and len(without.layout.layer_devices) == 61
    assert not [g for g in without.groups if g.layer == 61] and 61 not in without.layout.expert_devices
    assert without.kv_cache.bytes_per_token == 70_272 and without.predicted.mtp_decode_tok_s is None
    assert with_mtp.predicted.mtp_decode_tok_s > 0


# ----- refusals ----------------------------------------------------------------------------------
def test_a_context_too_long_for_ram_is_refused_with_the_longest_that_fits(v3):
    hardware = machine("cpu-only", ram=32 * GiB)
    with pytest.raises(PlanError) as error:
        plan(v3, Quantization(), hardware, 163840)
    message = str(error.value)
    assert message.startswith("deepseek-v3 does not fit: ") and "KV cache for 163840 tokens" in message
    assert "more RAM" in message and error.value.more_ram > 0 and error.value.fix.setting == "context"
    longest = error.value.fix.value
    assert f"the smallest change that fits: a context of {longest:,} tokens (or " in message
    assert f"--context {longest} (or " in error.value.render({"context": "--context"})
    assert 16384 < longest < 163840
    assert plan(v3, Quantization(), hardware, longest).kv_cache.context == longest
    with pytest.raises(PlanError):
        plan(v3, Quantization(), hardware, longest + 1)


def test_weights_too_big_for_ram_suggest_a_lower_quantisation(v3):
    with pytest.raises(PlanError, match=r"the smallest change that fits: dense in q8 \(or [\d.]+ GiB more RAM\)") as error:
        plan(v3, Quantization(dense="bf16"), machine("cpu-only", ram=32 * GiB), 4096)
    assert error.value.fix == Fix("dense", "q8")
    assert re.search(r"fits: --dense q8 \(or [\d.]+ GiB more RAM\)$", error.value.render({"dense": "--dense"}))


def test_experts_barred_from_disk_suggest_the_quantisation_that_fits(v3):
    with pytest.raises(PlanError, match=r"experts may not be read from disk; the smallest change that fits: experts in q4") as error:
        plan(v3, Quantization(experts="bf16"), machine(ram=512 * GiB), 4096, Policy(allow_disk=False))
    assert error.value.fix == Fix("experts", "q4")
    with pytest.raises(PlanError, match=r"the smallest change that fits: experts spilling to disk") as error:
        plan(v3, Quantization(), machine(ram=128 * GiB), 4096, Policy(allow_disk=False))
    assert error.value.fix == Fix("allow_disk", True)


# ----- the roofline ------------------------------------------------------------------------------
def test_cpu_decode_is_bytes_read_over_bandwidth_when_nothing_else_costs(moonlight):
    """With fixed costs off and compute plentiful, a token costs exactly the bytes it reads, each
    scheme's bytes at the rate its CPU kernels stream at (assumed fractions of the bandwidth
    here: the hardware is made up, not measured)."""
    hardware = made_up(gpu_gib=0, ram_gib=64, cpu_bw=100e9)
    hardware = Hardware(**{**hardware.__dict__, "cpu_flops": 1e18})
    quant = Quantization()
    context = 1000
    p = plan(moonlight, quant, hardware, context, Policy(costs=FixedCosts(0.0, 0.0, 0.0)))
    s = moonlight
    bandwidth = 100e9 * hardware.achievable.cpu_bw
    assert hardware.kernels.read_rate("q4", bandwidth) == 0.65 * bandwidth  # documented assumptions
    assert hardware.kernels.read_rate("bf16", bandwidth) == bandwidth

    def seconds(tensors) -> float:
        return sum(
            count * quant.scheme_for(t.role).tensor_bytes(t.shape) / hardware.kernels.read_rate(quant.scheme_for(t.role).name, bandwidth)
            for count, t in tensors
        )

    resident = [(1, t) for g in s.groups if g.kind not in ("routed_expert", "embedding") for t in g.tensors]
    experts = [(s.experts_per_token, t) for layer in s.moe_layers for t in s.group("routed_expert", layer).tensors]
    kv = context * s.kv_bytes_per_token_per_layer * s.num_layers
    expected_s = seconds(resident) + seconds(experts) + kv / bandwidth
    assert 1 / p.predicted.decode_tok_s == pytest.approx(expected_s, rel=1e-9)
    assert p.predicted.decode_seconds == {"CPU memory bandwidth": pytest.approx(expected_s)}


def test_cpu_prefill_is_flops_over_compute_when_bandwidth_is_plentiful(moonlight):
    """Moonlight on a CPU-only machine stated as 4 TFLOP/s with unlimited memory bandwidth and
    no fixed costs: a 512-token prefill chunk (256 keys on average, context 4096) costs
    its FLOPs over the CPU's rates, counted here from config.json by hand. The achievable
    fraction halves the FLOP/s (F = 2e12); ggml's q8/q4 products are assumed at 2F, float
    tensors run at F."""
    hardware = made_up(gpu_gib=0, ram_gib=64, cpu_bw=1e18)
    p = plan(moonlight, Quantization(), hardware, 4096, Policy(costs=FixedCosts(0.0, 0.0, 0.0)))
    flops = 2e12
    assert hardware.effective("cpu_flops") == flops
    assert hardware.kernels.flop_rate("q8", flops) == hardware.kernels.flop_rate("q4", flops, experts=True) == 2 * flops
    tokens, cached, layers, moe_layers = 512, 256, 27, 26  # first_k_dense_replace = 1
    hidden, heads, rank, rope, vocab = 2048, 16, 512, 64, 163840
    attention = heads * 192 * hidden + (rank + rope) * hidden + heads * 256 * rank + hidden * hidden  # q, kv_a, kv_b, o (q8)
    dense_ffn = 3 * 11264 * hidden  # layer 0 (q8)
    shared = 3 * 2 * 1408 * hidden  # two shared experts per MoE layer (q8)
    routed = 6 * 3 * 1408 * hidden  # the 6 experts a token picks (q4)
    vectors = 2 * hidden + rank  # the layer's two RMSNorms and the latent's (float)
    router = 64 * hidden + 64  # fp32
    # naive MLA over the cached rows (the cheaper path for a chunk, float): kv_b expands every
    # key's latent instead of mapping every query (which `attention` counts), then 192-deep
    # scores and 128-wide values
    expansion = heads * (cached * rank * 256 + tokens * cached * (128 + rope + 128) - tokens * rank * 256)
    quantized = layers * attention + dense_ffn + moe_layers * (shared + routed)  # multiply-adds per token
    floats = layers * vectors + moe_layers * router
    head = 2 * (vocab * hidden + hidden) / flops  # logits of the last token only (bf16)
    seconds = tokens * (2 * quantized / (2 * flops) + 2 * floats / flops) + layers * 2 * expansion / flops + head
    assert p.predicted.prefill_chunk == tokens
    assert p.predicted.prefill_tok_s == pytest.approx(tokens / seconds, rel=1e-9)


def test_v3_predictions_land_near_published_results(v3):
    """Published runs: an EPYC 9654 (12x DDR5-4800) with a 4090 decodes V3 Q4 at ~14 tok/s (1K
    context); one Xeon socket (8x DDR5-4800) with KTransformers at 8.7 tok/s."""
    epyc = plan(v3, Quantization(), machine(ram=512 * GiB), 1024).predicted
    xeon = plan(v3, Quantization(), machine("rtx4090-xeon-8ch"), 1024).predicted
    assert 10 < epyc.decode_tok_s < 25 and epyc.bottleneck == "CPU memory bandwidth"
    assert 7 < xeon.decode_tok_s < epyc.decode_tok_s
    longer = plan(v3, Quantization(), machine(ram=512 * GiB), 32768).predicted
    assert longer.decode_tok_s < epyc.decode_tok_s  # attention reads the longer cache


def test_mtp_speculation_pays_on_the_gpu_and_is_modelled_honestly_on_the_cpu(v3):
    p = plan(v3, Quantization(), machine(ram=512 * GiB), 4096).predicted
    # verifying two tokens reads nearly twice the CPU experts: the gain is far below 1 + acceptance
    assert p.decode_tok_s < p.mtp_decode_tok_s < p.decode_tok_s * 1.4


# ----- the plan as data ----------------------------------------------------------------------------
def test_plan_dict_has_every_figure_and_is_json(v3):
    p = plan(v3, Quantization(), machine(ram=256 * GiB), 4096)
    data = json.loads(json.dumps(p.to_dict()))
    assert {"devices", "groups", "kv_cache", "predicted"} <= set(data)
    assert {d["name"] for d in data["devices"]} == {GPU, CPU, DISK}
    for d in data["devices"]:
        assert {"name", "capacity_bytes", "used_bytes"} <= set(d)
    for g in data["groups"]:
        assert {"name", "kind", "layer", "device", "bytes"} <= set(g) and g["kind"] in KINDS
    assert {g["kind"] for g in data["groups"]} == KINDS
    assert {"bytes_per_token", "max_context"} <= set(data["kv_cache"])
    assert {"decode_tok_s", "prefill_tok_s", "bottleneck", "decode_ms_per_token_by_component"} <= set(data["predicted"])
    assert data["parameters"] == p.parameters.to_dict() and set(data["bits_per_weight"]) == {"experts", "dense", "embeddings"}
    experts = [g for g in data["groups"] if g["kind"] == "routed_expert" and g["layer"] == 30]
    assert sorted(e for g in experts for e in g["experts"]) == list(range(256))
    total = sum(g["bytes"] for g in data["groups"])
    assert total == sum(d["used_bytes"] for d in data["devices"])


def test_layout_tells_the_runtime_where_each_expert_lives(v3):
    p = plan(v3, Quantization(), machine(ram=512 * GiB), 4096)
    assert set(p.layout.expert_devices) == set(range(3, 62))
    assert all(len(devices) == 256 for devices in p.layout.expert_devices.values())
    assert p.layout.experts_on(3, GPU) == list(range(len(p.layout.experts_on(3, GPU))))
    assert p.layout.head_device == GPU and p.layout.embedding_device == GPU


# ----- stated hardware is planned as the hardware it states ---------------------------------------
def own_figures(name: str) -> StatedHardware:
    """What a user writes to describe the profile's machine by its figures."""
    p = hardware_from_profile(name)
    return StatedHardware(
        gpu_mem=p.gpu_mem_bytes, ram=p.ram_bytes, cpu_bw=p.cpu_bw, cores=p.physical_cores,
        gpu_bw=p.gpu_bw if p.has_gpu else None, pcie=p.pcie_bw if p.has_gpu else None,
    )  # fmt: skip


@pytest.mark.parametrize("name", sorted(load_profiles().machines))
@pytest.mark.parametrize("model", ["deepseek-v3", "moonlight-16b-a3b-instruct"])
def test_stating_a_profiles_own_figures_predicts_what_the_profile_does(name, model):
    shape = shape_of(model)
    by_name = plan(shape, Quantization(), hardware_from_profile(name), 8192)
    by_figures = plan(shape, Quantization(), stated_machine(own_figures(name)), 8192)
    assert by_figures.layout == by_name.layout
    assert by_figures.predicted.decode_tok_s == pytest.approx(by_name.predicted.decode_tok_s, rel=0.03)


@pytest.mark.parametrize("name", [n for n, m in load_profiles().machines.items() if m.gpu is None or m.gpu.key == "rtx4090"])
def test_with_the_cpu_flops_stated_too_prefill_matches_as_well(v3, name):
    profile = hardware_from_profile(name)
    stated = dataclasses.replace(own_figures(name), cpu_flops=profile.cpu_flops)
    by_name = plan(v3, Quantization(), profile, 8192).predicted
    by_figures = plan(v3, Quantization(), stated_machine(stated), 8192).predicted
    assert by_figures.prefill_tok_s == pytest.approx(by_name.prefill_tok_s, rel=1e-9)
    assert by_figures.decode_tok_s == pytest.approx(by_name.decode_tok_s, rel=1e-9)


def test_more_cores_make_prefill_faster_and_leave_a_bandwidth_bound_decode(v3):
    few, many = (plan(v3, Quantization(), stated_machine(StatedHardware(ram=512 * GiB, cores=n)), 8192).predicted for n in (8, 96))
    assert many.prefill_tok_s > 1.5 * few.prefill_tok_s
    assert many.decode_tok_s >= few.decode_tok_s


# ----- tensor formats a file fixes ------------------------------------------------------------------
def stored_experts(shape: ModelShape, type_name: str, layers=None) -> Quantization:
    from localv3.offload.gguf_model import ggml_format

    fmt = ggml_format(type_name)
    experts = {g.key(t): fmt for g in shape.groups if g.kind == "routed_expert" and (layers is None or g.layer in layers) for t in g.tensors}
    return dataclasses.replace(Quantization(), stored={"experts": experts})


@pytest.mark.parametrize("type_name, bits", [("IQ1_S", 1.5625), ("IQ2_XXS", 2.0625), ("Q2_K", 2.625), ("Q3_K", 3.4375), ("Q5_K", 5.5), ("Q6_K", 6.5625)])
def test_stored_expert_formats_are_sized_by_the_ggml_type_table(v3, type_name, bits):
    quant = stored_experts(v3, type_name)
    experts = v3.group("routed_expert", 10)
    assert experts.unit_bytes(quant) == experts.unit_elements * bits / 8
    assert v3.bits_per_weight(quant, "experts") == pytest.approx(bits)
    assert quant.to_dict() == {"experts": type_name.lower(), "dense": "q8", "embeddings": "bf16"}


def test_a_1_58_bit_v3_fits_where_q4_does_not(v3):
    hardware = machine("rtx4090-ddr5-dual", ram=192 * GiB)  # q4 experts: ~340 GiB
    with pytest.raises(PlanError, match="does not fit"):
        plan(v3, Quantization(), hardware, 8192, Policy(allow_disk=False))
    p = plan(v3, stored_experts(v3, "IQ1_S"), hardware, 8192, Policy(allow_disk=False))
    assert p.layout.count_experts(DISK) == 0 and p.bits_per_weight["experts"] == pytest.approx(1.5625)
    assert p.predicted.decode_tok_s > plan(v3, Quantization(), hardware, 8192).predicted.decode_tok_s


def test_a_stated_scheme_replaces_the_stored_formats_of_its_role_only(v3):
    quant = stored_experts(v3, "Q2_K")
    restated = quant.with_scheme("experts", "q8")
    assert not restated.stores("experts") and restated.to_dict()["experts"] == "q8"
    assert quant.with_scheme("dense", "q4").stores("experts")


def test_mixed_expert_formats_are_timed_by_their_bytes(v3):
    """Lower-bit experts read fewer bytes: a bandwidth-bound decode gets faster in proportion."""
    hardware = machine(ram=512 * GiB)
    q4 = plan(v3, Quantization(), hardware, 1024, Policy(cpu_moe=True)).predicted
    q2 = plan(v3, stored_experts(v3, "Q2_K"), hardware, 1024, Policy(cpu_moe=True)).predicted
    part = q2.decode_components["CPU experts"] / q4.decode_components["CPU experts"]
    assert part == pytest.approx(2.625 / 4.5, rel=1e-6)


# ----- components and what would change it -----------------------------------------------------------
@pytest.mark.parametrize("profile, ram", [("rtx4090-epyc-12ch", 512), ("rtx4090-epyc-12ch", 256), ("cpu-only", 768), ("rtx4060ti-desktop", 96)])
def test_decode_components_add_up_to_the_decode_time(v3, profile, ram):
    p = plan(v3, Quantization(), machine(profile, ram=ram * GiB), 4096).predicted
    assert set(p.decode_components) <= {"GPU", "CPU experts", "CPU layers", "disk", "PCIe", "fixed"}
    assert sum(p.decode_components.values()) == pytest.approx(sum(p.decode_seconds.values()), rel=1e-12)
    assert sum(p.decode_components.values()) == pytest.approx(1 / p.decode_tok_s, rel=1e-12)
    assert p.decode_components.get("fixed", 0) == pytest.approx(p.decode_seconds.get("fixed per-layer costs", 0))
    assert ("disk" in p.decode_components) == ("disk reads" in p.decode_seconds)


def test_what_would_change_it_replans_one_step_away(v3):
    from localv3.offload.alternatives import what_would_change

    policy = Policy()
    hardware = machine(ram=512 * GiB)
    result = plan(v3, Quantization(), hardware, 8192, policy)
    bandwidth, gpu, experts = what_would_change(result, v3, policy)
    assert bandwidth.change == "2x RAM bandwidth (922 GB/s)" and bandwidth.decode_tok_s > 1.3 * result.predicted.decode_tok_s
    assert gpu.change == "a 48.00 GiB GPU" and gpu.decode_tok_s > result.predicted.decode_tok_s
    q8 = plan(v3, Quantization(experts="q8"), hardware, 8192, policy).predicted.decode_tok_s
    assert experts.change == "routed experts in q8" and experts.decode_tok_s == q8
    assert experts.experts_on_disk and not bandwidth.experts_on_disk  # q8 experts outgrow 512 GiB
    no_gpu = plan(v3, Quantization(), machine("cpu-only"), 8192, policy)
    assert what_would_change(no_gpu, v3, policy)[1].change == "a 24.00 GiB GPU (NVIDIA GeForce RTX 4090)"
    small = plan(v3, Quantization(), machine(ram=384 * GiB), 8192, Policy(allow_disk=False))
    assert what_would_change(small, v3, Policy(allow_disk=False))[2].decode_tok_s is None  # q8 does not fit


@pytest.mark.parametrize("seed", range(5))
def test_refusals_suggest_only_schemes_the_options_take(v3, seed):
    """Whatever the starting schemes, a suggested `--role scheme` is one that role accepts."""
    import random
    import re

    from localv3.offload.quant import ROLE_SCHEMES

    rng = random.Random(seed)
    quant = Quantization(*(rng.choice(ROLE_SCHEMES[role]) for role in ("experts", "dense", "embeddings")))
    with pytest.raises(PlanError) as refusal:
        plan(v3, quant, machine("cpu-only", ram=rng.choice([16, 64, 128]) * GiB), 4096, Policy(allow_disk=False))
    for role, name in re.findall(r"--(experts|dense|embeddings) (\S+)", str(refusal.value)):
        assert name in ROLE_SCHEMES[role], str(refusal.value)


def test_parameter_counts_are_those_localv3_show_counts():
    from localv3.model_summary import summarize

    tiny_dir = Path(__file__).resolve().parents[1] / "localv3" / "assets" / "tiny"
    shape = ModelShape.from_config(ModelConfig.from_file(tiny_dir), "tiny")
    shown = summarize(tiny_dir)
    assert shape.parameter_count().to_dict() == {"total": shown.params_total, "active": shown.params_active}


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None}, {"n_shared_experts": 0, "first_k_dense_replace": 2}])
def test_the_planner_counts_each_role_as_the_checkpoint_holds_it(tmp_path, overrides):
    """Elements per role (experts, dense, absorbed, embeddings, router, vector) from the
    planner's ModelShape equal those of a written checkpoint, each tensor's role taken from its
    name by the rule quantize and the runtime follow; the MTP layer's copies of the embeddings
    and the head, which no one loads, aside."""
    from collections import Counter
    import math

    import torch

    from localv3.checkpoint import CheckpointReader
    from localv3.formats.roles import weight_role
    from localv3.synthetic import write_checkpoint
    from model_configs import V3_MTP

    raw = {**V3_MTP, **overrides}
    model = write_checkpoint(tmp_path, raw, dtype=torch.float32)
    config = ModelConfig.from_dict(raw)
    unused_copies = re.compile(r"^model\.layers\.(\d+)\.(embed_tokens|shared_head\.head)\.weight$")
    stored = Counter()
    for name, info in CheckpointReader(model).tensors.items():
        copy = unused_copies.match(name)
        if copy and int(copy[1]) >= config.num_hidden_layers:
            continue
        stored[weight_role(name, len(info.shape))] += math.prod(info.shape)
    planned = Counter()
    for group in ModelShape.from_config(config, "t").groups:
        for tensor in group.tensors:
            planned[tensor.role] += tensor.elements * group.count
    assert planned == stored
