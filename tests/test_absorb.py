"""MLA's kv_b_proj is absorbed once at load: decode never re-derives it, and the absorbed path
equals the naive one."""

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import localv3
from localv3.config import ModelConfig
from localv3.model.attention import MLA
from localv3.model.transformer import Transformer
from localv3.registry import SHIPPED_CONFIGS_DIR
from localv3.synthetic import TINY_V3, write_checkpoint
from model_configs import KIMI_K2_STYLE, V2_LITE, V3_MTP

# nope != v, so that W_UK- and W_UV-shaped tensors are told apart
V3_UNEVEN_HEADS = {**V3_MTP, "qk_nope_head_dim": 12, "v_head_dim": 20}
EQUALITY_CONFIGS = {
    "v3": V3_MTP,
    "v3_half_rope": {**V3_MTP, "rope_interleave": False},
    "v2_lite": V2_LITE,
    "kimi_k2_style": KIMI_K2_STYLE,
}


class OpRecorder(TorchDispatchMode):
    """Records (op name, input shapes, output shapes) of every aten op."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = tensor_shapes(list(args) + list((kwargs or {}).values()))
        self.ops.append((func.overloadpacket.__name__, inputs, tensor_shapes([out])))
        return out


def tensor_shapes(values) -> list[tuple[int, ...]]:
    """Shapes of the tensors among values, looking one level into lists and tuples."""
    flat = [item for value in values for item in (value if isinstance(value, (list, tuple)) else [value])]
    return [tuple(t.shape) for t in flat if isinstance(t, torch.Tensor)]


@pytest.fixture(scope="module")
def uneven_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("uneven"), V3_UNEVEN_HEADS, seed=2, dtype=torch.float32)


def attentions(model: Transformer) -> list[MLA]:
    return [m for m in model.modules() if isinstance(m, MLA)]


def test_loaded_model_holds_w_uk_and_w_uv_projections_instead_of_kv_b_proj(uneven_dir):
    model = localv3.load(uneven_dir, device="cpu", dtype=torch.float32).model
    c = model.config
    mlas = attentions(model)
    assert len(mlas) == c.num_hidden_layers + c.num_nextn_predict_layers  # the MTP head's block too
    buffers = dict(model.named_buffers())
    for mla in mlas:
        assert not hasattr(mla, "kv_b_proj")
        assert mla.uk.right.shape == (c.num_attention_heads, c.qk_nope_head_dim, c.kv_lora_rank)
        assert mla.uv.right.shape == (c.num_attention_heads, c.kv_lora_rank, c.v_head_dim)
        assert mla.uk.right.is_contiguous() and mla.uv.right.is_contiguous()
        assert mla.uk.right.dtype == mla.uv.right.dtype == torch.float32
        assert any(t is mla.uk.right for t in buffers.values()) and any(t is mla.uv.right for t in buffers.values())


def test_absorbed_weights_are_kv_b_proj_split_per_head(uneven_dir):
    from localv3.checkpoint import CheckpointReader

    model = localv3.load(uneven_dir, device="cpu", dtype=torch.float32).model
    c = model.config
    kv_b = CheckpointReader(uneven_dir).get("model.layers.1.self_attn.kv_b_proj.weight", torch.float32)
    per_head = kv_b.view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
    mla = model.model.layers[1].self_attn
    assert torch.equal(mla.uk.right, per_head[:, : c.qk_nope_head_dim])
    assert torch.equal(mla.uv.right, per_head[:, c.qk_nope_head_dim :].transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_never_rederive_kv_b(uneven_dir, dtype):
    """No op of a decode step or an MTP step sees a tensor shaped like kv_b_proj [H*(nope+v), C]
    or its per-head view, nor makes a W_UK/W_UV-shaped tensor (a cast, a copy, a transpose)."""
    engine = localv3.load(uneven_dir, device="cpu", dtype=dtype)
    c = engine.config
    heads, nope, v, rank = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank
    kv_b_shapes = {(heads * (nope + v), rank), (heads, nope + v, rank)}
    derived_shapes = kv_b_shapes | {(heads, nope, rank), (heads, rank, nope), (heads, v, rank), (heads, rank, v)}
    session = engine.new_session(32)
    session.forward(list(range(3, 15)))
    recorder = OpRecorder()
    with torch.inference_mode(), recorder:
        session.forward([5])
        hidden, position = session.last_hidden, session.position - 1
        engine.model.mtp_forward(hidden, torch.tensor([[6]]), position, session.cache, logits_rows=1)
    assert len(recorder.ops) > 100
    for name, inputs, outputs in recorder.ops:
        assert not kv_b_shapes & set(inputs), (name, inputs)
        assert not derived_shapes & set(outputs), (name, outputs)


def test_one_token_step_builds_no_mask(uneven_dir):
    """A decode step's query sees every cached key: no causal mask is made or applied."""
    engine = localv3.load(uneven_dir, device="cpu", dtype=torch.float32)
    session = engine.new_session(16)
    session.forward([3, 4, 5])
    block = engine.model.model.layers[1]
    rope = engine.model.rope(3, 1, torch.device("cpu"), torch.float32)
    recorder = OpRecorder()
    with torch.inference_mode(), recorder:
        block.self_attn(torch.randn(1, 1, engine.config.hidden_size), 3, rope, session.cache, 1)
    names = {name for name, _, _ in recorder.ops}
    assert not names & {"arange", "gt", "le", "masked_fill", "bitwise_not"}, names


@pytest.mark.parametrize("name", sorted(EQUALITY_CONFIGS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_absorbed_attention_equals_naive_attention(tmp_path, name, seed):
    """Prefill and decode steps (each reading the cache) give the same logits on both paths."""
    model_dir = write_checkpoint(tmp_path, EQUALITY_CONFIGS[name], seed=seed, dtype=torch.float32)
    engine = localv3.load(model_dir, device="cpu", dtype=torch.float32)
    ids = torch.randint(2, engine.config.vocab_size, (20,), generator=torch.Generator().manual_seed(seed)).tolist()

    def run(absorb: bool) -> torch.Tensor:
        for mla in attentions(engine.model):
            mla.path = "absorbed" if absorb else "naive"
        session = engine.new_session(len(ids) + 4)
        rows = [session.forward(ids)]
        for token in (5, 9, 11):
            rows.append(session.forward([token]))
        return torch.cat(rows)

    naive, absorbed = run(False), run(True)
    assert (naive - absorbed).abs().max().item() < 1e-4  # measured: at most 4.4e-6 (logits up to ~5)


def random_transformer(seed: int) -> Transformer:
    """TINY_V3 built in code, not loaded: matrices ~ N(0, 1/fan_in), norms near 1."""
    g = torch.Generator().manual_seed(seed)
    model = Transformer(ModelConfig.from_dict(TINY_V3)).eval()
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=g)
            param.copy_(noise / param.shape[-1] ** 0.5 if param.dim() > 1 else 1 + 0.1 * noise)
    return model


def test_absorbing_keeps_the_output_of_an_unabsorbed_model():
    """A model built in code (trained, as scripts/train_tiny.py does) reads kv_b_proj through
    views until absorb_kv_b; both give the same logits."""
    model = random_transformer(0)
    ids = torch.arange(3, 13)[None]  # [1, 10]
    with torch.inference_mode():
        before, _ = model(ids, 0, model.new_cache(10))
        model.absorb_kv_b()
        after, _ = model(ids, 0, model.new_cache(10))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_gradients_reach_kv_b_proj_before_absorbing():
    model = random_transformer(1).train()
    logits, _ = model(torch.arange(3, 11)[None], 0, model.new_cache(8))
    logits.logsumexp(-1).sum().backward()
    grad = model.model.layers[0].self_attn.kv_b_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("config_file", sorted(p.name for p in SHIPPED_CONFIGS_DIR.glob("*.json")))
def test_each_call_takes_the_path_with_fewer_multiply_adds(config_file):
    """With every shipped model's widths: decode steps and short drafts over a cache read the
    latents (absorbed); a prompt chunk, whose keys are about its own queries, expands them (naive)."""
    mla = shipped_mla(config_file)
    assert mla.widths.cheaper_path(1, 16) == mla.widths.cheaper_path(1, 4096) == mla.widths.cheaper_path(3, 4096) == "absorbed"
    assert mla.widths.cheaper_path(64, 64) == mla.widths.cheaper_path(512, 512) == mla.widths.cheaper_path(512, 1024) == "naive"


def shipped_mla(config_file: str) -> MLA:
    config = json.loads((SHIPPED_CONFIGS_DIR / config_file).read_text())
    return MLA(ModelConfig.from_dict(config | {"num_hidden_layers": 1}))


def test_the_path_costs_are_the_counted_multiply_adds():
    """DeepSeek-V3's widths, counted by hand per head: naive expands T latents (T*C*(nope+v)) and
    attends with 192-deep keys and 128-wide values; absorbed maps S queries (S*C*(nope+v)) and
    attends with 576-deep keys and 512-wide latent values."""
    mla = shipped_mla("deepseek-v3.json")
    naive = lambda s, t: t * 512 * 256 + s * t * (128 + 64 + 128)  # noqa: E731
    absorbed = lambda s, t: s * 512 * 256 + s * t * (512 + 64 + 512)  # noqa: E731
    for queries, keys in ((1, 1), (2, 300), (170, 4096), (200, 4096), (256, 256), (512, 8192)):
        expected = "naive" if naive(queries, keys) < absorbed(queries, keys) else "absorbed"
        assert mla.widths.cheaper_path(queries, keys) == expected, (queries, keys)
    assert mla.widths.cheaper_path(512, 8192) == "naive" and mla.widths.cheaper_path(2, 300) == "absorbed"
