"""GGUF export (`localv3 quantize --format gguf`) and the llama.cpp engine against the native one."""

import json
import shutil
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

pytest.importorskip("llama_cpp")

import localv3
from cli import app
from fixtures_cli import BOS, CHAT_TEMPLATE, EOS, train_tokenizer
from localv3.engines.llama_cpp import LlamaCppEngine, LlamaCppTokenizer, load_gguf
from localv3.gguf_export import export_gguf
from localv3.offload.quant import Quantization
from localv3.quantize import QuantizeError
from localv3.synthetic import TINY_V3, write_checkpoint
from localv3.tokenizer import Tokenizer
from threads import one_thread

runner = CliRunner()
TINY_TRAINED = Path(__file__).resolve().parents[1] / "localv3" / "assets" / "tiny"
# q_lora_rank 64, not 48: llama.cpp 0.5.0-dev's f16 dot product is wrong for lengths that are
# not a multiple of 32 here (q_b falls back to f16 in a Q8_0 file); real models' dims are.
RANDOM_V3 = {**TINY_V3, "q_lora_rank": 64}
EXACT = {"flash_attn": False, "kv_type": "f32"}  # llama.cpp at full precision


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """A random FP8 multi-shard V3 with a byte-level BPE tokenizer and a chat template."""
    out = tmp_path_factory.mktemp("src") / "random-v3"
    tokenizer = train_tokenizer()
    config = {**RANDOM_V3, "vocab_size": tokenizer.get_vocab_size(), "bos_token_id": tokenizer.token_to_id(BOS),
              "eos_token_id": tokenizer.token_to_id(EOS)}  # fmt: skip
    with one_thread():
        write_checkpoint(out, config, fp8=True, shards=3)
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return out


@pytest.fixture(scope="module")
def random_f32(random_model, tmp_path_factory):
    return export_gguf(random_model, tmp_path_factory.mktemp("gguf") / "random-v3-f32.gguf", "f32", "random-v3").path


@pytest.fixture(scope="module")
def native(random_model):
    """The exact reference: float32 throughout, lm_head included (a bf16 one on the CPU would
    round its activations to bf16)."""
    with one_thread():
        exact = Quantization(experts="fp8", dense="fp8", embeddings="fp32")
        return localv3.load(random_model, device="cpu", dtype=torch.float32, quantization=exact)


def test_metadata_and_tensors(random_f32):
    reader = gguf.GGUFReader(random_f32)

    def value(key):
        field = reader.fields[key]
        return field.contents()

    c = RANDOM_V3
    assert value("general.architecture") == "deepseek2"
    expected = {
        "deepseek2.block_count": c["num_hidden_layers"],
        "deepseek2.attention.head_count_kv": 1,
        "deepseek2.attention.key_length": c["kv_lora_rank"] + c["qk_rope_head_dim"],
        "deepseek2.attention.value_length": c["kv_lora_rank"],
        "deepseek2.attention.key_length_mla": c["qk_nope_head_dim"] + c["qk_rope_head_dim"],
        "deepseek2.attention.value_length_mla": c["v_head_dim"],
        "deepseek2.attention.q_lora_rank": c["q_lora_rank"],
        "deepseek2.rope.dimension_count": c["qk_rope_head_dim"],
        "deepseek2.expert_gating_func": 2,
        "deepseek2.expert_count": c["n_routed_experts"],
        "deepseek2.expert_used_count": c["num_experts_per_tok"],
        "deepseek2.expert_group_count": c["n_group"],
        "deepseek2.expert_group_used_count": c["topk_group"],
        "deepseek2.leading_dense_block_count": c["first_k_dense_replace"],
        "deepseek2.expert_weights_norm": True,
        "deepseek2.rope.scaling.type": "yarn",
        "deepseek2.rope.scaling.original_context_length": 128,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
    }
    for key, wanted in expected.items():
        assert value(key) == wanted, key
    assert value("deepseek2.expert_weights_scale") == pytest.approx(2.5)
    assert value("deepseek2.rope.scaling.yarn_log_multiplier") == pytest.approx(0.1)
    assert value("tokenizer.chat_template") == CHAT_TEMPLATE
    tensors = {t.name: t for t in reader.tensors}
    heads, nope, v, rank = c["num_attention_heads"], c["qk_nope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    # ggml order is numpy's reversed
    assert list(tensors["blk.0.attn_k_b.weight"].shape) == [nope, rank, heads]
    assert list(tensors["blk.0.attn_v_b.weight"].shape) == [rank, v, heads]
    assert list(tensors["blk.1.ffn_gate_exps.weight"].shape) == [c["hidden_size"], c["moe_intermediate_size"], c["n_routed_experts"]]
    assert tensors["blk.1.exp_probs_b.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    assert not [name for name in tensors if name.startswith(f"blk.{c['num_hidden_layers']}.")]  # no MTP layer


def test_f32_gguf_matches_the_native_engine(random_f32, native):
    engine = load_gguf(random_f32, max_context=256, **EXACT)
    prompt = native.tokenizer.encode("Hello! Tell me about the experts and the GPU.")
    with one_thread():
        expected = native.logits(prompt)
        reference_tokens = native.generate(prompt, 20)
    got = engine.logits(prompt)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-3  # measured 3.6e-6
    assert engine.generate(prompt, 20) == reference_tokens
    # llama.cpp's defaults (f16 cache): still the same greedy tokens here
    assert load_gguf(random_f32, max_context=256).generate(prompt, 20) == reference_tokens


def test_routed_experts_are_placed_on_the_cpu_buffer(random_f32):
    engine = load_gguf(random_f32, max_context=64)
    moe_layers = range(RANDOM_V3["first_k_dense_replace"], RANDOM_V3["num_hidden_layers"])
    assert sorted(engine.cpu_tensors) == sorted(
        f"blk.{i}.ffn_{proj}_exps.weight" for i in moe_layers for proj in ("gate", "up", "down")
    )
    assert load_gguf(random_f32, max_context=64, cpu_moe=False).cpu_tensors == []


def test_engine_config_from_gguf_metadata(random_f32, native):
    config = load_gguf(random_f32, max_context=64).config
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "kv_lora_rank", "qk_nope_head_dim", "n_routed_experts",
                  "num_experts_per_tok", "n_group", "topk_group", "scoring_func", "first_k_dense_replace", "rope_scaling",
                  "bos_token_id", "eos_token_id"):  # fmt: skip
        assert getattr(config, field) == getattr(native.config, field), field
    assert config.softmax_scale == pytest.approx(native.config.softmax_scale)


def test_load_of_a_gguf_path_streams_text(random_f32, native):
    engine = localv3.load(random_f32, max_context=128)
    assert isinstance(engine, LlamaCppEngine)
    # no tokenizer.json beside the file: llama.cpp's own vocabulary, same ids and chat rendering
    assert isinstance(engine.tokenizer, LlamaCppTokenizer)
    messages = [{"role": "user", "content": "Hello! How can I help you today?"}]
    prompt = native.tokenizer.encode_chat(messages)
    assert engine.tokenizer.encode_chat(messages) == prompt
    with one_thread():
        expected = native.generate(prompt, 12)
    chunks = list(engine.stream_generate(prompt, max_new_tokens=12, stop_token_ids=[]))
    assert [t for c in chunks for t in c.token_ids] == expected
    assert "".join(c.text for c in chunks) == native.tokenizer.decode(expected)
    assert chunks[-1].stats.completion_tokens == 12


def test_a_session_is_replaced_by_the_next(random_f32):
    engine = load_gguf(random_f32, max_context=64)
    first = engine.new_session(32)
    first.prefill([5, 6, 7])
    engine.new_session(32)
    with pytest.raises(Exception, match="replaced by a newer one"):
        first.decode(8)


@pytest.mark.skipif(not (TINY_TRAINED / "model.safetensors").is_file(), reason="the trained tiny model is not built")
def test_trained_tiny_model_q8_0_greedy_tokens_identical(tmp_path):
    with one_thread():
        reference = localv3.load(TINY_TRAINED, device="cpu", dtype=torch.float32)
        questions = ["What is 12 + 7?", "Reverse the words: apple river green", "What is the capital of Japan?"]
        prompts = [reference.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions]
        expected = [reference.generate(ids, 16) for ids in prompts]
        expected_logits = reference.logits(prompts[0])
    f32 = load_gguf(export_gguf(TINY_TRAINED, tmp_path / "tiny-f32.gguf", "f32", "tiny").path, max_context=256, **EXACT)
    assert (f32.logits(prompts[0]) - expected_logits).abs().max().item() < 1e-3  # measured 1.3e-5
    q8 = load_gguf(export_gguf(TINY_TRAINED, tmp_path / "tiny-q8_0.gguf", "q8_0", "tiny").path, max_context=256)
    assert isinstance(q8.tokenizer, LlamaCppTokenizer)
    for ids, tokens in zip(prompts, expected):
        assert q8.generate(ids, 16) == tokens
    reference_tokenizer = Tokenizer(TINY_TRAINED)
    for text in ("What is 1234 + 56?", "  two  spaces\nand a newline", "Reverse: sea hill"):
        assert q8.tokenizer.encode(text) == reference_tokenizer.encode(text)
        assert q8.tokenizer.decode(reference_tokenizer.encode(text)) == reference_tokenizer.decode(reference_tokenizer.encode(text))


def test_cli_exports_gguf(random_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALV3_HOME", str(tmp_path / "home"))
    result = runner.invoke(app, ["quantize", str(random_model), "--format", "gguf", "--type", "q8_0"])
    assert result.exit_code == 0, result.output
    target = tmp_path / "home" / "models" / "random-v3-q8_0.gguf"
    assert result.stdout.strip() == str(target)
    assert gguf.GGUFReader(target).fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no intermediate left


def test_cli_rejects_mixed_options(random_model, tmp_path):
    mixed = runner.invoke(app, ["quantize", str(random_model), "--format", "gguf", "--experts", "q8"])
    assert isinstance(mixed.exception, QuantizeError) and "--type" in str(mixed.exception)
    bad_type = runner.invoke(app, ["quantize", str(random_model), "--format", "gguf", "--type", "q3", "--out", str(tmp_path)])
    assert isinstance(bad_type.exception, QuantizeError) and "q4_k_m" in str(bad_type.exception)


def test_a_tensor_without_a_gguf_place_is_an_error(random_model, tmp_path):
    model = shutil.copytree(random_model, tmp_path / "m")
    shard = model / "model-00001-of-00003.safetensors"
    tensors = load_file(str(shard))
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(RANDOM_V3["hidden_size"])
    save_file(tensors, str(shard))
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.o_proj.bias"] = shard.name
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(QuantizeError, match="o_proj.bias has no place"):
        export_gguf(model, tmp_path / "x.gguf", "f32", "x")
    (model / "tokenizer.json").unlink()
    with pytest.raises(QuantizeError, match="tokenizer.json not found"):
        export_gguf(model, tmp_path / "x.gguf", "f32", "x")
    assert list(tmp_path.glob("*.gguf")) == [] and not list(tmp_path.glob(".*"))
