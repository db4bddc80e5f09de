"""Engine components against naive formulas and hand-computed cases."""

import math

import pytest
import torch
import torch.nn.functional as F

import localv3
from localv3.config import ModelConfig
from localv3.model.cache import LatentCache
from localv3.model.moe import DenseExpertBank, MoE, Router
from localv3.model.norm import RMSNorm
from localv3.model.rope import RotaryEmbedding, apply_rope
from localv3.synthetic import write_checkpoint
from fp8_twin import write_dequantized_twin
from model_configs import DEEPSEEK_V3_FULL, KIMI_K2_STYLE, V2_GROUP_LIMITED, V2_LITE, V3_FP8, V3_MTP


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("v3"), V3_MTP, seed=3, dtype=torch.float32)


def test_kv_cache_bytes_per_token_for_deepseek_v3():
    config = ModelConfig.from_dict(DEEPSEEK_V3_FULL)
    assert config.kv_bytes_per_token(2) == (512 + 64) * 61 * 2 == 70_272
    cache = LatentCache(config, max_tokens=1, num_layers=61, dtype=torch.bfloat16, device="meta")
    assert cache.bytes_per_token == 70_272


def test_softmax_scale_for_deepseek_v3_yarn():
    config = ModelConfig.from_dict(DEEPSEEK_V3_FULL)
    mscale = 0.1 * 1.0 * math.log(40) + 1.0
    assert config.softmax_scale == pytest.approx(192**-0.5 * mscale**2)
    assert config.softmax_scale == pytest.approx(0.13524, abs=1e-5)


def test_engine_reports_kv_bytes_in_its_dtype(v3_dir):
    engine = localv3.load(v3_dir, device="cpu", dtype=torch.float32)
    c = engine.config
    assert engine.kv_bytes_per_token == (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers * 4
    assert engine.path == v3_dir


def test_logits_rows_are_the_last_rows_of_the_full_logits(v3_dir):
    """Prefill and drafting ask for the last row only; it must equal that row of all logits."""
    model = localv3.load(v3_dir, device="cpu", dtype=torch.float32).model
    ids = torch.arange(3, 15)[None]  # [1, 12]
    with torch.inference_mode():
        full, hidden = model(ids, 0, model.new_cache(12))
        last, _ = model(ids, 0, model.new_cache(12), logits_rows=1)
        mtp_full, _ = model.mtp_forward(hidden[:, :-1], ids[:, 1:], 0, model.new_cache(12))
        mtp_none, _ = model.mtp_forward(hidden[:, :-1], ids[:, 1:], 0, model.new_cache(12), logits_rows=0)
    assert last.shape == (1, 1, full.shape[-1])
    torch.testing.assert_close(last[0, 0], full[0, -1], atol=1e-6, rtol=1e-6)  # one row: another GEMM kernel
    assert mtp_full.shape[1] == 11 and mtp_none.shape[1] == 0


def test_absorbed_mla_equals_naive_mla(v3_dir):
    engine = localv3.load(v3_dir, device="cpu", dtype=torch.float32)
    ids = list(range(3, 23))

    def run(absorb: bool) -> torch.Tensor:
        for block in engine.model.model.layers:
            block.self_attn.path = "absorbed" if absorb else "naive"
        session = engine.new_session(len(ids) + 4)
        rows = [session.forward(ids)]
        for token in (5, 9, 11):  # decode steps read the cache through each path
            rows.append(session.forward([token]))
        return torch.cat(rows)

    naive, absorbed = run(False), run(True)
    assert (naive - absorbed).abs().max().item() < 1e-4


def test_fp8_checkpoint_equals_its_dequantised_bf16_twin(tmp_path):
    fp8_dir = write_checkpoint(tmp_path / "fp8", V3_FP8, seed=5, fp8=True, shards=3)
    twin_dir = write_dequantized_twin(fp8_dir, tmp_path / "twin", torch.bfloat16)
    ids = list(range(2, 18))
    fp8_logits = localv3.load(fp8_dir, device="cpu", dtype=torch.bfloat16).logits(ids)
    twin_logits = localv3.load(twin_dir, device="cpu", dtype=torch.bfloat16).logits(ids)
    assert (fp8_logits - twin_logits).abs().max().item() < 1e-3


def test_fp8_scales_cover_partial_edge_blocks(tmp_path):
    from localv3.checkpoint import CheckpointReader

    fp8_dir = write_checkpoint(tmp_path, V3_FP8, fp8=True)
    reader = CheckpointReader(fp8_dir)
    name = "model.layers.0.mlp.gate_proj.weight"  # [200, 160]: 2 x 2 blocks, both edges partial
    assert reader.info(name).shape == (200, 160)
    assert reader.info(name + "_scale_inv").shape == (2, 2)
    assert reader.is_fp8(name)


def hand_set_moe() -> MoE:
    """D=2, four experts in two groups, top-2 of the best group, scale 2."""
    config = ModelConfig.from_dict(
        {
            "vocab_size": 8,
            "hidden_size": 2,
            "intermediate_size": 4,
            "moe_intermediate_size": 1,
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
            "kv_lora_rank": 2,
            "qk_rope_head_dim": 2,
            "qk_nope_head_dim": 2,
            "v_head_dim": 2,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "n_group": 2,
            "topk_group": 1,
            "routed_scaling_factor": 2.0,
        }
    )
    moe = MoE(config)
    with torch.no_grad():
        # sigmoid scores for x = [1, 0]: e0 0.5, e1 0.75, e2 0.25, e3 0.9
        moe.gate.weight.copy_(torch.tensor([[0.0, 0], [math.log(3), 0], [-math.log(3), 0], [math.log(9), 0]]))
        # the bias lifts e2 for selection only: choice scores 0.5, 0.75, 1.25, 0.9
        moe.gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
        for e in range(4):  # expert e: (e + 1) * silu(x0) on output dim 0
            moe.experts.gate_up[e] = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
            moe.experts.down[e] = torch.tensor([[e + 1.0], [0.0]])
        shared = moe.shared_experts
        shared.gate_proj.weight.copy_(torch.tensor([[1.0, 0.0]]))
        shared.up_proj.weight.copy_(torch.tensor([[2.0, 0.0]]))
        shared.down_proj.weight.copy_(torch.tensor([[0.0], [1.0]]))
    return moe


def test_moe_on_hand_set_weights_gives_hand_computed_output():
    moe = hand_set_moe()
    x = torch.tensor([[[1.0, 0.0]]])
    indices, weights = moe.gate(x.view(-1, 2))
    # group scores (top-2 sums): g0 = 0.5 + 0.75 = 1.25, g1 = 1.25 + 0.9 = 2.15 -> g1; experts e2, e3
    assert sorted(indices[0].tolist()) == [2, 3]
    by_expert = dict(zip(indices[0].tolist(), weights[0].tolist()))
    # weights use the unbiased scores 0.25 and 0.9, normalised, times 2
    assert by_expert[2] == pytest.approx(2 * 0.25 / 1.15)
    assert by_expert[3] == pytest.approx(2 * 0.9 / 1.15)
    silu1 = 1 / (1 + math.exp(-1))  # silu(1) = 1 * sigmoid(1)
    expected_routed = (2 * 0.25 / 1.15 * 3 + 2 * 0.9 / 1.15 * 4) * silu1
    expected_shared = 2 * silu1
    out = moe(x)[0, 0]
    assert out.tolist() == pytest.approx([expected_routed, expected_shared], rel=1e-6)


def test_mtp_head_follows_the_formula(v3_dir):
    """h' = eh_proj(cat[enorm(embed(t+1)), hnorm(h_t)]) -> block -> shared_head.norm -> lm_head."""
    engine = localv3.load(v3_dir, device="cpu", dtype=torch.float32)
    model = engine.model
    ids = [4, 8, 15, 16, 23, 42]
    session = engine.new_session(16)
    session.forward(ids[:-1])
    hidden = session.last_hidden  # [1, 5, D] after the final norm
    next_tokens = torch.tensor([ids[1:]])
    got, _ = model.mtp_forward(hidden, next_tokens, 0, session.cache)

    head = model.mtp[0]
    eps = engine.config.rms_norm_eps

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    embeds = model.model.embed_tokens.weight[next_tokens]
    h = F.linear(torch.cat([rms(embeds, head.enorm.weight), rms(hidden, head.hnorm.weight)], -1), head.eh_proj.weight)
    fresh = model.new_cache(16)
    rope = model.rope(0, len(ids) - 1, h.device, h.dtype)
    h = head.block(h, 0, rope, fresh, engine.config.num_hidden_layers)
    expected = F.linear(rms(h, head.shared_head_norm.weight), model.lm_head.weight)
    assert (got - expected).abs().max().item() < 1e-4
    assert got.shape == (1, 5, engine.config.vocab_size)


def test_generate_is_greedy_and_deterministic(v3_dir):
    engine = localv3.load(v3_dir, device="cpu", dtype=torch.float32)
    prompt = [3, 4, 5, 6]
    tokens = engine.generate(prompt, 12, stop_token_ids=[])
    assert len(tokens) == 12
    session = engine.new_session(32)
    logits = session.prefill(prompt)
    expected = []
    for _ in range(12):
        expected.append(int(logits.argmax()))
        logits = session.decode(expected[-1])
    assert tokens == expected
    sampled_a = engine.generate(prompt, 12, temperature=0.8, seed=11, stop_token_ids=[])
    sampled_b = engine.generate(prompt, 12, temperature=0.8, seed=11, stop_token_ids=[])
    assert sampled_a == sampled_b


def reference_routing(router: Router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The router as first written (one mask over all experts, repeat_interleave'd from the groups)."""
    scores = F.linear(x.float(), router.weight.float())
    scores = scores.sigmoid() if router.scoring_func == "sigmoid" else scores.softmax(dim=-1)
    choice = scores
    per_group = router.n_experts // router.n_group
    if router.topk_method in ("noaux_tc", "group_limited_greedy"):
        if router.topk_method == "noaux_tc":
            choice = scores + router.e_score_correction_bias
            group_scores, fill = choice.view(-1, router.n_group, per_group).topk(2, dim=-1)[0].sum(-1), float("-inf")
        else:
            group_scores, fill = scores.view(-1, router.n_group, per_group).amax(dim=-1), 0.0
        best = group_scores.topk(router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(per_group, dim=1), fill)
    indices = choice.topk(router.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, indices)
    if router.norm_topk_prob and router.top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return indices, weights * router.routed_scaling_factor


def by_expert(indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's (experts, weights) sorted by expert: topk(sorted=False) order is unspecified."""
    order = indices.argsort(dim=-1)
    return indices.gather(1, order), weights.gather(1, order)


@pytest.mark.parametrize("name", ["v3", "v2_lite", "v2_group_limited", "kimi_k2_style"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_picks_exactly_what_the_reference_routing_picks(name, dtype):
    raw = {"v3": V3_MTP, "v2_lite": V2_LITE, "v2_group_limited": V2_GROUP_LIMITED, "kimi_k2_style": KIMI_K2_STYLE}[name]
    config = ModelConfig.from_dict(raw)
    router = Router(config)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g) / config.hidden_size**0.5)
        if router.topk_method == "noaux_tc":
            router.e_score_correction_bias.copy_(0.1 * torch.randn(config.n_routed_experts, generator=g))
    x = torch.randn(33, config.hidden_size, generator=g).to(dtype)
    got, expected = by_expert(*router(x)), by_expert(*reference_routing(router, x))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_run_experts_sums_each_tokens_weighted_expert_outputs():
    g = torch.Generator().manual_seed(6)
    bank = DenseExpertBank(8, 16, 12)
    with torch.no_grad():
        bank.gate_up.copy_(torch.randn(bank.gate_up.shape, generator=g) / 4)
        bank.down.copy_(torch.randn(bank.down.shape, generator=g) / 3)
    x = torch.randn(5, 16, generator=g)
    indices = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(5)])  # [T, k]
    weights = torch.rand(5, 3, generator=g)

    def token_output(t: int) -> torch.Tensor:
        return sum(weights[t, j] * bank.expert_forward(int(indices[t, j]), x[t : t + 1])[0] for j in range(3))

    expected = torch.stack([token_output(t) for t in range(5)])  # [T, D]
    torch.testing.assert_close(bank(x, indices, weights), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [16, 80, 7168])
def test_rms_norm_is_bit_for_bit_the_transformers_formula(dtype, dim):
    g = torch.Generator().manual_seed(dim)
    norm = RMSNorm(dim, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(dim, generator=g))
    x = (3 * torch.randn(2, 5, dim, generator=g)).to(dtype)
    x32 = x.float()
    expected = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    assert torch.equal(norm(x), expected)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_rotates_each_pair_bit_for_bit_as_transformers(interleaved):
    """transformers de-interleaves (if interleaved), then x cos + rotate_half(x) sin; ours rotates
    pairs where they lie: the same numbers, in the checkpoint's pair layout."""
    config = ModelConfig.from_dict({**V3_MTP, "rope_interleave": interleaved})
    rotary = RotaryEmbedding(config)
    positions = torch.arange(5, 12)
    cos, sin = rotary(positions, torch.float32)  # [S, 1, R]
    x = torch.randn(2, 7, 3, config.qk_rope_head_dim, generator=torch.Generator().manual_seed(8))  # [B, S, H, R]
    got = apply_rope(x, cos, sin, interleaved)

    half = config.qk_rope_head_dim // 2
    freqs = positions.float()[:, None] * rotary.inv_freq[None, :]  # [S, R/2]
    cos2 = (torch.cat([freqs, freqs], -1).cos() * rotary.attention_factor)[:, None]  # [S, 1, R]
    sin2 = (torch.cat([freqs, freqs], -1).sin() * rotary.attention_factor)[:, None]
    halves = torch.cat([x[..., 0::2], x[..., 1::2]], -1) if interleaved else x
    rotate_half = torch.cat([-halves[..., half:], halves[..., :half]], -1)
    expected = halves * cos2 + rotate_half * sin2
    got_halves = torch.cat([got[..., 0::2], got[..., 1::2]], -1) if interleaved else got
    assert torch.equal(got_halves, expected)
