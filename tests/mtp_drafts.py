"""What one-draft greedy MTP speculation must report, computed without it: the MTP head's
draft at every position of the finished sequence, from one fresh forward over all of it."""

from __future__ import annotations

import torch


def greedy_draft_counts(model, prompt: list[int], tokens: list[int]) -> tuple[int, int]:
    """`tokens`: the greedy continuation of `prompt` (the stop token included when one ended it).

    Each verify step starts from the last emitted token at position p and drafts token p + 1
    from the main model's hidden state at p - 1 and token p; the draft is accepted when it is
    the greedy token, and then the step emits two tokens, else one. -> (accepted, drafted).
    """
    ids = torch.tensor([prompt + tokens])  # [1, T]
    with torch.inference_mode():
        cache = model.new_cache(ids.shape[1])
        _, hidden = model(ids, 0, cache)  # hidden [1, T, D]
        logits, _ = model.mtp_forward(hidden[:, :-1], ids[:, 1:], 0, cache)  # [1, T-1, V]: row i drafts token i + 2
    drafts = logits[0].argmax(dim=-1).tolist()
    emitted, accepted, drafted = 1, 0, 0  # the prefill emits the first token
    while emitted < len(tokens):
        pending = len(prompt) + emitted - 1  # position of the last emitted token
        drafted += 1
        if drafts[pending - 1] == tokens[emitted]:
            accepted += 1
            emitted += 2
        else:
            emitted += 1
    return accepted, drafted
