"""MTP speculative decoding: draft with DeepSeek-V3's Multi-Token Prediction module, verify in one forward.

Each step: the MTP module drafts token t+2 from the main model's last hidden state and the
embedding of token t+1 (chained on its own hidden state for k > 1 drafts); one forward of the
main model over [pending token, drafts...] through the latent cache verifies them all; greedy
accepts the longest prefix that matches the model's own argmax (so the output is exactly that
of plain greedy decoding), sampling uses the speculative-sampling rule (so the output follows
the model's distribution exactly). Rejected positions are rolled back in the cache. The MTP
layer keeps its own cache rows: row p holds the MTP block's latent for (h_p, token p+1), and
rows are (re)written for every accepted position before drafting from it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from localv3.model.moe import MoE
from localv3.model.transformer import Transformer
from localv3.sampling import SamplingSettings, sample, token_probabilities


class ExpertReadCounter:
    """Distinct routed experts read per step, summed over MoE layers (via MoE.routing_observers).

    A step's reads are the union over its forwards, per layer: an expert chosen by several of
    the step's tokens is read once. Observations are kept raw and reduced in `per_step`.
    """

    def __init__(self, model: Transformer):
        self.layers = [m for m in model.modules() if isinstance(m, MoE)]
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.steps: list[list[tuple[int, torch.Tensor]]] = []
        self._observers = [functools.partial(self._observe, i) for i in range(len(self.layers))]

    def _observe(self, layer: int, indices: torch.Tensor) -> None:
        self.pending.append((layer, indices))

    def attach(self) -> None:
        for moe, observer in zip(self.layers, self._observers):
            moe.routing_observers.append(observer)

    def detach(self) -> None:
        for moe, observer in zip(self.layers, self._observers):
            if observer in moe.routing_observers:
                moe.routing_observers.remove(observer)

    def discard(self) -> None:
        self.pending = []

    def end_step(self) -> None:
        self.steps.append(self.pending)
        self.pending = []

    def per_step(self) -> list[int]:
        counts = []
        for observations in self.steps:
            by_layer: dict[int, list[torch.Tensor]] = {}
            for layer, indices in observations:
                by_layer.setdefault(layer, []).append(indices.flatten())
            counts.append(sum(int(torch.cat(ix).unique().numel()) for ix in by_layer.values()))
        return counts


@dataclass
class SpeculationStats:
    steps: int = 0  # verify forwards
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens the verify steps produced (accepted drafts + one each)


def accept_greedy(target_ids: list[int], drafts: list[int]) -> tuple[int, int]:
    """target_ids: the argmax at each verified position (len(drafts) + 1).

    -> (number of drafts accepted, the token after them).
    """
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == target_ids[accepted]:
        accepted += 1
    return accepted, target_ids[accepted]


def accept_sampled(
    target_probs: torch.Tensor,  # [k+1, V] the model's sampling distribution at each verified position
    drafts: list[int],
    draft_probs: torch.Tensor,  # [k, V] the distributions the drafts were sampled from
    generator: torch.Generator,
) -> tuple[int, int]:
    """The speculative-sampling rule: accept draft d with probability min(1, p(d) / q(d)); at the
    first rejection sample from norm(max(0, p - q)); if all are accepted, sample from the next p.

    -> (number of drafts accepted, the token after them).
    """
    for i, draft in enumerate(drafts):
        p, q = target_probs[i], draft_probs[i]
        if float(torch.rand((), generator=generator)) * float(q[draft]) < float(p[draft]):
            continue
        residual = (p - q).clamp(min=0)  # [V]
        if float(residual.sum()) <= 0:  # p == q up to rounding: p itself is the residual
            residual = p
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(drafts), int(torch.multinomial(target_probs[len(drafts)], 1, generator=generator))


class MTPSpeculation:
    """A StepStrategy (see localv3.generate) for sessions of the native engine."""

    def __init__(self, model: Transformer, draft_tokens: int = 1):
        if not len(model.mtp):
            raise ValueError("MTP speculation needs a model with an MTP layer")
        self.model = model
        self.draft_tokens = draft_tokens
        self.stats = SpeculationStats()
        self.counter = ExpertReadCounter(model)

    def __call__(self, session, prefill_logits, sampling: SamplingSettings, generator) -> Iterator[list[int]]:
        self.counter.attach()
        try:
            yield from self._steps(session, prefill_logits, sampling, generator)
        finally:
            self.counter.detach()

    def _mtp(self, session, hidden: torch.Tensor, next_ids: list[int], start: int, logits_rows: int = 1):
        """MTP over positions start.. : hidden [1, S, D], next_ids (S)
        -> (logits [logits_rows, V] of the last positions, MTP hidden [1, S, D])."""
        with torch.inference_mode():
            tokens = torch.tensor([next_ids], dtype=torch.long)  # [1, S], on the host like every token id
            logits, mtp_hidden = self.model.mtp_forward(hidden, tokens, start, session.cache, logits_rows=logits_rows)
        return logits[0], mtp_hidden

    def _draft(self, session, hidden, next_ids, start, count, sampling, generator):
        """Write MTP rows for positions start.. and draft `count` tokens after the last one.

        -> (drafts, their sampling distributions [count, V] or None when greedy).
        """
        drafts, probs = [], []
        position = start + len(next_ids)
        logits, mtp_hidden = self._mtp(session, hidden, next_ids, start)
        for i in range(count):
            if sampling.greedy:
                drafts.append(int(logits[-1].argmax()))
            else:
                probs.append(token_probabilities(logits[-1].cpu(), sampling))
                drafts.append(int(torch.multinomial(probs[-1], 1, generator=generator)))
            if i + 1 < count:  # chain: the MTP hidden stands in for the main model's next hidden
                logits, mtp_hidden = self._mtp(session, mtp_hidden[:, -1:], drafts[-1:], position + i)
        return drafts, (torch.stack(probs) if probs else None)

    def _steps(self, session, prefill_logits, sampling, generator) -> Iterator[list[int]]:
        prompt = session.token_ids
        hidden = session.last_hidden  # [1, n, D]: the positions this prefill ran (a reused prefix is not in it)
        first = session.position - hidden.shape[1]
        if hidden.shape[1] > 1:  # MTP rows for the prefilled positions but the last: prefill work, not a step
            self._mtp(session, hidden[:, :-1], prompt[first + 1 :], first, logits_rows=0)
        self.counter.discard()
        token = sample(prefill_logits, sampling, generator)
        yield [token]
        hidden, next_ids, start = hidden[:, -1:], [token], len(prompt) - 1
        while True:
            position = session.position  # of the pending token
            count = max(0, min(self.draft_tokens, session.capacity - position - 1))
            drafts, draft_probs = [], None
            if count:
                drafts, draft_probs = self._draft(session, hidden, next_ids, start, count, sampling, generator)
            logits = session.forward([token] + drafts)  # [count+1, V]
            if sampling.greedy:
                accepted, token = accept_greedy(logits.argmax(dim=-1).tolist(), drafts)
            else:
                target_probs = token_probabilities(logits.cpu(), sampling)  # [count+1, V]
                accepted, token = accept_sampled(target_probs, drafts, draft_probs, generator)
            session.rollback(len(drafts) - accepted)
            emitted = drafts[:accepted] + [token]
            self.stats.steps += 1
            self.stats.drafted += len(drafts)
            self.stats.accepted += accepted
            self.stats.emitted += len(emitted)
            self.counter.end_step()
            yield emitted
            hidden, next_ids, start = session.last_hidden[:, : accepted + 1], emitted, position

    def report(self) -> dict:
        s = self.stats
        experts = self.counter.per_step()
        return {
            "draft_tokens": self.draft_tokens,
            "acceptance": s.accepted / s.drafted if s.drafted else None,
            "tokens_per_step": s.emitted / s.steps if s.steps else None,
            "experts_read_per_step": sum(experts) / len(experts) if experts else None,
            "experts_read_per_token": sum(experts) / s.emitted if s.emitted else None,
            **totals(s.steps, s.drafted, s.accepted, s.emitted, sum(experts)),
        }


class PlainSteps:
    """Plain one-token decoding that also counts the routed experts read per step (for comparisons)."""

    def __init__(self, model: Transformer):
        self.counter = ExpertReadCounter(model)
        self.steps = 0

    def __call__(self, session, prefill_logits, sampling: SamplingSettings, generator) -> Iterator[list[int]]:
        self.counter.attach()
        try:
            token = sample(prefill_logits, sampling, generator)
            while True:
                yield [token]
                logits = session.decode(token)
                self.steps += 1
                self.counter.end_step()
                token = sample(logits, sampling, generator)
        finally:
            self.counter.detach()

    def report(self) -> dict:
        experts = self.counter.per_step()
        mean = sum(experts) / len(experts) if experts else None
        return {
            "tokens_per_step": 1.0,
            "experts_read_per_step": mean,
            "experts_read_per_token": mean,
            **totals(self.steps, 0, 0, self.steps, sum(experts)),
        }


def totals(steps: int, drafted: int, accepted: int, emitted: int, experts_read: int) -> dict:
    """The raw counts behind a report, for summing over several generations."""
    return {"steps": steps, "drafted": drafted, "accepted": accepted, "emitted": emitted, "experts_read": experts_read}
