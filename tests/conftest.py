import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as cli.py does: no spinning on shared cores

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def localv3_home(tmp_path_factory):
    """One LOCALV3_HOME for the whole run (hardware-probe cache, routing profiles), never the
    user's own ~/.localv3; tests that need an empty home set their own."""
    home = tmp_path_factory.mktemp("localv3-home")
    previous = os.environ.get("LOCALV3_HOME")
    os.environ["LOCALV3_HOME"] = str(home)
    yield home
    if previous is None:
        del os.environ["LOCALV3_HOME"]
    else:
        os.environ["LOCALV3_HOME"] = previous


@pytest.fixture
def dequantised_products(monkeypatch):
    """The test's quantised modules dequantise their blocks on every call (kernel_paths.py)."""
    from kernel_paths import dequantise_products

    dequantise_products(monkeypatch)


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
