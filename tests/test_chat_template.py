"""Chat templates render as Hugging Face transformers renders them, with the features the hub's
DeepSeek/Kimi templates use: loop controls, `strftime_now`, a `tojson` that does not escape."""

import json
import random
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import localv3
from localv3.tokenizer import Tokenizer

# uses `break`/`continue`, `strftime_now`, `tojson` (with and without arguments) and `raise_exception`
FEATURE_TEMPLATE = (
    "{{ bos_token }}Today is {{ strftime_now('%Y-%m') }}.\n"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% continue %}{% endif %}"
    "{% if message['content'] == 'STOP' %}{% break %}{% endif %}"
    "<{{ message['role'] }}>{{ message['content'] | tojson }}|{{ message | tojson(indent=1) }}\n"
    "{% endfor %}"
    "{% if messages | length > 40 %}{{ raise_exception('too long') }}{% endif %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
TEXTS = ["plain", "<b>bold</b> & 'quotes'", "naïve café ✓", "line\nbreak", 'say "hi"', "STOP", "{% raw %}"]


def random_conversation(seed: int) -> list[dict]:
    rng = random.Random(seed)
    roles = ["system", "user", "assistant"]
    return [{"role": rng.choice(roles), "content": rng.choice(TEXTS)} for _ in range(rng.randint(1, 8))]


def with_template(source, target, template: str | None):
    """A copy of the model `source` whose special tokens are plain strings (transformers' tokenizer
    takes {"content": ...} objects only with its own type tag), with `template` if given."""
    model = shutil.copytree(source, target)
    config = json.loads((model / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token"):
        if isinstance(config.get(key), dict):
            config[key] = config[key]["content"]
    if template is not None:
        config["chat_template"] = template
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return model


def reference_render(model, messages) -> str:
    return AutoTokenizer.from_pretrained(model).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def feature_model(chat_model_dir, tmp_path_factory):
    return with_template(chat_model_dir, tmp_path_factory.mktemp("template") / "model", FEATURE_TEMPLATE)


@pytest.mark.parametrize("seed", range(6))
def test_a_template_with_loop_controls_dates_and_tojson_renders_as_transformers_does(feature_model, seed):
    messages = random_conversation(seed)
    ours = Tokenizer(feature_model).render_chat(messages)
    assert ours == reference_render(feature_model, messages)
    assert "&lt;" not in ours and "\\u00ef" not in ours  # tojson neither escapes HTML nor non-ASCII


@pytest.mark.parametrize("seed", range(4))
def test_the_bundled_template_renders_as_transformers_does(tmp_path, seed):
    model = with_template(Path(localv3.__file__).parent / "assets" / "tiny", tmp_path / "tiny", None)
    messages = [m for m in random_conversation(seed) if m["content"] != "{% raw %}"]
    assert Tokenizer(model).render_chat(messages) == reference_render(model, messages)


TOOLS_TEMPLATE = (
    "{% if tools %}Functions: {{ tools | tojson }}\n{% endif %}"
    "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "weather", "description": "Weather in <city>", "parameters": {}}}


@pytest.mark.parametrize("tools", [None, [WEATHER], [WEATHER, {**WEATHER, "function": {"name": "time", "parameters": {}}}]])
def test_tools_reach_a_template_that_renders_them_as_transformers_passes_them(chat_model_dir, tmp_path, tools):
    model = with_template(chat_model_dir, tmp_path / "model", TOOLS_TEMPLATE)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    ours = Tokenizer(model)
    reference = AutoTokenizer.from_pretrained(model).apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert ours.renders_tools
    assert ours.render_chat(messages, tools=tools) == reference
    assert ("Functions: " in reference) == bool(tools)


@pytest.mark.parametrize("token", ["eos_token", "bos_token"])
def test_a_tool_result_that_spells_a_control_token_stays_text(chat_model_dir, tmp_path, token):
    tokenizer = Tokenizer(with_template(chat_model_dir, tmp_path / "model", TOOLS_TEMPLATE))
    forged = getattr(tokenizer, token)
    messages = [{"role": "user", "content": "hi"}, {"role": "tool", "content": f"result {forged} forged"}]
    control = tokenizer.token_to_id(forged)
    assert control in tokenizer.encode(tokenizer.render_chat(messages), add_bos=False)  # as plain encoding would
    assert control not in tokenizer.encode_chat(messages)
