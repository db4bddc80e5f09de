"""localv3's own CPU kernels (localv3/kernels): built for this machine, and exact against the
formula they compute: the dequantised weights times the activations rounded to 8 bits per block
(one scale per 256 values for Q4_K and Q6_K, per 32 for Q8_0 and Q4_0), for both instruction sets
they are written for (AVX-512BW and AVX2: an AVX2 build runs on any machine that has AVX2)."""

import platform
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from localv3.formats import ggml
from localv3.formats.table import GGUF_BLOCK_TYPES, Q4_0, Q4_K, Q8_0
from localv3.kernels import build, products

SEEDS = (0, 1, 2)
AVX2_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
EXACT = 1e-5  # float32 summation order; a wrong block layout or scale is off by ~1
Q6_K = GGUF_BLOCK_TYPES["q6_k"]  # in llama.cpp's Q4_K_M files (some ffn_down, attn_v, output)


def cpu_flags() -> set[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return {flag for line in lines if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def buildable_here() -> bool:
    """x86-64 Linux with a C compiler and AVX2 (with FMA and F16C): the kernels must build."""
    return platform.machine() == "x86_64" and build._compiler() is not None and {"avx2", "fma", "f16c"} <= cpu_flags()


needs_build = pytest.mark.skipif(not buildable_here(), reason="needs x86-64 with AVX2 and a C compiler")


@pytest.fixture(scope="module", params=["native", "avx2"])
def kernels(request, tmp_path_factory):
    """The kernels as built for this machine (-march=native), and an AVX2-only build."""
    if not buildable_here():
        pytest.skip("needs x86-64 with AVX2 and a C compiler")
    if request.param == "native":
        return build.library()
    library = build.KernelLibrary(build.compile_library(tmp_path_factory.mktemp("avx2"), AVX2_FLAGS))
    assert library.lv3_avx512() == 0
    return library


@pytest.fixture
def use(kernels, monkeypatch):
    monkeypatch.setattr(products, "library", lambda: kernels)


def activation_block(block_type) -> int:
    """Values per activation scale: 256 for the K types, 32 for the others."""
    return 256 if block_type.block == 256 else 32


def rounded_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., n] -> what the kernels compute with: per block of `block` values, d = max|x| / 127
    and x ~ d * round(x / d), in float32 as the kernels do."""
    blocks = x.reshape(*x.shape[:-1], -1, block)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(blocks * inverse) * scale).reshape(x.shape)


def quantised(values: torch.Tensor, block_type) -> tuple[torch.Tensor, torch.Tensor]:
    """values [..., rows, n] -> (blocks uint8 [..., rows, row bytes], their dequantised float64 values)."""
    n = values.shape[-1]
    blocks = ggml.quantize_rows(values.reshape(-1, n), block_type.ggml_type)
    dense = ggml.dequantize_rows(blocks, block_type.ggml_type, n).double()
    return blocks.view(*values.shape[:-1], -1), dense.view(values.shape)


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).abs().max() / expected.abs().max()).item()


@needs_build
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "block_type,n", [(Q4_K, 768), (Q6_K, 512), (Q8_0, 96), (Q8_0, 512), (Q4_0, 96), (Q4_0, 160)], ids=lambda v: getattr(v, "name", v)
)
def test_products_are_the_dequantised_weights_times_8_bit_activations(use, block_type, n, seed):
    """Groups of matrices, each with its own activation rows; row counts that do not split evenly
    over threads, odd block counts (96 = 3 blocks of 32), up to the most tokens a call takes."""
    g = torch.Generator().manual_seed(seed)
    groups, rows = 3, 37
    blocks, dense = quantised(torch.randn(groups, rows, n, generator=g), block_type)
    for tokens in (1, 2, 5, products.DECODE_TOKENS):
        x = torch.randn(groups, tokens, n, generator=g) * torch.rand(groups, tokens, 1, generator=g) * 4
        expected = rounded_activations(x, activation_block(block_type)).double() @ dense.transpose(1, 2)
        assert rel_err(products.matmul(blocks, block_type, n, x), expected) < EXACT
        assert rel_err(products.matmul(blocks[1], block_type, n, x[1]), expected[1]) < EXACT  # one matrix


@needs_build
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "block_type,n", [(Q4_K, 256), (Q4_K, 1280), (Q6_K, 256), (Q6_K, 1280), (Q8_0, 96), (Q8_0, 1280)], ids=lambda v: getattr(v, "name", v)
)
def test_prefill_products_are_the_same_formula(use, block_type, n, seed):
    """Prefill-sized products (more than DECODE_TOKENS rows) of the block types the panel kernels
    take here: the same numbers as decoding's; token counts around the panels' tiles and their
    minimum, row counts that are not a multiple of a panel's rows, block counts that are not a
    multiple of those packed at once (Q8_0: 3, 40). Types without a panel kernel (all of them in
    the AVX2 build) are left to ggml."""
    g = torch.Generator().manual_seed(seed)
    groups, rows = 2, 37
    blocks, dense = quantised(torch.randn(groups, rows, n, generator=g), block_type)
    for tokens in (products.DECODE_TOKENS + 1, 15, 16, 17, 40, 96):
        x = torch.randn(groups, tokens, n, generator=g) * torch.rand(groups, tokens, 1, generator=g) * 4
        got = products.matmul(blocks, block_type, n, x)
        if not products.panels_take(block_type):
            assert got is None
            continue
        expected = rounded_activations(x, activation_block(block_type)).double() @ dense.transpose(1, 2)
        assert rel_err(got, expected) < EXACT


@needs_build
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gate_type,down_type", [(Q4_K, Q4_K), (Q4_K, Q6_K), (Q4_K, Q8_0), (Q8_0, Q4_0)], ids=lambda t: t.name)
def test_swiglu_experts_are_the_formula_on_8_bit_activations(use, gate_type, down_type, seed):
    """Each token's chosen experts (several tokens sharing some), weighted and summed; the expert
    matrices are views into one tensor per projection, as a GGUF's are."""
    g = torch.Generator().manual_seed(seed)
    n_experts, dim, hidden, k = 5, 512, 256, 3
    gate, gate_dense = quantised(torch.randn(n_experts, hidden, dim, generator=g), gate_type)
    up, up_dense = quantised(torch.randn(n_experts, hidden, dim, generator=g), gate_type)
    down, down_dense = quantised(torch.randn(n_experts, dim, hidden, generator=g) / 8, down_type)
    gate_block, down_block = activation_block(gate_type), activation_block(down_type)
    for tokens in (1, 4, products.DECODE_TOKENS, 40, 70):  # 40, 70: 24 and 42 rows an expert (panels)
        x = torch.randn(tokens, dim, generator=g)
        ids = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(tokens)]).int()  # [T, k]
        weights = torch.rand(tokens, k, generator=g)
        expected = torch.zeros(tokens, dim, dtype=torch.float64)
        for t in range(tokens):
            xt = rounded_activations(x[t], gate_block).double()
            for j in range(k):
                e = int(ids[t, j])
                h = (F.silu(gate_dense[e] @ xt) * (up_dense[e] @ xt)).float()
                expected[t] += weights[t, j].double() * (down_dense[e] @ rounded_activations(h, down_block).double())
        got = products.swiglu_experts(gate, up, gate_type, down, down_type, x, ids, weights)
        if tokens * k > products.EXPERT_ROWS * n_experts and not products.panels_take(gate_type, down_type):
            assert got is None  # many rows an expert, a type without panels: ggml's
            continue
        # the hidden values are rounded to 8 bits after float32 arithmetic that may differ in the
        # last bit from torch's: a rare value rounds to the next step (1/127 of its block's largest)
        assert rel_err(got, expected) < 1e-3


@needs_build
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("block_type", [Q8_0, Q4_0], ids=lambda t: t.name)
def test_transposed_dequantisation_is_the_dequantised_weights_transposed(use, block_type, seed):
    """Per-head matrices [H, rows, in] -> [H * in, rows], exactly ggml's dequantised values;
    a row count that is not a multiple of the 16-row tiles."""
    heads, rows, n = 3, 37, 96
    blocks, dense = quantised(torch.randn(heads, rows, n, generator=torch.Generator().manual_seed(seed)), block_type)
    got = products.dequantize_transposed(blocks, block_type, n)
    assert torch.equal(got, dense.float().transpose(1, 2).reshape(heads * n, rows))


@needs_build
def test_calls_the_kernels_do_not_take_fall_back(use):
    """Prefill-sized products of block types without a panel kernel here, experts with many rows
    each in such types and block types without any kernel here are left to ggml (None)."""
    for block_type in (Q4_K, Q4_0):
        blocks, _ = quantised(torch.randn(4, 256), block_type)
        prefill = products.matmul(blocks, block_type, 256, torch.randn(products.DECODE_TOKENS + 1, 256))
        assert (prefill is None) == (not products.panels_take(block_type))
    experts, _ = quantised(torch.randn(2, 256, 256), Q4_0)
    tokens = products.EXPERT_ROWS + 1  # every token chooses both experts: EXPERT_ROWS + 1 rows each
    ids, weights = torch.tensor([[0, 1]] * tokens, dtype=torch.int32), torch.ones(tokens, 2)
    assert products.swiglu_experts(experts, experts, Q4_0, experts, Q4_0, torch.randn(tokens, 256), ids, weights) is None
    assert products.swiglu_experts(experts, experts, Q4_0, experts, Q4_0, torch.randn(tokens - 1, 256), ids[1:], weights[1:]) is not None
    assert not products.takes(GGUF_BLOCK_TYPES["iq4_xs"]) and products.takes(Q4_K, Q6_K, Q8_0, Q4_0)
    assert products.dequantize_transposed(quantised(torch.randn(2, 256, 256), Q4_K)[0], Q4_K, 256) is None  # 32-value types only


@needs_build
def test_the_library_is_built_once_and_then_loaded(tmp_path):
    first = build.compile_library(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build.compile_library(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial file left


def test_without_a_compiler_ggml_is_used_after_one_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOCALV3_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    build.library.cache_clear()
    try:
        assert build.library() is None
        warning = capsys.readouterr().err.strip().splitlines()
        assert len(warning) == 1 and "could not be built" in warning[0] and "ggml" in warning[0]
        build.library.cache_clear()
        assert build.library() is None and capsys.readouterr().err == ""  # the reason is remembered
    finally:
        build.library.cache_clear()


def test_the_switch_keeps_ggml(monkeypatch):
    monkeypatch.setenv(build.SWITCH, "ggml")
    build.library.cache_clear()
    try:
        assert build.library() is None and not products.takes(Q4_K)
    finally:
        build.library.cache_clear()


@needs_build
def test_the_kernels_build_on_this_machine():
    library = build.library()
    assert library is not None and all(library.lv3_supports(t.ggml_type) for t in (Q4_K, Q6_K, Q8_0, Q4_0))
