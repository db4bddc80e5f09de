"""models.toml: the packaged entries, the user file, errors that name the line, and
resolution of names to directories and configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localv3 import registry
from localv3.config import ModelConfig
from localv3.errors import ModelNotFoundError
from localv3.registry import RegistryError, config_for, find_model, resolve_model_path

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIRED_NAMES = (
    "deepseek-v3",
    "deepseek-v3-0324",
    "deepseek-r1",
    "deepseek-r1-0528",
    "kimi-k2-instruct",
    "moonlight-16b-a3b-instruct",
    "deepseek-v2-lite-chat",
    "tiny",
)
TINY_CONFIG = {
    "model_type": "deepseek_v3", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 8,
}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty LOCALV3_HOME and hub cache, so nothing on this machine leaks in."""
    monkeypatch.setenv("LOCALV3_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def write_user_file(home: Path, text: str) -> Path:
    path = home / "models.toml"
    path.write_text(text)
    return path


# ----- the packaged registry ----------------------------------------------------------------


def test_packaged_registry_has_the_issue_models(home):
    entries = registry.load_registry().entries
    assert set(REQUIRED_NAMES) <= set(entries)
    assert any(entry.format == "gguf" for entry in entries.values())
    for entry in entries.values():
        if entry.format == "bundled":
            continue
        assert entry.repo and entry.revision and entry.config and entry.params_total_b and entry.params_active_b
        assert entry.precision in ("fp8", "bf16") or entry.format == "gguf"
    tiny = entries["tiny"]
    assert (tiny.format, tiny.path) == ("bundled", "assets/tiny")
    assert tiny.bundled_path == registry.PACKAGE_DIR / "assets" / "tiny"
    assert entries["deepseek-v3"].quant == registry.RecommendedQuant(experts="q4", dense="q8")
    assert entries["deepseek-r1-0528"].config == "deepseek-v3.json"


def test_every_named_config_ships_and_matches_the_family(home):
    for entry in registry.load_registry().entries.values():
        if entry.config:
            shipped = ModelConfig.from_file(entry.shipped_config_path)
            assert shipped.model_type == entry.family, entry.name
    assert config_for("deepseek-r1-0528").n_routed_experts == 256  # not downloaded: the shipped config
    assert config_for("kimi-k2").n_routed_experts == 384


def test_root_models_toml_is_the_packaged_registry():
    assert (REPO_ROOT / "models.toml").resolve() == registry.PACKAGED_REGISTRY


def test_names_aliases_and_tags(home):
    assert find_model("deepseek-r1").name == "deepseek-r1"
    assert find_model("deepseek-r1:671b").name == "deepseek-r1"
    assert find_model("deepseek-r1:latest").name == "deepseek-r1"
    assert find_model("DeepSeek-V3").name == "deepseek-v3"
    assert find_model("deepseek-v2:16b").name == "deepseek-v2-lite-chat"
    assert find_model("deepseek-r1:ud-iq1_s").format == "gguf"
    assert find_model("deepseek-r1:8b") is None
    assert find_model("no-such-model") is None


# ----- the user file ------------------------------------------------------------------------


def test_user_file_adds_and_overrides_entries(home):
    write_user_file(
        home,
        '[models.deepseek-v3]\nrevision = "0123456789abcdef0123456789abcdef01234567"\n\n'
        '[models.my-moe]\ndescription = "mine"\nformat = "hf"\nfamily = "deepseek_v2"\n'
        'precision = "bf16"\nrepo = "me/my-moe"\naliases = ["mine:2b"]\n',
    )
    v3 = find_model("deepseek-v3")
    assert v3.revision == "0123456789abcdef0123456789abcdef01234567"
    assert v3.repo == "deepseek-ai/DeepSeek-V3"  # the other fields stay
    assert v3.source == str(home / "models.toml")
    assert find_model("mine:2b").repo == "me/my-moe"


@pytest.mark.parametrize(
    "text, line, problem",
    [
        ('[models.a]\ndescription = "x"\nformat = "hf"\nrepo = = "o/n"\n', 4, "invalid TOML"),
        ('[models.a]\nallow = ["*.json",\n', 2, "invalid TOML"),
        ('\n[models.MyModel]\ndescription = "x"\nformat = "hf"\nfamily = "deepseek_v3"\nprecision = "fp8"\n'
         'repo = "o/n"\ncolour = "red"\n', 8, "model 'mymodel': unknown key 'colour'"),
        ('[models.a]\ndescription = "x"\nformat = "hf"\nfamily = "deepseek_v3"\nprecision = "fp8"\n'
         'repo = "o/n"\nrevison = "main"\n', 7, "unknown key 'revison'"),
        ('\n\n[models.a]\ndescription = "x"\nformat = "hf"\nfamily = "deepseek_v3"\n', 3, "missing required key 'precision'"),
        ('[models.a]\ndescription = "x"\nformat = "onnx"\nfamily = "deepseek_v3"\nprecision = "fp8"\n', 3, "format must be one of"),
        ('[models.a]\ndescription = "x"\nformat = "hf"\nfamily = "llama"\nprecision = "fp8"\nrepo = "o/n"\n', 4, "family must be one of"),
        ('[models.a]\ndescription = "x"\nformat = "hf"\nfamily = "deepseek_v3"\nprecision = "fp8"\n'
         'repo = "o/n"\nparams_total_b = "big"\n', 7, "params_total_b must be a positive number"),
        ('[models.a]\ndescription = "x"\nformat = "hf"\nfamily = "deepseek_v3"\nprecision = "fp8"\n'
         'repo = "o/n"\nquant = { experts = "q3", dense = "q8" }\n', 7, "quant.experts must be one of"),
        ('[models.a]\ndescription = "x"\nformat = "hf"\nfamily = "deepseek_v3"\nprecision = "fp8"\n'
         'repo = "o/n"\naliases = ["deepseek-r1:671b"]\n', 7, "'deepseek-r1:671b' already names model 'deepseek-r1'"),
        ('[models.a]\ndescription = "x"\nformat = "hf"\nfamily = "deepseek_v3"\nprecision = "fp8"\n', 1, "needs repo"),
        ('[model.a]\ndescription = "x"\n', 1, "unexpected top-level key 'model'"),
        ('[models.tiny]\nformat = "hf"\n', 1, "a hf model needs repo"),
    ],
)
def test_malformed_user_file_names_the_file_and_line(home, text, line, problem):
    path = write_user_file(home, text)
    with pytest.raises(RegistryError) as caught:
        registry.load_registry()
    message = str(caught.value)
    assert message.startswith(f"{path}, line {line}: "), message
    assert problem in message
    assert "\n" not in message


# ----- resolution ---------------------------------------------------------------------------


def test_a_directory_resolves_to_itself(home, tmp_path):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(TINY_CONFIG))
    assert resolve_model_path(str(model_dir)) == model_dir
    assert config_for(str(model_dir)).hidden_size == 64


def test_a_quantized_output_is_found_by_name(home):
    output = home / "models" / "deepseek-v2-lite-chat"
    output.mkdir(parents=True)
    (output / "config.json").write_text(json.dumps({**TINY_CONFIG, "hidden_size": 32}))
    assert resolve_model_path("deepseek-v2-lite:latest") == output
    assert config_for("deepseek-v2-lite-chat").hidden_size == 32


def test_missing_models_say_what_to_run(home):
    with pytest.raises(ModelNotFoundError, match=r"^deepseek-v3 is not downloaded; run: localv3 pull deepseek-v3$"):
        resolve_model_path("deepseek-v3")
    with pytest.raises(ModelNotFoundError, match="offline mode is on: run `localv3 pull deepseek-v3` while online"):
        resolve_model_path("deepseek-v3", offline=True)
    hint = r"^someone/some-model is not downloaded; run: localv3 pull someone/some-model$"
    with pytest.raises(ModelNotFoundError, match=hint):
        resolve_model_path("someone/some-model")
    with pytest.raises(ModelNotFoundError, match="unknown model 'nonsense'"):
        resolve_model_path("nonsense")
    with pytest.raises(ModelNotFoundError, match="unknown model 'nonsense'"):
        config_for("nonsense")


def test_bundled_tiny_resolves_inside_the_package(home):
    tiny = find_model("tiny").bundled_path
    if tiny.is_dir():
        assert resolve_model_path("tiny") == tiny
    else:
        with pytest.raises(ModelNotFoundError, match="bundled model 'tiny' is missing"):
            resolve_model_path("tiny")


def test_config_for_a_model_not_downloaded_uses_the_shipped_config(home, tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "deepseek-v3.json").write_text(json.dumps({**TINY_CONFIG, "hidden_size": 7168}))
    monkeypatch.setattr(registry, "SHIPPED_CONFIGS_DIR", configs)
    assert config_for("deepseek-r1:671b").hidden_size == 7168
    with pytest.raises(Exception, match="shipped config kimi-k2-instruct.json .* is missing"):
        config_for("kimi-k2-instruct")
