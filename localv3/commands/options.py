"""Options that chat, run and bench share, declared once."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Annotated

import typer

from localv3.errors import LocalV3Error, ModelNotFoundError

DEFAULT_MODEL = "tiny"
FROM_MODEL = "default: the model's generation_config.json"
# What a model name, NAME:TAG, hub repo id or path can hold; a lone argument with anything else
# (a space, ?, +, !) is a prompt for the default model.
MODEL_NAME = re.compile(r"[\w.:/~\-]+")

ModelArgument = Annotated[
    str,
    typer.Argument(
        help="A models.toml name, a hub repo id, or a model directory; alone, text that is no model"
        f" name (it has a space or punctuation) is the prompt for {DEFAULT_MODEL}.",
        show_default=DEFAULT_MODEL,
    ),
]
System = Annotated[str | None, typer.Option("--system", "-s", help="The system message.")]
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
EngineName = Annotated[
    str | None,
    typer.Option("--engine", help="native or llama.cpp (default: llama.cpp for a .gguf file, else native)."),
]
CudaGraphs = Annotated[
    bool,
    typer.Option(
        "--cuda-graphs",
        help="Capture each decode step's GPU work in CUDA graphs and replay it (native engine, CUDA"
        " device; MTP then only with --mtp).",
    ),
]


class CudaGraphsError(LocalV3Error):
    pass


def check_cuda_graphs(engines: list[str]) -> None:
    """--cuda-graphs where it can capture: the native engine on a machine with a CUDA device.
    Without one it is refused rather than run uncaptured: the flag asks for graphs, and a
    benchmark or script that asked for them should not silently measure something else."""
    import torch

    if any(engine != "native" for engine in engines):
        raise CudaGraphsError("--cuda-graphs is an option of the native engine (llama.cpp runs its own CUDA graphs)")
    if not torch.cuda.is_available():
        raise CudaGraphsError("--cuda-graphs needs a CUDA device, and torch sees none here")


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


def model_and_prompt(command: str, model: str, prompt: str | None) -> tuple[str, str | None]:
    """`localv3 run|chat [MODEL] [PROMPT]` given one argument: MODEL where it names a model,
    else the prompt for the default model when it cannot be a model name (`run "What is
    37 + 48?"`); a word that names no model stays an unknown model, with a hint."""
    if prompt is not None or Path(model).expanduser().exists():
        return model, prompt
    from localv3.registry import REPO_ID_PATTERN, find_model, resolve_model_path

    try:
        resolve_model_path(model)
    except ModelNotFoundError as exc:
        if not MODEL_NAME.fullmatch(model):
            return DEFAULT_MODEL, model
        if find_model(model) is None and not REPO_ID_PATTERN.fullmatch(model):
            raise ModelNotFoundError(
                f"{exc}; a prompt goes after the model: localv3 {command} {DEFAULT_MODEL} {shlex.quote(model)}"
            ) from None
    return model, prompt


class TextArgumentError(LocalV3Error):
    pass


def typed_text(value: str | None, what: str) -> str | None:
    """`value` from the command line, refused in one line when it holds bytes that are not
    UTF-8 (Python keeps such bytes of argv as lone surrogates, which no tokenizer takes)."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        offset = len(value[: exc.start].encode("utf-8"))  # bytes before the first bad one
        escaped = ord(value[exc.start]) - 0xDC00  # surrogate escapes are U+DC80..U+DCFF
        byte = f"byte 0x{escaped:02x}" if 0x80 <= escaped <= 0xFF else "a character"
        raise TextArgumentError(f"{what} is not valid UTF-8 ({byte} at offset {offset})") from None
    return value
