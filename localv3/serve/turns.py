"""One request on the engine, in the worker thread: the prompt, the shared generation iterator,
and the events that carry the answer back (Delta pieces, then Finished).

Generation keeps the engine's sessions between requests (`reuse_cache`): a request that
extends an earlier conversation prefills only what is new.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING

from localv3.chat_session import prompt_opens_think
from localv3.generate import GenerationStats
from localv3.sampling import SamplingDefaults, model_sampling_defaults
from localv3.serve.answer import AnswerSplitter
from localv3.serve.errors import bad_request
from localv3.serve.requests import ChatRequest, CompletionRequest, Sampling
from localv3.serve.tools import CALLS_BEGIN, ToolCallFormat, offer_functions, tool_call_format
from localv3.serve.worker import Job

if TYPE_CHECKING:
    from localv3.engines.base import Engine

THINK_TAIL_TOKENS = 8  # prompt tokens decoded to see whether the template opened a thought


@dataclass(frozen=True)
class Served:
    """The loaded model and what the server derives from it once."""

    engine: Engine
    defaults: SamplingDefaults  # the model's generation_config.json
    tools: ToolCallFormat | None  # None: the chat template renders no tool calls
    speculative: bool | None = None  # MTP on/off; None lets the engine decide

    @classmethod
    def of(cls, engine: Engine, speculative: bool | None = None) -> "Served":
        tokenizer = engine.tokenizer
        return cls(
            engine=engine,
            defaults=model_sampling_defaults(engine.path),
            tools=tool_call_format(tokenizer.chat_template, tokenizer.token_to_id(CALLS_BEGIN)),
            speculative=speculative,
        )


@dataclass(frozen=True)
class Finished:
    """The last event of a job that ran to its end."""

    stats: GenerationStats
    finish_reason: str  # stop | length | tool_calls
    tool_calls: list[dict]
    queue_s: float

    def usage(self) -> dict:
        s = self.stats
        return {
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "total_tokens": s.prompt_tokens + s.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
        }

    def timings(self) -> dict:
        """The `x_localv3` fields of a response."""
        s = self.stats
        return {
            "queue_s": self.queue_s,
            "prompt_s": s.prompt_s,
            "ttft_s": s.ttft_s,
            "prompt_tok_s": s.prompt_tok_s,
            "decode_tok_s": s.decode_tok_s,
            "cached_tokens": s.cached_tokens,
        }


def chat_work(request: ChatRequest):
    def work(served: Served, job: Job) -> GenerationStats | None:
        tokenizer = served.engine.tokenizer
        if not tokenizer.chat_template:
            raise bad_request("this model has no chat template: use /v1/completions")
        uses_tools = request.tools or any(m["role"] == "tool" or "tool_calls" in m for m in request.messages)
        if uses_tools and served.tools is None:
            raise bad_request("this model's chat template has no tool-call format", "tools")
        if request.tools and tokenizer.renders_tools:  # the template writes the definitions itself, in OpenAI's form
            tools = [{"type": "function", "function": function} for function in request.tools]
            prompt_ids = tokenizer.encode_chat(request.messages, tools=tools)
        else:
            messages = offer_functions(request.messages, request.tools, served.tools) if request.tools else request.messages
            prompt_ids = tokenizer.encode_chat(messages)
        opens_think = prompt_opens_think(tokenizer.decode(prompt_ids[-THINK_TAIL_TOKENS:], skip_special_tokens=False))
        splitter = AnswerSplitter(tokenizer, opens_think, served.tools if request.tools else None)
        return generate(served, prompt_ids, request.sampling, job, splitter)

    return work


def completion_work(request: CompletionRequest):
    def work(served: Served, job: Job) -> GenerationStats | None:
        tokenizer = served.engine.tokenizer
        prompt = request.prompt
        prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        return generate(served, prompt_ids, request.sampling, job, AnswerSplitter(tokenizer, thinking=False))

    return work


def generate(
    served: Served, prompt_ids: list[int], sampling: Sampling, job: Job, splitter: AnswerSplitter
) -> GenerationStats | None:
    """Stream the answer to `job` as Delta events, then Finished -> its stats; None when the job
    was cancelled (the generation stops at the next token)."""
    engine = served.engine
    if len(prompt_ids) >= engine.max_context:
        raise bad_request(
            f"the prompt has {len(prompt_ids)} tokens but the context holds {engine.max_context}; "
            "send a shorter prompt or restart the server with a larger --ctx",
            "messages",
            code="context_length_exceeded",
        )
    defaults = served.defaults
    chunks = engine.stream_generate(
        prompt_ids,
        max_new_tokens=sampling.max_tokens or engine.max_context,
        temperature=defaults.temperature if sampling.temperature is None else sampling.temperature,
        top_k=defaults.top_k if sampling.top_k is None else sampling.top_k,
        top_p=defaults.top_p if sampling.top_p is None else sampling.top_p,
        seed=sampling.seed,
        stop_strings=list(sampling.stop),
        speculative=served.speculative,
        reuse_cache=True,
    )
    stats = None
    with closing(chunks):
        for chunk in chunks:
            if job.cancelled.is_set():
                return None
            if chunk.stats is not None:
                stats = chunk.stats
            elif delta := splitter.feed(chunk):
                job.emit(delta)
    tail, calls = splitter.finish()
    if tail:
        job.emit(tail)
    reason = "tool_calls" if calls else ("stop" if stats.finish_reason == "stop" else "length")
    job.emit(Finished(stats, reason, calls, queue_s=job.started_at - job.submitted_at))
    return stats

