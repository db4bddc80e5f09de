"""Generation as one iterator: prefill, decode, sampling, stop conditions, text pieces, timings.

`stream_generate` drives any engine session (native torch, llama.cpp) that offers
`prefill(ids) -> logits [V]`, `decode(id) -> logits [V]` and `capacity` (tokens the
session can hold). chat, run, bench and a future server all consume the same iterator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch

from localv3.errors import ContextFullError, LocalV3Error
from localv3.sampling import SamplingSettings, new_generator, sample
from localv3.tokenizer import StreamDecoder, Tokenizer


class DecodeSession(Protocol):
    capacity: int

    def prefill(self, token_ids: list[int]) -> torch.Tensor: ...

    def decode(self, token_id: int) -> torch.Tensor: ...


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, reused from the previous call's cache (not prefilled)
    completion_tokens: int = 0
    prompt_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    finish_reason: str = ""
    speculation: dict | None = None  # MTP: acceptance, tokens per step, experts read per step

    @property
    def prompt_tok_s(self) -> float:
        """Prompt tokens actually prefilled, per second."""
        prefilled = self.prompt_tokens - self.cached_tokens
        return prefilled / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first, over the time after the first token."""
        decoded = self.completion_tokens - 1
        return decoded / self.decode_s if decoded > 0 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(prompt_tok_s=self.prompt_tok_s, decode_tok_s=self.decode_tok_s)
        return d


@dataclass
class GenerationChunk:
    """One step of output: the new token ids and their text (possibly empty), or the final stats."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    stats: GenerationStats | None = None  # set on the last chunk only


# A step strategy turns the prefill logits into batches of accepted tokens (one per decode
# for plain decoding; several per verify step for MTP speculation).
StepStrategy = Callable[[DecodeSession, torch.Tensor, SamplingSettings, torch.Generator], Iterator[list[int]]]


def plain_steps(session: DecodeSession, logits: torch.Tensor, sampling: SamplingSettings, gen) -> Iterator[list[int]]:
    while True:
        token = sample(logits, sampling, gen)
        yield [token]
        logits = session.decode(token)


def check_max_new_tokens(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LocalV3Error(f"max_new_tokens must be a whole number >= 0, not {value!r}")


def stream_generate(
    session: DecodeSession,
    tokenizer: Tokenizer | None,
    prompt_ids: list[int],
    max_new_tokens: int = 256,
    sampling: SamplingSettings | None = None,
    stop_token_ids: list[int] | None = None,
    stop_strings: list[str] | None = None,
    steps: StepStrategy = plain_steps,
    cached_tokens: int = 0,
) -> Iterator[GenerationChunk]:
    """`cached_tokens`: the session already holds prompt_ids[:cached_tokens] (a reused prefix)."""
    sampling = sampling or SamplingSettings()
    check_max_new_tokens(max_new_tokens)
    if not prompt_ids:
        raise LocalV3Error("the prompt is empty")
    if len(prompt_ids) >= session.capacity:
        raise ContextFullError(
            f"the prompt has {len(prompt_ids)} tokens but the context holds {session.capacity}; "
            "use a shorter prompt or a larger --ctx"
        )
    budget = min(max_new_tokens, session.capacity - len(prompt_ids))
    length_reason = "length" if budget == max_new_tokens else "context"
    if budget == 0:  # nothing asked for: no forward at all
        yield GenerationChunk(stats=GenerationStats(prompt_tokens=len(prompt_ids), finish_reason=length_reason))
        return
    stops = set(stop_token_ids or [])
    stop_strings = [s for s in (stop_strings or []) if s]
    decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
    stats = GenerationStats(prompt_tokens=len(prompt_ids), cached_tokens=cached_tokens)
    gen = new_generator(sampling)

    start = time.perf_counter()
    logits = session.prefill(list(prompt_ids[cached_tokens:]))
    if not torch.isfinite(logits).all():
        raise LocalV3Error("the model produced NaN or infinite logits: its weights or config.json are corrupt")
    stats.prompt_s = time.perf_counter() - start
    text_out = _StopStringFilter(stop_strings)
    first_token_at = None
    finish = length_reason
    for batch in steps(session, logits, sampling, gen):
        if first_token_at is None:
            first_token_at = time.perf_counter()
            stats.ttft_s = first_token_at - start
        emitted: list[int] = []
        piece = ""
        for token in batch:
            if token in stops:
                finish = "stop"
                break
            emitted.append(token)
            stats.completion_tokens += 1
            if decoder is not None:
                piece += decoder.push(token)
            if stats.completion_tokens >= budget:
                break
        piece, hit_stop = text_out.feed(piece)
        if emitted or piece:
            yield GenerationChunk(emitted, piece)
        if hit_stop:
            finish = "stop"
        if finish == "stop" or hit_stop or stats.completion_tokens >= budget:
            break
    if decoder is not None and finish != "stop":
        tail, _ = text_out.feed(decoder.flush())
        tail += text_out.flush()
        if tail:
            yield GenerationChunk([], tail)
    end = time.perf_counter()
    stats.decode_s = end - first_token_at if first_token_at else 0.0
    stats.finish_reason = finish
    speculation = getattr(steps, "report", None)
    stats.speculation = speculation() if callable(speculation) else None
    yield GenerationChunk(stats=stats)


def final_stats(chunks: Iterable[GenerationChunk]) -> GenerationStats:
    """Run a generation to its end, discarding the output -> its stats (for measurements)."""
    stats = None
    for chunk in chunks:
        stats = chunk.stats or stats
    return stats


class _StopStringFilter:
    """Holds back text that may be the start of a stop string; cuts at a completed one."""

    def __init__(self, stop_strings: list[str]):
        self.stop_strings = stop_strings
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        if not self.stop_strings:
            return piece, False
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        keep = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
