"""What every engine offers (chat, run and bench use only this)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from localv3.config import ModelConfig
from localv3.generate import (
    DecodeSession,
    GenerationChunk,
    StepStrategy,
    check_max_new_tokens,
    plain_steps,
    stream_generate,
)
from localv3.sampling import SamplingSettings
from localv3.tokenizer import Tokenizer



class Engine:
    """Subclasses set name, path, config, tokenizer, max_context and implement new_session."""

    name: str = "engine"
    path: Path
    config: ModelConfig
    tokenizer: Tokenizer | None
    max_context: int
    kept_sessions = 1  # sessions `reuse_cache` keeps for prefix reuse (the server keeps several)

    def new_session(self, capacity: int) -> DecodeSession:
        raise NotImplementedError

    @property
    def kv_bytes_per_token(self) -> int:
        raise NotImplementedError

    @property
    def placement(self) -> str:
        """Where the weights live, in a few words (chat's /show, bench's table)."""
        return self.name

    def step_strategy(self, speculative: bool | None) -> StepStrategy:
        """How decoding advances; engines with MTP speculation override this."""
        return plain_steps

    def stop_token_ids(self) -> list[int]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    def stream_generate(
        self,
        token_ids: list[int],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_strings: list[str] | None = None,
        stop_token_ids: list[int] | None = None,
        speculative: bool | None = None,
        context: int | None = None,
        reuse_cache: bool = False,
    ) -> Iterator[GenerationChunk]:
        """`reuse_cache` keeps the session between calls and prefills only what follows the
        longest prefix the new prompt shares with it (a chat's earlier turns)."""
        check_max_new_tokens(max_new_tokens)  # before it sizes the session
        capacity = min(context or self.max_context, self.max_context)
        if reuse_cache:
            session, cached = self._session_sharing_prefix(token_ids, capacity)
        else:
            session, cached = self.new_session(min(capacity, len(token_ids) + max_new_tokens + 1)), 0
        sampling = SamplingSettings(temperature, top_k, top_p, seed)
        stops = self.stop_token_ids() if stop_token_ids is None else stop_token_ids
        yield from stream_generate(
            session,
            self.tokenizer,
            token_ids,
            max_new_tokens,
            sampling,
            stops,
            stop_strings,
            self.step_strategy(speculative),
            cached_tokens=cached,
        )

    def _session_sharing_prefix(self, token_ids: list[int], capacity: int) -> tuple[DecodeSession, int]:
        """A kept session rolled back to the prefix it shares with `token_ids` -> (session, tokens kept).

        The last shared token is always run again: its hidden state is where decoding (and MTP
        drafting) starts. Up to `kept_sessions` sessions are kept, least recently used dropped
        first; the one sharing the longest prefix is reused unless that would discard most of
        what it holds while there is room for a new one. Sessions without
        `token_ids`/`rollback` are never kept.
        """
        kept = self.__dict__.setdefault("_kept_sessions", [])  # least recently used first
        best, keep = None, 0
        for session in kept:
            shared = _shared_length(session.token_ids, token_ids)
            if session.capacity == capacity and min(shared, len(token_ids)) - 1 > keep:
                best, keep = session, min(shared, len(token_ids)) - 1
        full = len(kept) >= self.kept_sessions
        if best is not None and (full or 2 * keep >= len(best.token_ids)):
            best.rollback(best.position - keep)
            kept.remove(best)
            kept.append(best)
            return best, keep
        if full:
            del kept[: len(kept) - self.kept_sessions + 1]  # before allocating its replacement
        session = self.new_session(capacity)
        if hasattr(session, "rollback") and hasattr(session, "token_ids"):
            kept.append(session)
        return session, 0

    def generate(self, token_ids: list[int], max_new_tokens: int, temperature: float = 0.0, **kwargs) -> list[int]:
        """The new token ids (greedy at temperature 0)."""
        out: list[int] = []
        for chunk in self.stream_generate(token_ids, max_new_tokens, temperature, **kwargs):
            out.extend(chunk.token_ids)
        return out

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        raise NotImplementedError


def _shared_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    shared = 0
    for ours, theirs in zip(a, b):
        if ours != theirs:
            break
        shared += 1
    return shared
