import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    """A tiny random V3 checkpoint with a BPE tokenizer and a DeepSeek chat template (tests/fixtures_cli.py)."""
    from fixtures_cli import write_chat_model

    return write_chat_model(tmp_path_factory.mktemp("chat-model"))


@pytest.fixture(scope="session")
def chat_model_with_gguf(chat_model_dir, tmp_path_factory):
    """The chat fixture model with an f32 GGUF export beside its safetensors (for --engine llama.cpp)."""
    pytest.importorskip("llama_cpp")
    import shutil

    from localv3.gguf_export import export_gguf

    model_dir = shutil.copytree(chat_model_dir, tmp_path_factory.mktemp("gguf") / "chat-model")
    export_gguf(model_dir, model_dir / "chat-model-f32.gguf", "f32", "chat-model")
    return model_dir
