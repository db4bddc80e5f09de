"""int8/int4 weight-only quantisation and its CPU modules, against the naive dequantised formula."""

import pytest
import torch

from localv3.model.moe import DenseExpertBank
from localv3.quant import (
    Q4,
    Q8,
    QuantError,
    QuantExpertBank,
    QuantFormat,
    QuantLinear,
    QuantMatrices,
    pack_int4,
    quantize_weight,
    unpack_int4,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_int4_pack_roundtrip_and_layout():
    q = torch.randint(-8, 8, (5, 12), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6)
    assert torch.equal(unpack_int4(packed), q)
    # even column in the low nibble, stored as value + 8
    assert packed[0, 0].item() == (q[0, 0].item() + 8) | ((q[0, 1].item() + 8) << 4)


@pytest.mark.parametrize("fmt", [Q8, Q4, QuantFormat("q8g32", 8, 32)], ids=lambda f: f.name)
def test_quantize_matches_the_formula(fmt):
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    w[3, :32] = 0  # an all-zero group
    qw = quantize_weight(w, fmt)
    group = fmt.group(128)
    assert qw.qweight.shape == fmt.qweight_shape(48, 128)
    assert qw.scales.shape == (48, 128 // group) and qw.scales.dtype == torch.bfloat16
    values = qw.values().float()
    expected = (values.view(48, -1, group) * qw.scales.float()[..., None]).view(48, 128)
    assert torch.equal(qw.dequantize(), expected)
    assert torch.all(qw.dequantize()[3, :32] == 0)
    # rounding error: at most half a step; int4 clamps +8 to 7 (one step), and the bf16 rounding
    # of the scale moves that by up to 2^-8 x 8 steps
    step = qw.scales.float().abs().repeat_interleave(group, dim=1)
    limit = 0.5 if fmt.bits == 8 else 1.0 + 8 * 2**-8
    assert torch.all((qw.dequantize() - w).abs() <= limit * step + 1e-6)
    if fmt.bits == 4:  # the largest-magnitude weight of each group is exact
        flat = w.view(48, -1, 32)
        idx = flat.abs().argmax(-1, keepdim=True)
        deq = qw.dequantize().view(48, -1, 32)
        assert torch.allclose(deq.gather(-1, idx), flat.gather(-1, idx), rtol=1e-2)


def test_quantize_rejects_bad_shapes():
    with pytest.raises(QuantError, match="group size 32"):
        quantize_weight(torch.randn(16, 48), Q4)
    with pytest.raises(QuantError, match="2-D"):
        quantize_weight(torch.randn(16), Q8)


# shapes chosen to hit each kernel: the fast CPU ones and the dequantise-per-call fallback
CASES = [
    (Q8, 64, 128, "int8pack"),
    (Q8, 40, 48, "int8pack"),
    (Q8, 40, 24, "dequant"),  # int8pack_mm returns wrong results unless in % 16 == 0
    (Q4, 64, 128, "int4pack"),
    (Q4, 48, 64, "int4pack"),
    (Q4, 40, 64, "dequant"),  # int4 kernel needs out % 16 == 0
    (QuantFormat("q8g32", 8, 32), 32, 64, "dequant"),
]


@pytest.mark.parametrize("fmt,out_features,in_features,kernel", CASES)
def test_quant_linear_matches_naive(fmt, out_features, in_features, kernel):
    torch.manual_seed(1)
    qw = quantize_weight(torch.randn(out_features, in_features) / in_features**0.5, fmt)
    layer = QuantLinear.from_weight(qw)
    assert layer.matrices.kernel.name == kernel
    assert torch.equal(layer.dense_weight(), qw.dequantize())
    for tokens in (1, 5, 33):
        x = torch.randn(2, tokens, in_features)
        y = layer(x)
        assert y.shape == (2, tokens, out_features) and y.dtype == torch.float32
        reference = x @ qw.dequantize().T
        # the CPU kernels take bf16 activations and return bf16: ~2^-8 relative
        assert rel_err(y, reference) < 1e-2


def test_quant_linear_bias_and_bf16_input():
    torch.manual_seed(2)
    qw = quantize_weight(torch.randn(32, 64), Q8)
    bias = torch.randn(32)
    layer = QuantLinear.from_weight(qw, bias)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, x.float() @ qw.dequantize().T + bias) < 2e-2


def test_quant_matrices_reject_mismatched_weight():
    matrices = QuantMatrices(Q8, 2, 16, 32)
    with pytest.raises(QuantError, match="cannot store"):
        matrices.store(0, quantize_weight(torch.randn(16, 64), Q8))


@pytest.mark.parametrize("fmt", [Q8, Q4], ids=lambda f: f.name)
def test_quant_expert_bank_matches_dense_bank(fmt):
    torch.manual_seed(3)
    n_experts, dim, hidden, tokens, top_k = 8, 64, 32, 11, 3
    gates = [torch.randn(hidden, dim) / dim**0.5 for _ in range(n_experts)]
    ups = [torch.randn(hidden, dim) / dim**0.5 for _ in range(n_experts)]
    downs = [torch.randn(dim, hidden) / hidden**0.5 for _ in range(n_experts)]
    bank = QuantExpertBank(n_experts, dim, hidden, fmt)
    dense = DenseExpertBank(n_experts, dim, hidden)
    for e in range(n_experts):
        g, u, d = (quantize_weight(t, fmt) for t in (gates[e], ups[e], downs[e]))
        bank.store(e, g, u, d)
        dense.gate_up.data[e] = torch.cat([g.dequantize(), u.dequantize()])
        dense.down.data[e] = d.dequantize()
    x = torch.randn(tokens, dim)
    indices = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(tokens)])  # [T, k]
    weights = torch.rand(tokens, top_k)
    out = bank(x, indices, weights)
    assert out.shape == (tokens, dim) and out.dtype == torch.float32
    assert rel_err(out, dense(x, indices, weights)) < 2e-2


@pytest.mark.parametrize("out_features", [16, 48, 64, 80, 192])
def test_int4_repack_matches_torch_packer(out_features):
    from localv3.quant import repack_int4_for_cpu

    q = torch.randint(-8, 8, (out_features, 96), dtype=torch.int8)
    reference = torch._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)
    assert torch.equal(repack_int4_for_cpu(pack_int4(q)), reference)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [Q8, Q4], ids=lambda f: f.name)
def test_quant_linear_on_cuda_dequantises_per_call(fmt):
    torch.manual_seed(5)
    qw = quantize_weight(torch.randn(64, 128) / 128**0.5, fmt)
    layer = QuantLinear.from_weight(qw, device="cuda")
    assert layer.matrices.kernel.name == "dequant"
    x = torch.randn(3, 128, device="cuda", dtype=torch.bfloat16)
    assert rel_err(layer(x).cpu(), x.float().cpu() @ qw.dequantize().T) < 2e-2
