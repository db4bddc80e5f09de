"""Block-quantised weights (ggml's Q8_0, Q4_0, Q4_K) and the modules that compute with them,
against independent references: gguf-py's numpy (de)quantisers for the bytes, and the plain
torch formula on the dequantised weights for the ggml kernels."""

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from localv3.formats import ggml
from localv3.formats.blocks import QuantizedWeight, check_shape, quantize_to, quantize_weight
from localv3.formats.modules import QuantExpertBank, QuantFeedForward, QuantHeadProjection, QuantLinear
from localv3.model.attention import HeadProjection
from localv3.formats.table import BLOCK_TYPES, FORMATS, Q4_0, Q4_K, Q8_0, QuantError
from localv3.kernels import build, products

SEEDS = (0, 1, 2)
# ggml's kernels and ours quantise the activations to 8 bits (blocks of 32 or 256) before the
# integer dot products: measured max error 0.5-1.2% of the largest output; a wrong layout gives ~100%.
KERNEL_TOLERANCE = 0.03


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def random_weight(seed: int, rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) / cols**0.5


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("block_type", [Q8_0, Q4_0, Q4_K], ids=lambda t: t.name)
def test_torch_dequantiser_matches_gguf_py(block_type, seed):
    weight = random_weight(seed, 24, 512)
    weight[3, :256] = 0  # an all-zero block
    quantized = quantize_to(weight, block_type)
    assert quantized.data.dtype == torch.uint8 and quantized.data.shape == (24, block_type.row_bytes(512))
    expected = gguf.quants.dequantize(quantized.data.numpy(), gguf.GGMLQuantizationType(block_type.ggml_type))
    assert torch.equal(quantized.dequantize(), torch.from_numpy(np.ascontiguousarray(expected, dtype=np.float32)))
    assert torch.all(quantized.dequantize()[3, :256] == 0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("block_type", [Q8_0, Q4_0], ids=lambda t: t.name)
def test_ggml_quantiser_bytes_match_gguf_py(block_type, seed):
    weight = random_weight(seed, 16, 256)
    expected = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType(block_type.ggml_type))
    assert torch.equal(quantize_to(weight, block_type).data, torch.from_numpy(expected))


@pytest.mark.parametrize("seed", SEEDS)
def test_q4_k_rounding_error_is_within_its_steps(seed):
    """Q4_K: each sub-block of 32 spans at most 15 steps of d * scale: error within one step."""
    weight = random_weight(seed, 16, 512)
    error = (quantize_to(weight, Q4_K).dequantize() - weight).abs().view(16, -1, 32)  # [rows, sub-blocks, 32]
    spread = weight.view(16, -1, 32)
    step = (spread.amax(-1) - spread.amin(-1)) / 15  # [rows, sub-blocks]
    assert torch.all(error.amax(-1) <= step * 1.1 + 1e-6)


def test_row_bytes_are_ggmls():
    for block_type in BLOCK_TYPES.values():
        for n in (256, 512, 7168):
            assert block_type.row_bytes(n) == ggml.row_bytes(block_type.ggml_type, n), (block_type.name, n)


def test_scheme_picks_block_type_by_row_length():
    assert FORMATS["q4"].block_type(7168) == Q4_K and FORMATS["q4"].block_type(96) == Q4_0
    assert FORMATS["q8"].block_type(96) == Q8_0 and FORMATS["q8"].block_type(48) is None
    assert FORMATS["q4"].bits_per_weight == 4.5 and FORMATS["q8"].bits_per_weight == 8.5
    assert FORMATS["q8"].matrix_bytes(10, 64) == 10 * 2 * 34
    assert FORMATS["q8"].matrix_bytes(10, 48) == 10 * 48 * 2  # kept in bf16


def test_quantize_rejects_bad_shapes():
    with pytest.raises(QuantError, match="block size 256 or 32"):
        check_shape((16, 48), FORMATS["q4"])
    with pytest.raises(QuantError, match="2-D"):
        quantize_weight(torch.randn(16), FORMATS["q8"])


@pytest.fixture(params=["localv3", "ggml", "dequantise"])
def kernel(request, monkeypatch):
    """Each module on its three paths: localv3's own CPU kernels (the decode-sized calls here),
    ggml's CPU kernels, and the per-call dequantisation a GPU takes."""
    if request.param == "localv3" and build.library() is None:
        pytest.skip("localv3's CPU kernels cannot be built on this machine (tests/test_cpu_kernels.py says why)")
    if request.param != "localv3":
        monkeypatch.setattr(products, "library", lambda: None)
    if request.param == "dequantise":
        monkeypatch.setattr(ggml, "available", lambda: False)
    return request.param


def tolerance(kernel: str) -> float:
    return 1e-5 if kernel == "dequantise" else KERNEL_TOLERANCE


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scheme,out_features,in_features", [("q8", 40, 96), ("q4", 64, 256), ("q4", 48, 96)])
def test_quant_linear_matches_the_dequantised_formula(kernel, scheme, out_features, in_features, seed):
    quantized = quantize_weight(random_weight(seed, out_features, in_features), FORMATS[scheme])
    bias = torch.randn(out_features)
    layer = QuantLinear.from_weight(quantized, bias)
    for tokens in (1, 5):
        x = torch.randn(2, tokens, in_features, generator=torch.Generator().manual_seed(seed + tokens))
        expected = F.linear(x, quantized.dequantize(), bias)
        got = layer(x)
        assert got.shape == expected.shape and rel_err(got, expected) < tolerance(kernel)
    first = layer(x)
    layer(torch.randn(2, tokens, in_features))
    assert torch.equal(first, layer(x)), "an output must not be overwritten by the next call"


def naive_mlp(x, gate, up, down):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


@pytest.mark.parametrize("seed", SEEDS)
def test_quant_feed_forward_matches_the_formula(kernel, seed):
    dim, hidden = 256, 96
    parts = [random_weight(seed + i, *shape) for i, shape in enumerate([(hidden, dim), (hidden, dim), (dim, hidden)])]
    quantized = [quantize_weight(w, FORMATS["q4"]) for w in parts]
    mlp = QuantFeedForward(*quantized)
    x = torch.randn(3, 4, dim, generator=torch.Generator().manual_seed(seed))
    expected = naive_mlp(x, *(q.dequantize() for q in quantized))
    assert rel_err(mlp(x), expected) < tolerance(kernel)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tokens,top_k", [(1, 2), (1, 1), (7, 2), (16, 3)])
def test_quant_expert_bank_matches_per_expert_formula(kernel, seed, tokens, top_k):
    n_experts, dim, hidden = 6, 256, 64
    gen = torch.Generator().manual_seed(seed)
    fmt = FORMATS["q4"]
    bank = QuantExpertBank(n_experts, dim, hidden, fmt.block_type(dim), fmt.block_type(hidden))
    experts = []
    for e in range(n_experts):
        parts = [quantize_weight(random_weight(seed * 100 + 3 * e + i, *s), fmt) for i, s in enumerate([(hidden, dim), (hidden, dim), (dim, hidden)])]
        bank.store(e, *parts)
        experts.append([p.dequantize() for p in parts])
    x = torch.randn(tokens, dim, generator=gen)
    indices = torch.stack([torch.randperm(n_experts, generator=gen)[:top_k] for _ in range(tokens)])  # [T, k]
    weights = torch.rand(tokens, top_k, generator=gen)
    expected = torch.zeros(tokens, dim)
    for t in range(tokens):
        for j in range(top_k):
            expected[t] += weights[t, j] * naive_mlp(x[t], *experts[indices[t, j]])
    assert rel_err(bank(x, indices, weights), expected) < tolerance(kernel)


def test_store_rejects_a_wrong_shape():
    bank = QuantExpertBank(2, 256, 64, Q4_K, Q4_0)
    wrong = QuantizedWeight(torch.zeros(64, Q4_0.row_bytes(256), dtype=torch.uint8), Q4_0, 256)
    with pytest.raises(QuantError, match="cannot store"):
        bank.store(0, wrong, wrong, wrong)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tokens", [1, 3])
def test_quant_head_projection_matches_per_head_formula(kernel, seed, tokens):
    """MLA's absorbed W_UK/W_UV: one product batched over heads, [H, N, in] -> [H, N, out]."""
    heads, out_features, in_features = 4, 48, 64
    weight = torch.randn(heads, out_features, in_features, generator=torch.Generator().manual_seed(seed)) / 8
    projection = QuantHeadProjection(weight, Q8_0)
    x = torch.randn(heads, tokens, in_features, generator=torch.Generator().manual_seed(seed + 10))
    dequantized = projection.dense_weight(torch.float32)  # [H, out, in]
    assert torch.equal(dequantized[1], quantize_to(weight[1], Q8_0).dequantize())
    expected = torch.stack([x[h] @ dequantized[h].T for h in range(heads)])  # [H, N, out]
    assert rel_err(projection(x), expected) < tolerance(kernel)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tokens", [1, 5])
def test_head_projections_map_one_input_through_every_head(kernel, seed, tokens):
    """The naive MLA path's products: every head's map of the same rows ([N, in] -> [N, H*out]),
    and the heads' transposes stacked as rows, quantised and dense alike, per head by hand."""
    heads, out_features, in_features = 4, 48, 64
    weight = torch.randn(heads, out_features, in_features, generator=torch.Generator().manual_seed(seed)) / 8
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(seed + 10))
    quantised = QuantHeadProjection(weight, Q8_0)
    dequantized = quantised.dense_weight(torch.float32)  # [H, out, in]
    for projection, reference, limit in ((quantised, dequantized, tolerance(kernel)), (HeadProjection(weight), weight, 1e-6)):
        expected = torch.cat([x @ reference[h].T for h in range(heads)], dim=1)  # [N, H*out]
        assert rel_err(projection.every_head(x), expected) < limit
        rows = projection.transposed_rows(torch.float32)  # [H*in, out]
        assert torch.equal(rows, torch.cat([reference[h].T for h in range(heads)]))


def test_graphs_stay_cached_within_the_shared_budget(monkeypatch):
    """Small graphs are kept; one that would take the cached graphs past the budget (a big
    prefill chunk's intermediates) is built for its call and dropped. (Calls of up to
    DECODE_TOKENS rows, and larger ones where the CPU has panel kernels, run localv3's own
    kernels, which need no graph: they are off here.)"""
    monkeypatch.setattr(products, "library", lambda: None)
    monkeypatch.setattr(ggml, "BUDGET", ggml._Budget(limit=256 * 1024))
    fmt = FORMATS["q8"]
    layer = QuantLinear.from_weight(quantize_weight(random_weight(0, 32, 64), fmt))
    small, other = products.DECODE_TOKENS + 1, products.DECODE_TOKENS + 2
    for tokens in (small, other, 4096, small):
        layer(torch.randn(tokens, 64))
    assert sorted(layer._graphs.graphs) == [small, other]
    assert ggml.BUDGET.used == sum(staged.graph.held_bytes for staged in layer._graphs.graphs.values()) > 0
    layer._graphs.clear()
    assert ggml.BUDGET.used == 0
