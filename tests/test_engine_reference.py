"""Our logits against Hugging Face transformers (the independent reference), in fp32."""

import pytest
import torch
import transformers

import localv3
from localv3.synthetic import write_checkpoint
from fp8_twin import write_dequantized_twin
from model_configs import KIMI_K2_STYLE, V2_GROUP_LIMITED, V2_LITE, V3_FP8, V3_MTP

CONFIGS = {
    "v3_mtp": (V3_MTP, False),
    "v3_fp8": (V3_FP8, True),
    "v2_lite": (V2_LITE, False),
    "v2_group_limited": (V2_GROUP_LIMITED, False),
    "kimi_k2_style": (KIMI_K2_STYLE, False),
}
PREFILL = 16
DECODE_STEPS = 32
TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    raw, fp8 = CONFIGS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model_dir = write_checkpoint(root / "model", raw, seed=1, dtype=torch.float32, fp8=fp8)
    ours = localv3.load(model_dir, device="cpu", dtype=torch.float32)
    # transformers' FP8 loader needs accelerate and a GPU: it reads an independently dequantised twin
    reference_dir = write_dequantized_twin(model_dir, root / "twin", torch.float32) if fp8 else model_dir
    theirs = transformers.AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    return request.param, ours, theirs


def prompt(vocab: int) -> list[int]:
    return torch.randint(2, vocab, (PREFILL,), generator=torch.Generator().manual_seed(7)).tolist()


def test_prefill_logits_match_transformers(pair):
    name, ours, theirs = pair
    ids = prompt(ours.config.vocab_size)
    with torch.no_grad():
        expected = theirs(torch.tensor([ids])).logits[0].float()
    got = ours.logits(ids)
    diff = (got - expected).abs().max().item()
    print(f"{name}: prefill max |logit diff| = {diff:.2e}")
    assert got.shape == (PREFILL, ours.config.vocab_size)
    assert diff < TOLERANCE


def test_greedy_decode_through_latent_cache_matches_transformers(pair):
    name, ours, theirs = pair
    ids = prompt(ours.config.vocab_size)
    theirs.generation_config.eos_token_id = None  # decode all steps, EOS included
    with torch.no_grad():
        out = theirs.generate(
            torch.tensor([ids]),
            max_new_tokens=DECODE_STEPS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    expected_tokens = out.sequences[0, PREFILL:].tolist()
    session = ours.new_session(PREFILL + DECODE_STEPS)
    logits = session.prefill(ids)
    worst = 0.0
    tokens = []
    for step in range(DECODE_STEPS):
        worst = max(worst, (logits - out.logits[step][0]).abs().max().item())
        token = int(logits.argmax())
        tokens.append(token)
        logits = session.decode(token)
    print(f"{name}: {DECODE_STEPS} decode steps, max |logit diff| = {worst:.2e}")
    assert tokens == expected_tokens
    assert worst < TOLERANCE
