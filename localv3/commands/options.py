"""Options that chat, run and bench share, declared once."""

from __future__ import annotations

from typing import Annotated

import typer

DEFAULT_MODEL = "tiny"
# DeepSeek-V3/R1's generation_config.json values
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.95

ModelArgument = Annotated[str, typer.Argument(help="A models.toml name, a hub repo id, or a model directory.")]
Temperature = Annotated[
    float, typer.Option("--temperature", "--temp", min=0.0, help="Sampling temperature; 0 = greedy.")
]
TopK = Annotated[int, typer.Option("--top-k", min=0, help="Sample from the k most likely tokens; 0 = off.")]
TopP = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass; 1 = off.")]
Seed = Annotated[int | None, typer.Option("--seed", help="Random seed for reproducible sampling.")]
MaxTokens = Annotated[
    int | None,
    typer.Option(
        "--max-tokens", "-n", min=1, help="Stop after this many new tokens (default: until the context is full)."
    ),
]
Context = Annotated[
    int | None, typer.Option("--ctx", min=2, help="Context length in tokens (default 4096, at most the model's).")
]
Mtp = Annotated[
    bool | None,
    typer.Option("--mtp/--no-mtp", help="Force MTP speculative decoding on or off (default: the engine decides)."),
]
EngineName = Annotated[str, typer.Option("--engine", help="native (safetensors) or llama.cpp (GGUF).")]
