"""`localv3 run`: one prompt in, the answer out on stdout; built for pipes and scripts."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Annotated, BinaryIO

import typer

from localv3.commands.options import (
    DEFAULT_MODEL,
    Context,
    CudaGraphs,
    EngineName,
    MaxTokens,
    ModelArgument,
    Mtp,
    Seed,
    System,
    Temperature,
    TopK,
    TopP,
    check_cuda_graphs,
    model_and_prompt,
    resolve_sampling,
    typed_text,
)
from localv3.commands.json_output import rounded
from localv3.errors import LocalV3Error

if TYPE_CHECKING:
    from localv3.generate import GenerationStats


class PromptError(LocalV3Error):
    pass


def read_prompt(prompt: str | None, stdin: BinaryIO | None, model: str = DEFAULT_MODEL) -> str:
    """stdin's text (when given) followed by PROMPT; errors on invalid UTF-8 or an empty prompt
    (and with neither, at a terminal, says how to ask or chat)."""
    if stdin is None and prompt is None:
        raise PromptError(
            f'no prompt: `localv3 run {model} "What is 2 + 3?"` answers one, `localv3 chat {model}` starts a chat'
        )
    parts = []
    if stdin is not None:
        data = stdin.read()
        try:
            piped = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PromptError(
                f"stdin is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
            ) from None
        if piped.strip():
            parts.append(piped.rstrip("\n"))
    if prompt and prompt.strip():
        parts.append(prompt)
    if not parts:
        raise PromptError("the prompt is empty: give PROMPT or pipe text on stdin")
    return "\n\n".join(parts)


def piped_stdin() -> BinaryIO | None:
    """stdin's bytes when it is a pipe or file; None when it is a terminal (or closed)."""
    if sys.stdin is None or sys.stdin.isatty():
        return None
    return sys.stdin.buffer


def final_record(stats: GenerationStats, model: str, text: str) -> dict:
    """The last --json line: done, the model, the whole answer, the run's statistics (and the
    MTP acceptance when it speculated), floats rounded."""
    from localv3.render import mtp_acceptance

    record = {
        "done": True,
        "model": model,
        "text": text,
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "prompt_tok_s": stats.prompt_tok_s,
        "decode_tok_s": stats.decode_tok_s,
        "ttft_s": stats.ttft_s,
        "finish_reason": stats.finish_reason,
    }
    acceptance = mtp_acceptance(stats)
    if acceptance is not None:
        record["mtp_acceptance"] = acceptance
        record["mtp_tokens_per_step"] = stats.speculation.get("tokens_per_step")
        record["mtp_experts_read_per_step"] = stats.speculation.get("experts_read_per_step")
    return rounded(record)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(
    model: ModelArgument = DEFAULT_MODEL,
    prompt: Annotated[str | None, typer.Argument(help="The prompt; piped stdin goes before it.")] = None,
    json_lines: Annotated[
        bool,
        typer.Option(
            "--json", help='JSON lines: {"text": ...} pieces, then {"done": true, "model", "text", stats}.'
        ),
    ] = False,
    system: System = None,
    max_tokens: MaxTokens = None,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    seed: Seed = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            help="Print timings to stderr, as `ollama run --verbose`; with MTP, the answer is decoded"
            " once more without it to measure the speed-up.",
        ),
    ] = False,
    mtp: Mtp = None,
    ctx: Context = None,
    engine: EngineName = None,
    cuda_graphs: CudaGraphs = False,
) -> None:
    """Answer one prompt on stdout (stdin, when piped, is placed before PROMPT)."""
    from localv3.engine_choice import default_engine, open_engine
    from localv3.generate import final_stats
    from localv3.render import mtp_acceptance, verbose_lines

    model, prompt = model_and_prompt("run", model, typed_text(prompt, "PROMPT"))
    system = typed_text(system, "--system")
    if raw and system:
        raise PromptError("--system goes into the chat template, which --raw leaves out")
    engine = engine or default_engine(model)
    if cuda_graphs:
        check_cuda_graphs([engine])
    text = read_prompt(prompt, piped_stdin(), model)
    started = time.perf_counter()
    loaded = open_engine(model, engine, max_context=ctx, with_mtp=mtp is not False, cuda_graphs=cuda_graphs)
    load_s = time.perf_counter() - started
    if loaded.tokenizer is None:
        raise PromptError(f"{model} has no tokenizer.json, so it cannot read text")
    if raw:
        token_ids = loaded.tokenizer.encode(text)
    else:
        system_message = [{"role": "system", "content": system}] if system else []
        token_ids = loaded.tokenizer.encode_chat([*system_message, {"role": "user", "content": text}])
    temperature, top_p, top_k = resolve_sampling(loaded.path, temperature, top_p, top_k)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    stats = None
    answer = []
    for chunk in loaded.stream_generate(
        token_ids, max_new_tokens=max_tokens or loaded.max_context, speculative=mtp, **sampling
    ):
        if chunk.stats is not None:
            stats = chunk.stats
        elif chunk.text:
            answer.append(chunk.text)
            _write(json.dumps({"text": chunk.text}, ensure_ascii=False) + "\n" if json_lines else chunk.text)
    if json_lines:
        _write(json.dumps(final_record(stats, model, "".join(answer)), ensure_ascii=False) + "\n")
    elif answer and not answer[-1].endswith("\n"):
        _write("\n")
    if verbose:
        total_s = time.perf_counter() - started
        plain = None
        if mtp_acceptance(stats) is not None:  # measure the speed-up: the same answer without MTP
            plain = final_stats(
                loaded.stream_generate(
                    token_ids, max_new_tokens=stats.completion_tokens, speculative=False, **sampling
                )
            )
        for line in verbose_lines(stats, load_s, total_s, plain):
            print(line, file=sys.stderr)


def register(app: typer.Typer) -> None:
    app.command()(run)
