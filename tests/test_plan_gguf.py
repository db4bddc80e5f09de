"""`localv3 plan` of a GGUF: every tensor in the type the file holds (1.58-bit experts are not
planned as q4), sized by ggml's type table; split files read part by part."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from typer.testing import CliRunner

from cli import app
from localv3.config import ModelConfig
from localv3.gguf_export import _write_metadata

pytest.importorskip("llama_cpp")  # the configuration is read as the llama.cpp engine reads it

runner = CliRunner()
T = GGMLQuantizationType
# dims that every block size divides (K-quants and IQ types: 256 weights per block)
CONFIG = {
    "model_type": "deepseek_v3", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
    "moe_intermediate_size": 256, "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 4,
    "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
    "q_lora_rank": 256, "kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 64, "v_head_dim": 64,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "bos_token_id": 0, "eos_token_id": 1,
}  # fmt: skip
# a Unsloth-style dynamic mix: 1.58-bit experts, higher-bit attention and shared experts
EXPERT_TYPES = {1: (T.IQ1_S, T.IQ1_S, T.IQ2_XXS), 2: (T.Q2_K, T.Q3_K, T.Q3_K)}  # gate, up, down


def llama_tensors(c: dict) -> dict[str, tuple[tuple[int, ...], GGMLQuantizationType]]:
    """name -> (numpy shape, type) of a deepseek2 GGUF of config `c`, as llama.cpp names them."""
    h, heads, n = c["hidden_size"], c["num_attention_heads"], c["n_routed_experts"]
    qk, rank, rope = c["qk_nope_head_dim"] + c["qk_rope_head_dim"], c["kv_lora_rank"], c["qk_rope_head_dim"]
    tensors = {"token_embd.weight": ((c["vocab_size"], h), T.Q4_K), "output_norm.weight": ((h,), T.F32)}
    tensors["output.weight"] = ((c["vocab_size"], h), T.Q6_K)
    for i in range(c["num_hidden_layers"]):
        b = f"blk.{i}"
        tensors |= {
            f"{b}.attn_norm.weight": ((h,), T.F32), f"{b}.ffn_norm.weight": ((h,), T.F32),
            f"{b}.attn_q_a.weight": ((c["q_lora_rank"], h), T.Q6_K), f"{b}.attn_q_a_norm.weight": ((c["q_lora_rank"],), T.F32),
            f"{b}.attn_q_b.weight": ((heads * qk, c["q_lora_rank"]), T.Q6_K),
            f"{b}.attn_kv_a_mqa.weight": ((rank + rope, h), T.Q6_K), f"{b}.attn_kv_a_norm.weight": ((rank,), T.F32),
            f"{b}.attn_k_b.weight": ((heads, rank, c["qk_nope_head_dim"]), T.Q8_0),
            f"{b}.attn_v_b.weight": ((heads, c["v_head_dim"], rank), T.Q8_0),
            f"{b}.attn_output.weight": ((h, heads * c["v_head_dim"]), T.Q5_K),
        }  # fmt: skip
        if i < c["first_k_dense_replace"]:
            for proj, shape in (("gate", (c["intermediate_size"], h)), ("up", (c["intermediate_size"], h)), ("down", (h, c["intermediate_size"]))):
                tensors[f"{b}.ffn_{proj}.weight"] = (shape, T.Q5_K)
            continue
        m = c["moe_intermediate_size"]
        tensors[f"{b}.ffn_gate_inp.weight"] = ((n, h), T.F32)
        tensors[f"{b}.exp_probs_b.bias"] = ((n,), T.F32)
        gate, up, down = EXPERT_TYPES[i]
        tensors |= {f"{b}.ffn_gate_exps.weight": ((n, m, h), gate), f"{b}.ffn_up_exps.weight": ((n, m, h), up)}
        tensors[f"{b}.ffn_down_exps.weight"] = ((n, h, m), down)
        for proj, shape in (("gate", (m, h)), ("up", (m, h)), ("down", (h, m))):
            tensors[f"{b}.ffn_{proj}_shexp.weight"] = (shape, T.Q5_K)
    return tensors


def tensor_bytes(shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> int:
    block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    return int(np.prod(shape[:-1])) * shape[-1] // block * block_bytes


def write_gguf(path: Path, tensors: dict, metadata: bool = True) -> Path:
    """A GGUF holding `tensors` (zeros: planning reads headers only) with CONFIG's metadata."""
    writer = gguf.GGUFWriter(path, "deepseek2")
    if metadata:
        special = gguf.SpecialVocab(path.parent, n_vocab=CONFIG["vocab_size"])  # no tokenizer files: ids below
        special.special_token_ids = {"bos": 0, "eos": 1}
        vocab = {"pre": "default", "tokens": [f"t{i}" for i in range(CONFIG["vocab_size"])], "types": [1] * CONFIG["vocab_size"],
                 "special": special}  # fmt: skip
        _write_metadata(writer, ModelConfig.from_dict(CONFIG), vocab, path.stem, int(gguf.LlamaFileType.MOSTLY_IQ1_S))
    for name, (shape, ggml_type) in tensors.items():
        block, block_bytes = GGML_QUANT_SIZES[ggml_type]
        data = np.zeros((*shape[:-1], shape[-1] // block * block_bytes), dtype=np.uint8)
        writer.add_tensor(name, data, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def plan_json(*args: str) -> dict:
    result = runner.invoke(app, ["plan", *args, "--profile", "rtx4090-ddr5-dual", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALV3_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.fixture
def mixed(tmp_path) -> tuple[Path, dict]:
    tensors = llama_tensors(CONFIG)
    return write_gguf(tmp_path / "tiny-UD-IQ1_S.gguf", tensors), tensors


def test_a_gguf_is_planned_in_its_own_tensor_types(mixed):
    path, tensors = mixed
    data = plan_json(str(path))
    assert data["model"] == "tiny-UD-IQ1_S"
    assert data["quantization"] == {"experts": "iq1_s+iq2_xxs+q2_k+q3_k", "dense": "q5_k+q6_k+q8", "embeddings": "q4+q6_k"}
    planned = {g["kind"]: 0 for g in data["groups"]}
    for g in data["groups"]:
        planned[g["kind"]] += g["bytes"]
    in_file = sum(tensor_bytes(shape, t) for name, (shape, t) in tensors.items() if "_exps." in name)
    assert planned["routed_expert"] == in_file
    weights = sum(n for kind, n in planned.items() if kind != "kv_cache")
    assert weights == sum(tensor_bytes(shape, t) for shape, t in tensors.values())  # every tensor, as stored
    gate_up, down = 2 * 256 * 256, 256 * 256  # one expert's weights in layer 1
    assert data["bits_per_weight"]["experts"] == pytest.approx(8 * in_file / (2 * 8 * (gate_up + down)))
    assert data["bits_per_weight"]["experts"] < 3


def test_a_stated_scheme_replaces_the_files_types_for_its_role(mixed):
    path, tensors = mixed
    data = plan_json(str(path), "--experts", "q4")
    assert data["quantization"]["experts"] == "q4" and data["quantization"]["dense"] == "q5_k+q6_k+q8"
    assert data["bits_per_weight"]["experts"] == 4.5


def test_a_directory_holding_a_gguf_is_planned_from_it(mixed):
    path, _ = mixed
    data = plan_json(str(path.parent))
    assert data["quantization"]["experts"] == "iq1_s+iq2_xxs+q2_k+q3_k" and data["model"] == path.parent.name


def test_a_split_gguf_is_read_from_every_part(tmp_path):
    tensors = llama_tensors(CONFIG)
    names = list(tensors)
    first = write_gguf(tmp_path / "m-00001-of-00002.gguf", {n: tensors[n] for n in names[:10]})
    write_gguf(tmp_path / "m-00002-of-00002.gguf", {n: tensors[n] for n in names[10:]}, metadata=False)
    data = plan_json(str(first))
    assert data["model"] == "m" and data["quantization"]["experts"] == "iq1_s+iq2_xxs+q2_k+q3_k"
    (tmp_path / "m-00002-of-00002.gguf").unlink()
    result = runner.invoke(app, ["plan", str(first), "--profile", "cpu-only"])
    assert result.exit_code == 1 and "split model lacks m-00002-of-00002.gguf" in str(result.exception)


def test_a_file_that_is_not_a_gguf_is_one_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    result = runner.invoke(app, ["plan", str(bad), "--profile", "cpu-only"])
    assert result.exit_code == 1 and f"{bad}: not a readable GGUF file" in str(result.exception)


def test_every_tensor_the_exporter_writes_is_planned_as_stored(tmp_path):
    """The names a `localv3 quantize --format gguf` file uses all map onto the model's tensors."""
    from fixtures_cli import train_tokenizer
    from localv3.gguf_export import export_gguf
    from localv3.synthetic import TINY_V3, write_checkpoint

    tokenizer = train_tokenizer()
    config = {**TINY_V3, "q_lora_rank": 64, "vocab_size": tokenizer.get_vocab_size()}
    source = write_checkpoint(tmp_path / "src", config)
    tokenizer.save(str(source / "tokenizer.json"))
    path = export_gguf(source, tmp_path / "out" / "t.gguf", "f32", "t").path
    data = plan_json(str(path), "--no-mtp")
    assert data["quantization"] == {"experts": "fp32", "dense": "fp32", "embeddings": "fp32"}
    weights = sum(g["bytes"] for g in data["groups"] if g["kind"] != "kv_cache")
    assert weights == sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def test_a_gguf_entry_not_yet_pulled_is_planned_in_its_precision():
    result = runner.invoke(app, ["plan", "deepseek-r1-gguf", "--profile", "rtx4090-ddr5-dual", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["quantization"]["experts"] == "iq1_s" and data["bits_per_weight"]["experts"] == 1.5625
    assert "not downloaded: its routed experts are planned as IQ1_S (its precision, UD-IQ1_S)" in result.stderr
    assert not any(g["device"] == "disk" for g in data["groups"])  # 192 GiB holds a 1.58-bit V3
