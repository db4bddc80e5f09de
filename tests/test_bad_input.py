"""Broken checkpoints and configs: one clear line naming the file and tensor, non-zero exit."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import localv3
from cli import app
from localv3.errors import CheckpointError, ConfigError, ModelNotFoundError
from localv3.synthetic import write_checkpoint
from localv3.tokenizer import TokenizerError
from model_configs import V3_MTP

runner = CliRunner()


@pytest.fixture
def sharded(tmp_path):
    return write_checkpoint(tmp_path / "m", V3_MTP, dtype=torch.float32, shards=3)


def assert_cli_error(model_dir, *fragments):
    result = runner.invoke(app, ["show", str(model_dir)])
    assert result.exit_code != 0
    message = result.exception.args[0] if result.exception else result.output
    for fragment in fragments:
        assert fragment in str(message)


def test_missing_shard_names_the_file(sharded):
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003.safetensors: missing shard \(holds tensor "):
        localv3.load(sharded)
    assert_cli_error(sharded, "missing shard")


def test_truncated_shard_names_file_and_tensor(sharded):
    shard = sharded / "model-00003-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model-00003-of-00003.safetensors: truncated safetensors file: tensor "):
        localv3.load(sharded)


def test_truncated_header(tmp_path):
    model = write_checkpoint(tmp_path, V3_MTP, dtype=torch.float32)
    (model / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match="no header"):
        localv3.load(model)


def test_wrong_shape_names_tensor_and_shapes(tmp_path):
    model = write_checkpoint(tmp_path, V3_MTP, dtype=torch.float32)
    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.layers.1.self_attn.kv_b_proj.weight"] = torch.zeros(7, 7)
    save_file(tensors, str(model / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor model.layers.1.self_attn.kv_b_proj.weight has shape \[7, 7\], config.json expects \[128, 32\]"):
        localv3.load(model)
    assert_cli_error(model, "kv_b_proj.weight", "config.json expects [128, 32]")


def test_missing_expert_tensor(tmp_path):
    model = write_checkpoint(tmp_path, V3_MTP, dtype=torch.float32)
    tensors = load_file(str(model / "model.safetensors"))
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, str(model / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"config.json expects tensor model.layers.2.mlp.experts.5.up_proj.weight, which no weight file holds \(model.safetensors\)"):
        localv3.load(model)


def test_config_missing_required_fields(tmp_path):
    model = write_checkpoint(tmp_path, V3_MTP, dtype=torch.float32)
    config = json.loads((model / "config.json").read_text())
    del config["kv_lora_rank"], config["hidden_size"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config.json: missing required field\(s\): hidden_size, kv_lora_rank"):
        localv3.load(model)
    assert_cli_error(model, "missing required field")


def test_unknown_architecture(tmp_path):
    model = write_checkpoint(tmp_path, V3_MTP, dtype=torch.float32)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="unknown architecture model_type='llama'"):
        localv3.load(model)


def test_cli_prints_one_line_and_no_traceback(sharded):
    (sharded / "model-00001-of-00003.safetensors").unlink()
    result = subprocess.run(
        [sys.executable, "-c", "import cli; cli.main()", "show", str(sharded)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "missing shard" in result.stderr


def _rewrite_header(path, edit) -> None:
    """Apply `edit` to a safetensors file's JSON header, keeping its data bytes."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(edit(header)).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size :])


def _first_tensor(header: dict) -> str:
    return next(name for name in header if name != "__metadata__")


@pytest.mark.parametrize(
    "corruption,message",
    [
        (lambda h: [h], "header is not a JSON object"),
        (lambda h: {**h, _first_tensor(h): {"dtype": "F32", "shape": [1]}}, "lacks dtype, shape or data_offsets"),
        (lambda h: {**h, _first_tensor(h): {**h[_first_tensor(h)], "data_offsets": list(reversed(h[_first_tensor(h)]["data_offsets"]))}}, "has data_offsets"),
        (lambda h: {**h, _first_tensor(h): {**h[_first_tensor(h)], "data_offsets": [0, 4]}}, "has data_offsets [0, 4]"),
        (lambda h: {**h, _first_tensor(h): {**h[_first_tensor(h)], "shape": "big"}}, "has shape 'big'"),
    ],
)
def test_a_corrupt_safetensors_header_is_one_line_naming_the_file(tmp_path, corruption, message):
    model = write_checkpoint(tmp_path, V3_MTP, dtype=torch.float32)
    _rewrite_header(model / "model.safetensors", corruption)
    with pytest.raises(CheckpointError, match="model.safetensors: ") as error:
        localv3.load(model)
    assert message in str(error.value)
    assert_cli_error(model, "model.safetensors", message)


def test_overlapping_tensors_are_refused(tmp_path):
    model = write_checkpoint(tmp_path, V3_MTP, dtype=torch.float32)

    def overlap(header):
        first, second = sorted(n for n in header if n != "__metadata__")[:2]
        header[second] = dict(header[first])  # the same bytes claimed twice
        return header

    _rewrite_header(model / "model.safetensors", overlap)
    with pytest.raises(CheckpointError, match="overlap"):
        localv3.load(model)


def test_an_index_may_not_point_outside_the_model_directory(sharded, tmp_path):
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "../../elsewhere/model.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"shard '../../elsewhere/model.safetensors' lies outside the model directory"):
        localv3.load(sharded)


def test_a_weight_relabelled_as_integers_is_refused(tmp_path):
    """Same byte size, wrong dtype: refused before loading rather than garbage generated."""
    model = write_checkpoint(tmp_path, V3_MTP, dtype=torch.float32)
    _rewrite_header(model / "model.safetensors", lambda h: {**h, "model.embed_tokens.weight": {**h["model.embed_tokens.weight"], "dtype": "I32"}})
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model.embed_tokens.weight is int32, expected a float dtype"):
        localv3.load(model)


def test_nan_weights_stop_at_the_first_step(tmp_path):
    model = write_checkpoint(tmp_path, V3_MTP, dtype=torch.float32)
    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
    save_file(tensors, str(model / "model.safetensors"))
    engine = localv3.load(model, device="cpu")
    with pytest.raises(localv3.LocalV3Error, match="the model produced NaN or infinite logits"):
        engine.generate([1, 2, 3], max_new_tokens=4)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("num_hidden_layers", 1e9, "num_hidden_layers must be a whole number from 1 to 1,024, not 1000000000.0"),
        ("hidden_size", -4, "hidden_size must be a whole number from 1 to"),
        ("vocab_size", 0, "vocab_size must be a whole number from 1 to"),
        ("kv_lora_rank", "512", 'kv_lora_rank must be a whole number from 1 to 16,777,216, not "512"'),
        ("num_experts_per_tok", 99, "num_experts_per_tok (99) exceeds n_routed_experts"),
        ("n_group", 0, "n_group must be a whole number from 1 to"),
        ("topk_group", 9, "topk_group (9) exceeds n_group"),
        ("rope_scaling", "yarn", 'rope_scaling must be an object or null, not "yarn"'),
        ("max_position_embeddings", 0, "max_position_embeddings must be a whole number from 1 to"),
        ("rms_norm_eps", -1, "rms_norm_eps must be a number above 0 and below 1, not -1"),
    ],
)
def test_config_values_are_checked_before_anything_is_allocated(tmp_path, field, value, message):
    model = write_checkpoint(tmp_path, V3_MTP, dtype=torch.float32)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ConfigError, match="config.json: ") as error:
        localv3.load(model)
    assert message in str(error.value)
    assert_cli_error(model, "config.json", message)


# ----- tokenizer_config.json, chat templates, names ------------------------------------------

TINY_DIR = Path(localv3.__file__).parent / "assets" / "tiny"
QUESTION = [{"role": "user", "content": "What is 37 + 48?"}]


def _tiny_with_tokenizer_config(tmp_path, edit) -> Path:
    model = Path(shutil.copytree(TINY_DIR, tmp_path / "tiny"))
    path = model / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(edit(config) if callable(edit) else edit, encoding="utf-8")
    return model


@pytest.mark.parametrize(
    "edit,message",
    [
        ("{bad", "not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
        ("[1, 2]", "expected a JSON object, found list"),
        (lambda c: json.dumps({**c, "chat_template": 7}), "chat_template must be a string or a list of"),
        (
            lambda c: json.dumps({**c, "chat_template": [{"name": "tool_use", "template": "x"}]}),
            "chat_template lists ['tool_use'] but no template named 'default'",
        ),
        (lambda c: json.dumps({**c, "eos_token": ["<eos>"]}), "eos_token must be a token string"),
        (lambda c: json.dumps({**c, "add_bos_token": "yes"}), "add_bos_token must be true or false, not 'yes'"),
    ],
)
def test_a_broken_tokenizer_config_names_the_file_and_field(tmp_path, edit, message):
    model = _tiny_with_tokenizer_config(tmp_path, edit)
    with pytest.raises(TokenizerError) as error:
        localv3.load(model)
    assert str(error.value).startswith(f"{model / 'tokenizer_config.json'}: {message}")
    assert_cli_error(model, "tokenizer_config.json")


@pytest.mark.parametrize("template", ["{% if %}", "{{ messages[0] ", "{% for m in messages %}"])
def test_a_chat_template_that_does_not_compile_is_one_line_naming_the_file(tmp_path, template):
    model = _tiny_with_tokenizer_config(tmp_path, lambda c: json.dumps({**c, "chat_template": template}))
    engine = localv3.load(model)
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: the chat template does not compile \(line 1: "):
        engine.tokenizer.encode_chat(QUESTION)
    assert engine.tokenizer.encode("What", add_bos=False)  # plain text (run --raw) still works
    assert_cli_error(model, "tokenizer_config.json: the chat template does not compile")


def test_a_list_form_chat_template_uses_its_default_template(tmp_path):
    reference = localv3.load("tiny")
    default = reference.tokenizer.chat_template
    model = _tiny_with_tokenizer_config(
        tmp_path,
        lambda c: json.dumps({**c, "chat_template": [{"name": "tool_use", "template": "T{{ 1 }}"}, {"name": "default", "template": default}]}),
    )
    engine = localv3.load(model)
    assert engine.tokenizer.chat_templates == {"tool_use": "T{{ 1 }}", "default": default}
    ids = engine.tokenizer.encode_chat(QUESTION)
    assert ids == reference.tokenizer.encode_chat(QUESTION)
    assert engine.tokenizer.decode(engine.generate(ids, max_new_tokens=8)).strip() == "85"


@pytest.mark.parametrize(
    "name,message",
    [
        ("a" * 5000, "unknown model 'aaaa"),
        ("/" + "b" * 300, "unknown model '/bbbb"),
        ("nul\x00byte", "unknown model 'nul\\x00byte'"),
        ("owner/" + "c" * 256, " is not downloaded; run: localv3 pull owner/ccc"),
    ],
)
def test_a_model_name_the_file_system_cannot_hold_is_unknown_not_an_os_error(name, message):
    with pytest.raises(ModelNotFoundError) as error:
        localv3.load(name)
    assert message in str(error.value)
    assert "Errno" not in str(error.value)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--gpu-mem", "1e300GiB", "--gpu-mem: '1e300GiB' is too large for a size"),
        ("--ram", "1e400G", "--ram: '1e400G' is too large for a size"),
        ("--gpu-mem", "nan", "--gpu-mem: 'nan' is not a size"),
        ("--cpu-bw", "inf", "--cpu-bw: 'inf' is not a bandwidth"),
        ("--gpu-mem", "-24GiB", "--gpu-mem: '-24GiB' is not a size"),
        ("--gpu-mem", "24", "--gpu-mem: '24' has no unit"),
        ("--pcie", "0", "--pcie must be above zero"),
    ],
)
def test_absurd_stated_hardware_is_one_line_not_an_overflow(option, value, message):
    result = runner.invoke(app, ["plan", "deepseek-v3", option, value])
    assert result.exit_code != 0 and isinstance(result.exception, localv3.LocalV3Error), result.exception
    assert str(result.exception).startswith(message) and "\n" not in str(result.exception)


@pytest.mark.parametrize("corrupt", [0, -1, "fast", None, float("nan"), [1]])
def test_a_corrupt_hardware_cache_is_measured_again_not_a_crash(tmp_path, monkeypatch, corrupt):
    from localv3.offload import hardware
    from localv3.offload.kernel_probe import CpuKernels

    monkeypatch.setenv("LOCALV3_HOME", str(tmp_path))
    monkeypatch.setattr(hardware, "measure_cpu", lambda: (20e9, 100e9))
    monkeypatch.setattr(hardware, "measure_cpu_kernels", lambda cpu_bw: CpuKernels())
    assert runner.invoke(app, ["plan", "tiny", "--json"]).exit_code == 0
    cache = tmp_path / "hardware.json"
    cache.write_text(json.dumps({**json.loads(cache.read_text()), "cpu_bw": corrupt, "cpu_flops": corrupt}))
    result = runner.invoke(app, ["plan", "tiny", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["hardware"]["cpu_bw"] == 20e9
