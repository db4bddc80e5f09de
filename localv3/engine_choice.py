"""`--engine native|llama.cpp`: from a model name or path to a loaded Engine.

The native engine reads safetensors checkpoints and GGUF files given directly; the llama.cpp
engine reads a GGUF file, either given directly or found in the model's directory. A GGUF file
goes to the llama.cpp engine unless the native one is asked for. Both offer the same interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from localv3.errors import LocalV3Error

if TYPE_CHECKING:
    from localv3.engines.base import Engine

ENGINE_NAMES = ("native", "llama.cpp")


class EngineChoiceError(LocalV3Error):
    pass


def parse_engine_list(text: str) -> list[str]:
    """'native,llama.cpp' -> ['native', 'llama.cpp'], rejecting unknown names."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ENGINE_NAMES]
    if unknown or not names:
        raise EngineChoiceError(
            f"unknown engine {', '.join(unknown) or repr(text)}; choose from {', '.join(ENGINE_NAMES)}"
        )
    return list(dict.fromkeys(names))


def _is_gguf_file(path: Path) -> bool:
    return path.suffix.lower() == ".gguf" and path.is_file()


def find_gguf(model: str) -> Path:
    """The GGUF file for `model`: the path itself, or the one GGUF (or first split part) in its directory."""
    path = Path(model).expanduser()
    if _is_gguf_file(path):
        return path
    from localv3.registry import resolve_model_dir

    model_dir = resolve_model_dir(model)
    files = sorted(model_dir.glob("*.gguf"))
    first_parts = [f for f in files if "-00001-of-" in f.name]
    if len(first_parts) == 1:
        return first_parts[0]
    if len(files) == 1:
        return files[0]
    if not files:
        raise EngineChoiceError(
            f"{model} has no GGUF file in {model_dir}; the llama.cpp engine needs one "
            f"(`localv3 quantize {model} --format gguf` writes it)"
        )
    names = ", ".join(f.name for f in files)
    raise EngineChoiceError(f"{model_dir} holds several GGUF files ({names}); pass the one to use as MODEL")


def default_engine(model: str | Path) -> str:
    """The engine a model gets when none is named: llama.cpp for a GGUF file, else native."""
    return "llama.cpp" if Path(model).suffix.lower() == ".gguf" else "native"


def weights_path(model: str, engine: str) -> Path:
    """The files `engine` would load for `model`: a GGUF file (llama.cpp), or a checkpoint
    directory or GGUF file (native)."""
    if engine == "llama.cpp":
        return find_gguf(model)
    if engine != "native":
        raise EngineChoiceError(f"unknown engine {engine!r}; choose from {', '.join(ENGINE_NAMES)}")
    if _is_gguf_file(Path(model).expanduser()):
        return Path(model).expanduser()
    from localv3.registry import resolve_model_dir

    return resolve_model_dir(model)


def open_engine(
    model: str,
    engine: str | None = None,
    max_context: int | None = None,
    with_mtp: bool = True,
    threads: int | None = None,
    cuda_graphs: bool = False,
) -> Engine:
    """The CLI's load: `localv3.load`, recording routing statistics (they feed the next plan);
    `engine`: None picks `default_engine`;
    `threads`: CPU threads to compute with (default: the engine's own choice); `cuda_graphs`:
    as `localv3.load` takes it (the commands check for a CUDA device first)."""
    from localv3.api import load
    from localv3.offload.planner import PlanError

    try:
        return load(
            model,
            engine=engine,
            max_context=max_context,
            with_mtp=with_mtp,
            cpu_threads=threads,
            record_routing=True,
            cuda_graphs=cuda_graphs,
        )
    except PlanError as error:
        raise LocalV3Error(error.render({"context": "--ctx"}, _fix_when_loading)) from None


def _fix_when_loading(fix) -> str:
    """A fix the loading commands have no flag for: a smaller checkpoint, or `plan` to explore."""
    from localv3.offload.quant import ROLES

    if fix.setting in ROLES:
        return f"{fix.describe()} (`localv3 quantize MODEL --{fix.setting} {fix.value}` writes that checkpoint)"
    return f"{fix.describe()} (`localv3 plan MODEL` shows the options)"
