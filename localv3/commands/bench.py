"""`localv3 bench`: llama-bench-style speed tests (ppP, tgN) for models and engines."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.text import Text

from localv3.commands.json_output import rounded
from localv3.commands.options import CudaGraphs, check_cuda_graphs
from localv3.errors import LocalV3Error

if TYPE_CHECKING:
    from localv3.measure import BenchRecord, BenchSettings, WeightsInfo

TABLE_COLUMNS = (
    ("model", "left"),
    ("size", "right"),
    ("params", "right"),
    ("engine", "left"),
    ("placement", "left"),
    ("threads", "right"),
    ("test", "right"),
    ("t/s", "right"),
    ("TTFT", "right"),
    ("TPOT", "right"),
    ("predicted", "right"),
    ("MTP acc.", "right"),
    ("tok/step", "right"),
    ("experts/step", "right"),
    ("peak RSS", "right"),
    ("peak VRAM", "right"),
)


def _model_label(model: str) -> str:
    path = Path(model).expanduser()
    return path.name if path.exists() else model


def table_rows(records: list[BenchRecord]) -> list[list[str]]:
    from localv3.render import format_bytes, format_count, format_duration

    def optional(value, fmt) -> str:
        return "-" if value is None else fmt(value)

    rows = []
    for r in records:
        speed = f"{r.tok_s_mean:.2f} ± {r.tok_s_std:.2f}"
        if r.mtp:
            speed += f" (x{r.mtp_speedup:.2f})"
        rows.append(
            [
                _model_label(r.model),
                format_bytes(r.size_bytes),
                format_count(r.params),
                r.engine,
                r.placement,
                str(r.threads),
                r.test,
                speed,
                optional(r.ttft_s_mean, format_duration),
                optional(r.tpot_s_mean, format_duration),
                optional(r.predicted_tok_s, lambda t: f"{t:.2f}"),
                optional(r.mtp_acceptance, lambda a: f"{a:.0%}"),
                optional(r.mtp_tokens_per_step, lambda t: f"{t:.2f}"),
                optional(r.experts_read_per_step, lambda e: f"{e:.1f}"),
                optional(r.peak_rss_bytes, format_bytes),
                optional(r.peak_vram_bytes, format_bytes),
            ]
        )
    return rows


def markdown_table(records: list[BenchRecord]) -> str:
    """The table as llama-bench prints it: markdown, numbers right-aligned."""
    rows = table_rows(records)
    headers = [name for name, _ in TABLE_COLUMNS]
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        padded = [
            cell.rjust(width) if align == "right" else cell.ljust(width)
            for cell, width, (_, align) in zip(cells, widths, TABLE_COLUMNS, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        "-" * (w - 1) + ":" if align == "right" else "-" * w
        for w, (_, align) in zip(widths, TABLE_COLUMNS, strict=True)
    ]
    return "\n".join([line(headers), line(rule)] + [line(row) for row in rows])


def _measure_load(
    model: str,
    engine: str,
    weights: WeightsInfo,
    n_threads: int | None,
    settings: BenchSettings,
    progress: Callable[[str], None],
    cuda_graphs: bool = False,
) -> Iterator[BenchRecord]:
    """Load `model` on `engine` with `n_threads` CPU threads (None: the engine's default; both
    engines take their threads at load) and measure it, record by record; peak memory is this
    load's, up to the end of the record's test."""
    from localv3.measure import PeakMemory, bench_engine
    from localv3.engine_choice import open_engine

    memory = PeakMemory()
    memory.reset()
    threads_note = f", {n_threads} threads" if n_threads else ""
    progress(f"loading {model} [{engine}{threads_note}]")
    max_context = max(settings.n_prompt, settings.n_gen + 1) + 2
    loaded = open_engine(
        model, engine, max_context=max_context, with_mtp=settings.mtp, threads=n_threads, cuda_graphs=cuda_graphs
    )
    for record in bench_engine(loaded, model, weights, settings, progress):
        record.peak_rss_bytes, record.peak_vram_bytes = memory.rss_bytes(), memory.vram_bytes()
        yield record
    del loaded
    gc.collect()


def runnable_jobs(
    models: list[str], engines: list[str] | None, say: Callable[[str], None]
) -> list[tuple[str, str, WeightsInfo]]:
    """(model, engine, weights) for every pair that can be measured (engines None: each model's
    default engine), found before minutes of measuring; a pair that cannot (no GGUF,
    llama-cpp-python missing) is skipped with its reason, and when none can, the reasons are the
    error."""
    from localv3.measure import BenchError, weights_info
    from localv3.commands.extras import require_llama_cpp
    from localv3.engine_choice import default_engine, weights_path

    pairs = [(model, engine) for model in models for engine in (engines or [default_engine(model)])]
    jobs, reasons = [], []
    for model, engine in pairs:
        try:
            if engine == "llama.cpp":
                require_llama_cpp("the llama.cpp engine")
            jobs.append((model, engine, weights_info(weights_path(model, engine))))
        except LocalV3Error as exc:
            reasons.append(f"{model} [{engine}]: {exc}" if len(pairs) > 1 else str(exc))
    if not jobs:
        raise BenchError("; ".join(reasons))
    for reason in reasons:
        say(f"skipped {reason}")
    return jobs


def print_records(records: list[BenchRecord], json_output: bool) -> None:
    if json_output:
        print(json.dumps([rounded(r.to_dict()) for r in records], indent=2))
    else:
        print(markdown_table(records))
    return records


def bench(
    models: Annotated[
        list[str] | None,
        typer.Argument(help="Models to measure (names, hub repo ids, directories or GGUF files).", show_default="tiny"),
    ] = None,
    n_prompt: Annotated[
        int, typer.Option("--n-prompt", "-p", min=0, help="Prompt tokens of the pp test; 0 skips it.")
    ] = 512,
    n_gen: Annotated[
        int, typer.Option("--n-gen", "-n", min=0, help="Generated tokens of the tg test; 0 skips it.")
    ] = 128,
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", min=1, help="Repetitions of each test.")] = 5,
    engines: Annotated[
        str | None,
        typer.Option(
            "--engine",
            help="Comma-separated engines: native, llama.cpp (default: llama.cpp for a .gguf file, else native).",
            show_default=False,
        ),
    ] = None,
    threads: Annotated[
        str | None,
        typer.Option(
            "--threads",
            "-t",
            help="Comma-separated CPU thread counts; each runs every test (default: the engine's own).",
            show_default=False,
        ),
    ] = None,
    mtp: Annotated[bool, typer.Option("--mtp", help="Also measure tg with MTP speculative decoding.")] = False,
    predict: Annotated[
        bool,
        typer.Option("--predict", help="Add the roofline prediction of the plan the engine was built from (native engine)."),
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print a JSON list of records instead of the table.")
    ] = False,
    cuda_graphs: CudaGraphs = False,
) -> None:
    """Measure prefill (ppP) and decode (tgN) speed, llama-bench style (Ctrl-C prints the rows measured so far)."""
    from localv3.measure import BenchError, BenchSettings, parse_thread_counts
    from localv3.commands.options import DEFAULT_MODEL
    from localv3.engine_choice import default_engine, parse_engine_list

    if not n_prompt and not n_gen:
        raise BenchError("nothing to measure: -p and -n are both 0")
    models = models or [DEFAULT_MODEL]
    engine_names = parse_engine_list(engines) if engines is not None else None
    if cuda_graphs:
        check_cuda_graphs(engine_names or [default_engine(model) for model in models])
    thread_counts = parse_thread_counts(threads) if threads is not None else [None]  # None: the engine's default
    settings = BenchSettings(n_prompt, n_gen, repetitions, mtp, predict)
    err = Console(stderr=True, highlight=False, soft_wrap=True)

    def progress(message: str) -> None:
        err.print(Text(message, style="dim"))

    jobs = runnable_jobs(models, engine_names, lambda line: err.print(Text(line)))
    records = []
    try:
        for model, engine, info in jobs:
            for n_threads in thread_counts:
                records.extend(_measure_load(model, engine, info, n_threads, settings, progress, cuda_graphs))
    except KeyboardInterrupt:
        if records:
            print_records(records, json_output)
        raise
    print_records(records, json_output)


def register(app: typer.Typer) -> None:
    app.command()(bench)
