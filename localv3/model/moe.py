"""DeepSeekMoE: the router, the expert-bank interface, and the MoE layer.

The MoE layer calls its routed experts through an expert bank: any module with
`forward(x [T, D], indices [T, k], weights [T, k]) -> [T, D]`. `DenseExpertBank` holds all
experts as stacked tensors on one device; offload provides CPU-quantised and mixed banks,
so placement never leaks into the model code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from localv3.config import ModelConfig


class FeedForward(nn.Module):
    """SwiGLU MLP: dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Picks num_experts_per_tok experts per token and their weights, in fp32.

    sigmoid/noaux_tc (V3): e_score_correction_bias is added for selection only; groups are
    ranked by the sum of their top-2 biased scores; the chosen experts' unbiased scores are
    normalised and scaled by routed_scaling_factor. softmax/greedy or group_limited_greedy (V2):
    groups ranked by their best expert.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or self.n_group
        self.scoring_func = config.scoring_func
        self.topk_method = config.topk_method
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(self.n_experts, config.hidden_size, dtype=torch.float32))
        if self.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, D] -> (indices [T, k] int64, weights [T, k] fp32)."""
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        if self.scoring_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        if self.topk_method == "noaux_tc":
            choice = scores + self.e_score_correction_bias
            group_scores = choice.view(-1, self.n_group, self.n_experts // self.n_group).topk(2, dim=-1)[0].sum(-1)
            choice = self._mask_to_best_groups(choice, group_scores, float("-inf"))
        elif self.topk_method == "group_limited_greedy":
            group_scores = scores.view(-1, self.n_group, self.n_experts // self.n_group).amax(dim=-1)
            choice = self._mask_to_best_groups(scores, group_scores, 0.0)
        else:
            choice = scores
        indices = choice.topk(self.top_k, dim=-1, sorted=False)[1]  # [T, k]
        weights = scores.gather(1, indices)  # [T, k]
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return indices, weights * self.routed_scaling_factor

    def _mask_to_best_groups(self, scores: torch.Tensor, group_scores: torch.Tensor, fill: float) -> torch.Tensor:
        best_groups = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)  # [T, G]
        expert_mask = group_mask.repeat_interleave(self.n_experts // self.n_group, dim=1)  # [T, E]
        return scores.masked_fill(~expert_mask, fill)


class DenseExpertBank(nn.Module):
    """All routed experts of one layer as stacked weights on one device.

    gate_up: [E, 2 * I, D] (gate rows, then up rows); down: [E, D, I].
    """

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.down = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return run_experts(x, indices, weights, self.expert_forward)

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up[expert]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down[expert])


def run_experts(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, expert_forward) -> torch.Tensor:
    """Group tokens by expert, run each chosen expert once on its tokens, sum weighted outputs.

    x: [T, D]; indices, weights: [T, k]; expert_forward(e, x_e [N, D]) -> [N, D].
    """
    out = torch.zeros_like(x)
    flat = indices.flatten()  # [T*k]
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=1).tolist()
    token_of = order // indices.shape[1]  # [T*k], token index of each sorted slot
    weight_of = weights.flatten()[order]
    offset = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = token_of[offset : offset + count]
        y = expert_forward(expert, x[rows]) * weight_of[offset : offset + count, None].to(x.dtype)
        out.index_add_(0, rows, y)
        offset += count
    return out


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = DenseExpertBank(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            FeedForward(config.hidden_size, config.shared_intermediate_size) if config.n_shared_experts else None
        )
        self.routing_observer = None  # optional callable(indices [T, k]) for routing statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, D]
        indices, weights = self.gate(flat)
        if self.routing_observer is not None:
            self.routing_observer(indices)
        routed = self.experts(flat, indices, weights)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(flat)
        return routed.view(shape)
