"""GGUF files in the native engine (`localv3.load(x.gguf, engine="native")`, `--engine native`).

Tiny random DeepSeek-V3 checkpoints (seeds 0-2, rows of 256 so that llama.cpp's q4_k_m writes
Q4_K and Q6_K experts beside Q5_0/Q5_1/Q8_0/F16 matrices) are exported to GGUF by
`localv3 quantize --format gguf` and loaded natively:
- f32: against the same model loaded from our checkpoint, max |logit difference| measured
  1.9e-6 (asserted <= 1e-4), greedy tokens identical; the experts go through ggml's mul_mat_id
  on the mapped F32 tensors.
- q8_0, q4_k_m: against our checkpoint holding the GGUF's own weights dequantised, with ggml
  switched off (block matrices dequantised per call, as on a GPU) so that the comparison is
  exact (asserted <= 1e-4): the tensors, their names and the kv_b split are wired right. ggml's
  kernels on the mapped blocks are compared with a copied bank of the same blocks.
"""

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf.quants import dequantize
from safetensors.torch import load_file, save_file

pytest.importorskip("llama_cpp")

import localv3
from cli_entry import one_error_line, run_main
from fixtures_cli import BOS, CHAT_TEMPLATE, EOS, train_tokenizer
from localv3.engines.llama_cpp import LlamaCppTokenizer
from localv3.formats import ggml
from localv3.formats.blocks import QuantizedWeight
from localv3.formats.modules import QuantExpertBank, QuantMatrices
from localv3.formats.table import GGUF_BLOCK_TYPES
from localv3.gguf_export import export_gguf
from localv3.model.moe import run_experts
from localv3.offload.gguf_weights import open_gguf
from localv3.offload.routing_stats import moe_layers
from localv3.synthetic import TINY_V3, write_checkpoint
from localv3.tokenizer import Tokenizer
from threads import one_thread

SEEDS = (0, 1, 2)
GGUF_TYPES = ("f32", "q8_0", "q4_k_m")
WIDE_V3 = {**TINY_V3, "hidden_size": 256, "moe_intermediate_size": 256, "intermediate_size": 512, "q_lora_rank": 64}
PROMPT = list(range(5, 45))
needs_ggml = pytest.mark.skipif(not ggml.available(), reason="ggml's CPU kernels are not available")


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module", autouse=True)
def home(tmp_path_factory):
    """One localv3 home for the module: this machine is measured once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOCALV3_HOME", str(tmp_path_factory.mktemp("home")))
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """seed -> (our f32 checkpoint, {GGUF type: its export}); the GGUFs lie apart from the
    checkpoint (no tokenizer.json beside them)."""
    tokenizer = train_tokenizer()
    ids = {"vocab_size": tokenizer.get_vocab_size(), "bos_token_id": tokenizer.token_to_id(BOS), "eos_token_id": tokenizer.token_to_id(EOS)}
    made = {}
    for seed in SEEDS:
        checkpoint = write_checkpoint(tmp_path_factory.mktemp("src") / f"wide-{seed}", {**WIDE_V3, **ids}, seed, torch.float32)
        tokenizer.save(str(checkpoint / "tokenizer.json"))
        settings = {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True, "chat_template": CHAT_TEMPLATE}
        (checkpoint / "tokenizer_config.json").write_text(json.dumps(settings))
        out = tmp_path_factory.mktemp("gguf")
        made[seed] = checkpoint, {t: export_gguf(checkpoint, out / f"wide-{seed}-{t}.gguf", t, "wide").path for t in GGUF_TYPES}
    return made


def native(path: Path):
    return localv3.load(path, engine="native", device="cpu", dtype=torch.float32, cpu_threads=1)


@pytest.mark.parametrize("seed", SEEDS)
def test_f32_gguf_matches_our_checkpoint(models, seed):
    checkpoint, files = models[seed]
    reference, engine = localv3.load(checkpoint, device="cpu", dtype=torch.float32), native(files["f32"])
    assert (engine.logits(PROMPT) - reference.logits(PROMPT)).abs().max().item() <= 1e-4
    assert engine.generate(PROMPT, 12) == reference.generate(PROMPT, 12)


def dequantised_checkpoint(checkpoint: Path, gguf_file: Path, out: Path) -> Path:
    """`checkpoint` (main layers only) with every tensor the GGUF holds replaced by the GGUF's
    value, dequantised: what the native engine on the GGUF should compute."""
    reader = open_gguf(gguf_file).weights.reader
    config = json.loads((checkpoint / "config.json").read_text())
    tensors = {name: reader.get(name) for name in load_file(str(checkpoint / "model.safetensors")) if name in reader}
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    save_file(tensors, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_k_m"])
def test_quantised_gguf_computes_its_dequantised_weights(models, seed, gguf_type, tmp_path, dequantised_products):
    checkpoint, files = models[seed]
    reference = localv3.load(dequantised_checkpoint(checkpoint, files[gguf_type], tmp_path / "ref"), device="cpu", dtype=torch.float32)
    engine = native(files[gguf_type])
    assert (engine.logits(PROMPT) - reference.logits(PROMPT)).abs().max().item() <= 1e-4
    assert engine.generate(PROMPT, 12) == reference.generate(PROMPT, 12)


@pytest.mark.parametrize("gguf_type,bound", [("f32", 1e-6), ("q8_0", 0.01), ("q4_k_m", 0.12)])
def test_every_tensor_reads_back_as_the_checkpoint_wrote_it(models, gguf_type, bound):
    """Names, shapes and the kv_b split are right: each GGUF tensor, dequantised, is the
    checkpoint's within its type's rounding (a transposed or misplaced one would be off by ~1.4)."""
    checkpoint, files = models[0]
    reader = open_gguf(files[gguf_type]).weights.reader
    source = load_file(str(checkpoint / "model.safetensors"))
    read = [name for name in source if name in reader]
    assert len(read) == len([n for n in source if not n.startswith(f"model.layers.{WIDE_V3['num_hidden_layers']}.")])
    for name in read:
        error = (reader.get(name) - source[name]).norm() / source[name].norm()
        assert error <= bound, name


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """This process's memory mappings of `path`: [start, end) addresses."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@needs_ggml
@pytest.mark.parametrize("gguf_type", GGUF_TYPES)
def test_routed_experts_are_views_of_the_mapped_file(models, gguf_type):
    path = models[1][1][gguf_type]
    engine = native(path)
    ranges = mapped_ranges(path)
    banks = [s.bank for _, moe in moe_layers(engine.model) for s in moe.experts.slices]
    assert banks and ranges
    for bank in banks:
        for matrices in (bank.gate, bank.up, bank.down):
            start, end = matrices.data.data_ptr(), matrices.data.data_ptr() + matrices.data.nbytes
            assert any(low <= start and end <= high for low, high in ranges)
            assert start % 32 == 0


def dequantised(matrices: QuantMatrices) -> torch.Tensor:
    """[count, out, in] fp32 of `matrices`, by ggml's dequantiser."""
    rows = matrices.data.reshape(-1, matrices.data.shape[-1])
    if matrices.block_type.name == "f32":
        return rows.view(torch.float32).view(-1, matrices.out_features, matrices.in_features)
    values = ggml.dequantize_rows(rows, matrices.block_type.ggml_type, matrices.in_features)
    return values.view(-1, matrices.out_features, matrices.in_features)


@needs_ggml
@pytest.mark.parametrize("type_name", ["q4_k", "q6_k", "q8_0", "q5_0", "iq4_xs", "f32"])
@pytest.mark.parametrize("seed", SEEDS)
def test_a_bank_over_mapped_blocks_computes_as_a_copied_one(type_name, seed, tmp_path):
    """mul_mat_id over a read-only mapping (gate and up apart, a subset of its experts through
    slots) gives exactly what the bank built by copying the same blocks gives, and the
    dequantised reference within ggml's 8-bit activations' rounding."""
    block_type = GGUF_BLOCK_TYPES[type_name]
    g = torch.Generator().manual_seed(seed)
    n_experts, dim, hidden, tokens, k = 6, 256, 256, 5, 2
    blocks = {p: ggml.quantize_rows(torch.randn(n_experts * hidden, dim, generator=g), block_type.ggml_type) for p in ("gate", "up")}
    blocks["down"] = ggml.quantize_rows(torch.randn(n_experts * dim, hidden, generator=g) / 4, block_type.ggml_type)
    shapes = {"gate": (hidden, dim), "up": (hidden, dim), "down": (dim, hidden)}  # [out, in] of each expert
    views = {}
    for projection, data in blocks.items():
        (tmp_path / projection).write_bytes(data.numpy().tobytes())
        mapped = np.memmap(tmp_path / projection, np.uint8, "r", shape=(n_experts, shapes[projection][0], data.shape[1]))
        views[projection] = QuantMatrices(block_type, n_experts, *shapes[projection], data=torch.from_numpy(mapped))
    slots = [4, 1, 5]
    bank = QuantExpertBank.over(views["gate"], views["up"], views["down"], slots)
    copied = QuantExpertBank(len(slots), dim, hidden, block_type, block_type)
    for j, slot in enumerate(slots):
        gate, up, down = (QuantizedWeight(views[p].data[slot], block_type, views[p].in_features) for p in ("gate", "up", "down"))
        copied.store(j, gate, up, down)
    x = torch.randn(tokens, dim, generator=g)
    indices = torch.randint(0, len(slots), (tokens, k), generator=g)
    weights = torch.rand(tokens, k, generator=g)
    got = bank(x, indices, weights)
    torch.testing.assert_close(got, copied(x, indices, weights), rtol=1e-6, atol=1e-6)
    dense = {p: dequantised(m) for p, m in views.items()}  # [E, out, in] each

    def expert(j: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up, down = (dense[p][slots[j]] for p in ("gate", "up", "down"))
        return F.linear(F.silu(F.linear(rows, gate)) * F.linear(rows, up), down)

    expected = run_experts(x, indices, weights, expert)
    assert ((got - expected).norm() / expected.norm()).item() < 0.05


@needs_ggml
@pytest.mark.parametrize("type_name", [t for t in GGUF_BLOCK_TYPES if GGUF_BLOCK_TYPES[t].block > 1])
def test_ggml_dequantises_as_the_gguf_package(type_name):
    block_type = GGUF_BLOCK_TYPES[type_name]
    blocks = ggml.quantize_rows(torch.randn(4, 512, generator=torch.Generator().manual_seed(0)), block_type.ggml_type)
    expected = dequantize(blocks.numpy(), gguf.GGMLQuantizationType(block_type.ggml_type))
    torch.testing.assert_close(ggml.dequantize_rows(blocks, block_type.ggml_type, 512), torch.from_numpy(expected), rtol=0, atol=0)


def test_the_vocabulary_is_the_gguf_s_own_or_the_tokenizer_beside_it(models, tmp_path):
    checkpoint, files = models[0]
    ours = Tokenizer(checkpoint)
    engine = native(files["q8_0"])
    assert isinstance(engine.tokenizer, LlamaCppTokenizer)
    for text in ("Hello! How are the experts?", "  two  spaces\nand a newline"):
        assert engine.tokenizer.encode(text) == ours.encode(text)
    beside = tmp_path / "wide.gguf"
    shutil.copy(files["q8_0"], beside)
    shutil.copy(checkpoint / "tokenizer.json", tmp_path)
    shutil.copy(checkpoint / "tokenizer_config.json", tmp_path)
    assert type(native(beside).tokenizer) is Tokenizer


def test_cli_runs_a_gguf_in_the_native_engine(models, monkeypatch, capsys):
    path = models[2][1]["q4_k_m"]
    code, out, err = run_main(monkeypatch, capsys, ["run", str(path), "Hello there", "--engine", "native", "--max-tokens", "6", "--json"])
    assert code == 0, err
    done = json.loads(out.strip().splitlines()[-1])
    assert done["done"] and done["completion_tokens"] >= 1 and done["prompt_tokens"] > 2


def renamed(source: Path, out: Path, tensor: str, new_name: str) -> Path:
    """A copy of `source` whose tensor `tensor` is called `new_name` (same length) instead."""
    assert len(new_name) == len(tensor)
    data = source.read_bytes()
    assert data.count(tensor.encode()) == 1
    out.write_bytes(data.replace(tensor.encode(), new_name.encode()))
    return out


def retyped(source: Path, out: Path, tensor: str, ggml_type: int) -> Path:
    """A copy of `source` whose tensor `tensor` (1-D) is declared of `ggml_type` instead."""
    data = bytearray(source.read_bytes())
    at = data.index(tensor.encode()) + len(tensor) + 4 + 8  # name, n_dims (u32), one dim (u64)
    data[at : at + 4] = ggml_type.to_bytes(4, "little")
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize(
    "broken,message",
    [
        (lambda src, out: out.write_bytes(src.read_bytes()[: src.stat().st_size // 2]), "not a readable GGUF file"),
        (lambda src, out: renamed(src, out, "blk.1.ffn_up_exps.weight", "blk.1.ffn_up_exps.wEIGHT"), "no tensor blk.1.ffn_up_exps.weight"),
        (lambda src, out: retyped(src, out, "blk.0.attn_norm.weight", 26), "is I32, which the native engine does not read"),
    ],
    ids=["truncated", "missing tensor", "unsupported type"],
)
def test_a_gguf_the_native_engine_cannot_run_is_one_line(models, tmp_path, monkeypatch, capsys, broken, message):
    path = tmp_path / "broken.gguf"
    broken(models[0][1]["q8_0"], path)
    code, out, err = run_main(monkeypatch, capsys, ["run", str(path), "Hi", "--engine", "native"])
    assert code == 1 and out == ""
    line = one_error_line(err)
    assert str(path) in line and message in line, line
