"""`localv3 quantize MODEL`: a pulled Hugging Face checkpoint -> a localv3 checkpoint or a GGUF."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from localv3.commands.extras import require_llama_cpp
from localv3.commands.progress_bar import stop_progress
from localv3.formats.table import DENSE_SCHEMES as DENSE_CHOICES
from localv3.formats.table import EXPERT_SCHEMES as EXPERT_CHOICES
from localv3.render import format_bytes

FORMATS = ("localv3", "gguf")
UNQUANTIZED_GGUF_TYPES = ("f16", "f32")  # written by localv3 itself; the others by llama.cpp


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize_command)


def quantize_command(
    model: Annotated[str, typer.Argument(help="A models.toml name, a hub repo id, or a model directory.")],
    experts: Annotated[
        Optional[str], typer.Option(help=f"Routed experts: {' or '.join(EXPERT_CHOICES)} (default: the registry's choice, else q4).")
    ] = None,
    dense: Annotated[
        Optional[str],
        typer.Option(help=f"Attention, shared experts, dense FFN: {' or '.join(DENSE_CHOICES)} (default: the registry's, else q8)."),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(help="Output directory (a .gguf file with --format gguf); default $LOCALV3_HOME/models/NAME-EXPERTS."),
    ] = None,
    output_format: Annotated[
        str, typer.Option("--format", help="localv3 (safetensors for the native engine) or gguf (llama.cpp).")
    ] = "localv3",
    gguf_type: Annotated[Optional[str], typer.Option("--type", help="GGUF type: f32, f16, q8_0 or q4_k_m (default q4_k_m).")] = None,
) -> None:
    """Quantize a model, streaming shard by shard; the output appears only when complete.

    localv3 format: weights in ggml block types for its CPU kernels: q4 = Q4_K (Q4_0 for rows
    not a multiple of 256), q8 = Q8_0; routed experts q4 or q8, attention/shared experts/dense
    FFN q4, q8 or bf16; norms and router unchanged; `localv3 chat OUT`. Needs llama-cpp-python.
    GGUF: architecture deepseek2 for the llama.cpp engine (`--engine llama.cpp`); q8_0 and
    q4_k_m need llama-cpp-python, f16 and f32 do not.
    """
    from localv3 import registry
    from localv3.quantize import QuantizeError, QuantizeSettings, quantize_checkpoint

    if output_format not in FORMATS:
        raise QuantizeError(f"--format must be one of {', '.join(FORMATS)}, not {output_format!r}")
    if output_format == "gguf" and (experts or dense):
        raise QuantizeError("--experts/--dense choose the localv3 format's quantisation; use --type with --format gguf")
    if output_format == "localv3" and gguf_type:
        raise QuantizeError("--type chooses a GGUF type; use it with --format gguf")
    if output_format == "localv3" and out is not None and out.suffix.lower() == ".gguf":
        raise QuantizeError(f"--out {out} names a GGUF file: add --format gguf, or give a directory for the localv3 format")
    if output_format == "gguf":
        gguf_type = gguf_type or "q4_k_m"
        require_gguf_quantizer(gguf_type)
    source = registry.resolve_model_dir(model)
    entry = registry.find_model(model)
    name = entry.name if entry is not None else _name_of(model, source)
    with _TerminalProgress() as progress:
        if output_format == "gguf":
            target = gguf_target(out, name, gguf_type)
            from localv3.gguf_export import export_gguf

            summary = export_gguf(source, target, gguf_type, name, progress.callbacks)
            what = f"GGUF {gguf_type}"
        else:
            recommended = entry.quant if entry is not None else None
            settings = QuantizeSettings(
                experts=experts or (recommended.experts if recommended else "q4"),
                dense=dense or (recommended.dense if recommended else "q8"),
            )
            target = out or registry.outputs_dir() / f"{name}-{settings.experts}"
            info = {"model": model, "path": str(source), "revision": _revision(source, entry)}
            summary = quantize_checkpoint(source, target, settings, info, progress.callbacks)
            what = f"experts {settings.experts}, dense {settings.dense}"
    before, after = format_bytes(summary.source_bytes), format_bytes(summary.output_bytes)
    print(f"{name}: {before} -> {after} ({what}) in {summary.seconds:.1f} s", file=sys.stderr)
    print(summary.path)


def require_gguf_quantizer(gguf_type: str) -> None:
    """Refuse, before any file is written, a GGUF type that llama.cpp's quantiser writes when
    llama-cpp-python is missing (f16 and f32 are written without it)."""
    from localv3.gguf_export import GGUF_TYPES
    from localv3.quantize import QuantizeError

    if gguf_type not in GGUF_TYPES:
        raise QuantizeError(f"--type must be one of {', '.join(GGUF_TYPES)}, not {gguf_type!r}")
    if gguf_type not in UNQUANTIZED_GGUF_TYPES:
        require_llama_cpp(f"--type {gguf_type}", f"--type {' or '.join(UNQUANTIZED_GGUF_TYPES)} need nothing more")


def _name_of(model: str, source: Path) -> str:
    """A directory's model name: a hub snapshot's repo name, else the (resolved) directory's
    name; refused where `ls` and `rm` could not handle it (empty, or starting with - or .)."""
    if source.parent.name == "snapshots" and source.parent.parent.name.startswith("models--"):
        name = source.parent.parent.name.split("--")[-1].lower()
    else:
        name = (source.name if Path(model).expanduser().is_dir() else model.split("/")[-1]).lower()
    if not name or name.startswith(("-", ".")):
        from localv3.quantize import QuantizeError

        raise QuantizeError(f"cannot name the output after {model!r} ({source}); choose one with --out")
    return name


def _revision(source: Path, entry) -> str | None:
    """The hub commit of a snapshot directory, else the registry's pinned revision."""
    if source.parent.name == "snapshots":
        return source.name
    return entry.revision if entry is not None else None


def gguf_target(out: Path | None, name: str, gguf_type: str) -> Path:
    """The GGUF file to write: NAME-TYPE.gguf in the outputs (or the --out directory), or --out
    itself, given the .gguf suffix that the llama.cpp engine looks for if it lacks one."""
    from localv3 import registry

    file_name = f"{name}-{gguf_type}.gguf"
    if out is None:
        return registry.outputs_dir() / file_name
    if out.is_dir():
        return out / file_name
    return out if out.suffix.lower() == ".gguf" else out.with_name(out.name + ".gguf")


class _TerminalProgress:
    """Tensors and bytes done, on stderr; gone once finished."""

    def __init__(self) -> None:
        self.bar = Progress(
            TextColumn("quantizing"),
            BarColumn(),
            TextColumn("{task.fields[done]}/{task.fields[tensors]} tensors"),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.task = None
        self.done = 0
        from localv3.quantize import Progress as ProgressCallbacks

        self.callbacks = ProgressCallbacks(start=self._start, advance=self._advance)

    def __enter__(self) -> _TerminalProgress:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        stop_progress(self.bar, exc_type)

    def _start(self, tensors: int, nbytes: int) -> None:
        self.task = self.bar.add_task("quantizing", total=nbytes, done=0, tensors=tensors)
        self.bar.start()

    def _advance(self, tensors: int, nbytes: int) -> None:
        self.done += tensors
        self.bar.update(self.task, advance=nbytes, done=self.done)
