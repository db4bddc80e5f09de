"""`localv3.load`: a model name, hub repo id, directory or GGUF file -> a ready engine."""

from __future__ import annotations

from pathlib import Path

import torch

from localv3.config import ModelConfig
from localv3.engines.base import Engine
from localv3.engines.native import NativeEngine
from localv3.loader import load_transformer
from localv3.tokenizer import Tokenizer

DEFAULT_MAX_CONTEXT = 4096


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU; fp32 on the CPU, where torch's bf16 matrix kernels are slow beyond batch 1."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_model_dir(model: str | Path) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from localv3.registry import resolve_model_path

    return resolve_model_path(str(model))


def load(
    model: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    max_context: int | None = None,
    with_mtp: bool = True,
) -> Engine:
    """A .gguf file gets the llama.cpp engine (device, dtype and MTP are llama.cpp's business
    there); anything else the native engine."""
    gguf_path = Path(model).expanduser()
    if gguf_path.suffix.lower() == ".gguf" and gguf_path.is_file():
        from localv3.engines.llama_cpp import load_gguf

        return load_gguf(gguf_path, max_context=max_context)
    model_dir = resolve_model_dir(model)
    config = ModelConfig.from_file(model_dir)
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    transformer = load_transformer(model_dir, config, dtype, place=lambda name: device, with_mtp=with_mtp)
    tokenizer = Tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    context = min(max_context or DEFAULT_MAX_CONTEXT, config.max_position_embeddings)
    return NativeEngine(model_dir, config, transformer, tokenizer, context)
