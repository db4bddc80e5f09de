"""MTP speculative decoding: greedy output identical to plain decoding, consistent MTP cache rows,
the reported acceptance against the drafts recomputed in one pass, the trained MTP head against
noise, sampled speculation against the model's distribution, and the speculative-sampling
acceptance rule on hand cases."""

from collections import Counter
from pathlib import Path

import pytest
import torch
from chi_square import assert_follows
from mtp_drafts import greedy_draft_counts

import localv3
from localv3.generate import stream_generate
from localv3.sampling import SamplingSettings, token_probabilities
from localv3.speculative import MTPSpeculation, PlainSteps, accept_greedy, accept_sampled
from localv3.synthetic import TINY_V3, write_checkpoint

TINY_DIR = Path(localv3.__file__).parent / "assets" / "tiny"
QUESTIONS = ("Count from 41 to 49.", "Reverse the words: sun tree book red", "What is 37 + 48?", "Hello")


@pytest.fixture(scope="module", params=[0, 1])
def random_engine(request, tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp(f"v3-{request.param}"), TINY_V3, seed=request.param, dtype=torch.float32)
    return localv3.load(path, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_engine():
    return localv3.load(TINY_DIR, device="cpu", dtype=torch.float32)


def generate(engine, prompt, n, steps, seed=None, temperature=0.0, stop=(), top_k=0):
    """-> (new token ids, the session after generation, the strategy's report)."""
    session = engine.new_session(len(prompt) + n + 1)
    sampling = SamplingSettings(temperature=temperature, seed=seed, top_k=top_k)
    out = []
    for chunk in stream_generate(session, None, prompt, n, sampling, list(stop), steps=steps):
        out.extend(chunk.token_ids)
        report = chunk.stats.speculation if chunk.stats else None
    return out, session, report


def assert_mtp_rows_consistent(engine, session, draft_tokens):
    """The MTP layer's cache rows equal those of one fresh pass over the whole sequence."""
    model = engine.model
    ids = torch.tensor([session.token_ids])  # [1, T]
    valid = session.position - draft_tokens - 1  # rows before the last verify step's start
    with torch.inference_mode():
        cache = model.new_cache(ids.shape[1])
        _, hidden = model(ids, 0, cache)
        model.mtp_forward(hidden[:, :-1], ids[:, 1:], 0, cache)
    layer = model.config.num_hidden_layers
    torch.testing.assert_close(session.cache.latent[layer][:, :valid], cache.latent[layer][:, :valid], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(session.cache.rope_key[layer][:, :valid], cache.rope_key[layer][:, :valid], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("draft_tokens", [1, 2, 3])
def test_greedy_speculation_is_identical_on_random_models(random_engine, draft_tokens):
    prompt = torch.randint(2, 256, (12,), generator=torch.Generator().manual_seed(draft_tokens)).tolist()
    plain, _, _ = generate(random_engine, prompt, 40, PlainSteps(random_engine.model))
    spec, session, report = generate(random_engine, prompt, 40, MTPSpeculation(random_engine.model, draft_tokens))
    assert spec == plain
    assert report["steps"] >= 40 / (draft_tokens + 1)
    assert_mtp_rows_consistent(random_engine, session, draft_tokens)


def test_engine_speculative_flag_matches_plain(random_engine):
    prompt = [5, 17, 99, 3, 42]
    assert random_engine.generate(prompt, 30, speculative=True) == random_engine.generate(prompt, 30, speculative=False)


@pytest.mark.parametrize("draft_tokens", [1, 2])
def test_greedy_speculation_is_identical_on_the_tiny_model(tiny_engine, draft_tokens):
    tok = tiny_engine.tokenizer
    for question in QUESTIONS[:3]:
        prompt = tok.encode_chat([{"role": "user", "content": question}])
        stop = [tok.eos_token_id]
        plain, _, _ = generate(tiny_engine, prompt, 40, PlainSteps(tiny_engine.model), stop=stop)
        spec, session, report = generate(tiny_engine, prompt, 40, MTPSpeculation(tiny_engine.model, draft_tokens), stop=stop)
        assert spec == plain, question
        assert_mtp_rows_consistent(tiny_engine, session, draft_tokens)


def assert_reported_counts(engine, prompt, stop=()):
    """One-draft greedy speculation reports the drafts that one fresh pass says it made and kept."""
    out, _, report = generate(engine, prompt, 40, MTPSpeculation(engine.model, 1), stop=stop)
    tokens = out + list(stop[:1]) if len(out) < 40 else out  # the stop token ended a verify step too
    accepted, drafted = greedy_draft_counts(engine.model, prompt, tokens)
    assert (report["accepted"], report["drafted"]) == (accepted, drafted)
    assert report["acceptance"] == accepted / drafted and report["steps"] == drafted


@pytest.mark.parametrize("prompt_seed", [0, 1, 2])
def test_reported_acceptance_is_the_share_of_drafts_greedy_decoding_confirms(random_engine, prompt_seed):
    prompt = torch.randint(2, 256, (9,), generator=torch.Generator().manual_seed(prompt_seed)).tolist()
    assert_reported_counts(random_engine, prompt)


def test_reported_acceptance_on_the_tiny_model(tiny_engine):
    tok = tiny_engine.tokenizer
    for question in QUESTIONS:
        assert_reported_counts(tiny_engine, tok.encode_chat([{"role": "user", "content": question}]), [tok.eos_token_id])


def pooled_acceptance(engine) -> tuple[float, list[list[int]]]:
    """Greedy one-draft speculation over QUESTIONS: (accepted drafts / drafts, the answers)."""
    tok = engine.tokenizer
    accepted = drafted = 0
    answers = []
    for question in QUESTIONS:
        prompt = tok.encode_chat([{"role": "user", "content": question}])
        out, _, report = generate(engine, prompt, 40, MTPSpeculation(engine.model), stop=[tok.eos_token_id])
        accepted, drafted = accepted + report["accepted"], drafted + report["drafted"]
        answers.append(out)
    return accepted / drafted, answers


def test_the_trained_mtp_head_drafts_what_the_model_says(tiny_engine):
    """Measured: 31 of 31 drafts accepted over QUESTIONS."""
    tok = tiny_engine.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": "Count from 21 to 29."}])
    out, _, report = generate(tiny_engine, prompt, 40, MTPSpeculation(tiny_engine.model), stop=[tok.eos_token_id])
    assert tok.decode(out) == "21, 22, 23, 24, 25, 26, 27, 28, 29"
    assert report["experts_read_per_step"] > 0
    assert pooled_acceptance(tiny_engine)[0] >= 0.7


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_mtp_head_of_noise_drafts_badly_and_changes_no_answer(tiny_engine, seed):
    """The MTP head's input projection replaced by noise of the same spread: measured 0/61,
    0/61 and 7/55 drafts accepted (seeds 0-2); the answers stay those of the trained head."""
    noisy = localv3.load(TINY_DIR, device="cpu", dtype=torch.float32)
    projection = noisy.model.mtp[0].eh_proj.weight
    with torch.no_grad():
        projection.copy_(torch.randn(projection.shape, generator=torch.Generator().manual_seed(seed)) * projection.std())
    acceptance, answers = pooled_acceptance(noisy)
    assert acceptance <= 0.3
    assert answers == pooled_acceptance(tiny_engine)[1]  # verification throws the bad drafts away


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_speculation_is_reproducible_with_a_seed(random_engine, seed):
    prompt = [5, 17, 99, 3, 42]
    first = generate(random_engine, prompt, 30, MTPSpeculation(random_engine.model, 2), seed=seed, temperature=0.8)
    again = generate(random_engine, prompt, 30, MTPSpeculation(random_engine.model, 2), seed=seed, temperature=0.8)
    other = generate(random_engine, prompt, 30, MTPSpeculation(random_engine.model, 2), seed=seed + 10, temperature=0.8)
    assert len(first[0]) == 30 and first[0] == again[0] and first[2] == again[2]
    assert first[0] != other[0]


@pytest.mark.parametrize("question", ["Hello", "Count from 21 to 29."])
def test_sampled_speculation_draws_from_the_model_distribution(tiny_engine, question):
    """The second token of a sampled answer is the first the acceptance rule decides (draft kept
    or resampled from the residual): over 250 seeds it follows the model's own distribution,
    sum over t1 of p(t1) p(t2 | t1). Temperature 4 and top-k 3 spread the trained model's
    probabilities so that about 85% of drafts are kept (both branches of the rule run)."""
    tok = tiny_engine.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": question}])
    sampling = SamplingSettings(temperature=4.0, top_k=3)
    first = token_probabilities(tiny_engine.logits(prompt)[-1], sampling)  # [V]
    expected = sum(first[t] * token_probabilities(tiny_engine.logits(prompt + [t])[-1], sampling) for t in first.nonzero().flatten().tolist())
    counts, accepted, trials = Counter(), 0, 250
    for seed in range(trials):
        steps = MTPSpeculation(tiny_engine.model, 1)
        out, _, _ = generate(tiny_engine, prompt, 2, steps, seed=seed, temperature=4.0, top_k=3)
        counts[out[1]] += 1
        accepted += steps.stats.accepted
    assert 0 < accepted < trials
    assert_follows(counts, expected)


def test_accept_greedy_takes_the_longest_matching_prefix():
    assert accept_greedy([7, 8, 9], [7, 8]) == (2, 9)
    assert accept_greedy([7, 5, 9], [7, 8]) == (1, 5)
    assert accept_greedy([4, 8, 9], [7, 8]) == (0, 4)
    assert accept_greedy([4], []) == (0, 4)


def test_accept_sampled_hand_case():
    # p(1) / q(1) = 0.3 / 0.6: draft 1 is kept half the time; on rejection the residual
    # max(0, p - q) = [0.3, 0, 0] always gives token 0
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    q = torch.tensor([[0.2, 0.6, 0.2]])
    g = torch.Generator().manual_seed(0)
    results = [accept_sampled(p, [1], q, g) for _ in range(4000)]
    accepted = [r for r in results if r[0] == 1]
    assert abs(len(accepted) / len(results) - 0.5) < 0.04
    assert all(token == 0 for n, token in results if n == 0)
    # a draft with p >= q is always kept, then the next token comes from the next p
    assert all(accept_sampled(p, [0], q, g)[0] == 1 for _ in range(200))


def test_accept_sampled_preserves_the_target_distribution():
    """Draft d ~ q, then the rule: the first emitted token is distributed as p."""
    p = torch.tensor([[0.1, 0.6, 0.3], [1 / 3, 1 / 3, 1 / 3]])
    q = torch.tensor([[0.5, 0.2, 0.3]])
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(3)
    trials = 6000
    for _ in range(trials):
        draft = int(torch.multinomial(q[0], 1, generator=g))
        n, token = accept_sampled(p, [draft], q, g)
        counts[draft if n == 1 else token] += 1
    torch.testing.assert_close(counts / trials, p[0], atol=0.025, rtol=0)
