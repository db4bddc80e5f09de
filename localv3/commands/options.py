"""Options that chat, run and bench share, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DEFAULT_MODEL = "tiny"
FROM_MODEL = "default: the model's generation_config.json"

ModelArgument = Annotated[str, typer.Argument(help="A models.toml name, a hub repo id, or a model directory.")]
Temperature = Annotated[
    float | None,
    typer.Option("--temperature", "--temp", min=0.0, help=f"Sampling temperature; 0 = greedy ({FROM_MODEL}, else 0.6)."),
]
TopK = Annotated[
    int | None, typer.Option("--top-k", min=0, help=f"Sample from the k most likely tokens; 0 = off ({FROM_MODEL}).")
]
TopP = Annotated[
    float | None,
    typer.Option("--top-p", min=0.0, max=1.0, help=f"Nucleus sampling mass; 1 = off ({FROM_MODEL}, else 0.95)."),
]
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


def resolve_sampling(
    model_path: Path, temperature: float | None, top_p: float | None, top_k: int | None
) -> tuple[float, float, int]:
    """The options given, the model's own defaults for those not given."""
    from localv3.sampling import model_sampling_defaults

    defaults = model_sampling_defaults(model_path)
    return (
        defaults.temperature if temperature is None else temperature,
        defaults.top_p if top_p is None else top_p,
        defaults.top_k if top_k is None else top_k,
    )
