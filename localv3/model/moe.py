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
        logits = F.linear(x.float(), self.weight)  # [T, E]; the weight is fp32
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)  # [T, E]
        indices = self._choice(scores).topk(self.top_k, dim=-1, sorted=False).indices  # [T, k]
        weights = scores.gather(1, indices)  # [T, k]
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return indices, weights * self.routed_scaling_factor

    def _choice(self, scores: torch.Tensor) -> torch.Tensor:
        """The scores [T, E] the top-k picks from: biased for noaux_tc, and with the experts
        outside the topk_group best groups masked where groups limit the choice (a group scores
        the sum of its top-2 for noaux_tc, its best for group_limited_greedy). Nothing is masked
        where every group is kept (one group, as Kimi-K2)."""
        if self.topk_method == "noaux_tc":
            scores = scores + self.e_score_correction_bias
        elif self.topk_method != "group_limited_greedy":
            return scores
        if self.topk_group >= self.n_group:
            return scores
        grouped = scores.view(-1, self.n_group, self.n_experts // self.n_group)  # [T, G, E/G]
        if self.topk_method == "noaux_tc":
            group_scores, fill = grouped.topk(2, dim=-1).values.sum(dim=-1), float("-inf")  # [T, G]
        else:
            group_scores, fill = grouped.amax(dim=-1), 0.0  # [T, G]
        best = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, best, False)  # [T, G]
        return grouped.masked_fill(dropped.unsqueeze(-1), fill).view_as(scores)


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

    def gathered(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`forward` for one token without a host sync (so it can be captured in a CUDA graph):
        x [1, D], indices/weights [1, k] -> [1, D]. The k chosen experts' matrices are gathered,
        a copy of each per call: cheap at batch 1 beside a host sync, not for prefill."""
        chosen = indices[0]  # [k]
        rows = x.expand(chosen.shape[0], -1).unsqueeze(2)  # [k, D, 1]
        gate, up = torch.bmm(self.gate_up[chosen], rows).chunk(2, dim=1)  # [k, I, 1] each
        outputs = torch.bmm(self.down[chosen], F.silu(gate) * up).squeeze(2)  # [k, D]
        return weights.to(x.dtype) @ outputs  # [1, D]


def run_experts(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, expert_forward) -> torch.Tensor:
    """Group tokens by expert, run each chosen expert once on its tokens, sum weighted outputs.

    x: [T, D]; indices, weights: [T, k]; expert_forward(e, x_e [N, D]) -> [N, D]. Outputs are
    added in ascending expert order. The per-expert counts are the one host sync: Python must
    know which experts to call.
    """
    out = torch.zeros_like(x)
    flat = indices.flatten()  # [T*k]
    order = flat.argsort(stable=True)  # [T*k], slots grouped by expert
    counts = torch.bincount(flat).tolist()
    chosen = [expert for expert, count in enumerate(counts) if count]
    sizes = [counts[expert] for expert in chosen]
    token_of = (order // indices.shape[1]).split(sizes)  # per chosen expert: its tokens [N]
    weight_of = weights.flatten()[order].to(x.dtype).unsqueeze(1).split(sizes)  # per chosen expert: [N, 1]
    for expert, rows, weight in zip(chosen, token_of, weight_of):
        out.index_add_(0, rows, expert_forward(expert, x[rows]) * weight)
    return out


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = DenseExpertBank(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            FeedForward(config.hidden_size, config.shared_intermediate_size) if config.n_shared_experts else None
        )
        self.routing_observers: list = []  # callables(indices [T, k]): routing statistics, expert reads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, D]
        indices, weights = self.gate(flat)
        for observe in self.routing_observers:
            observe(indices)
        routed = self.experts(flat, indices, weights)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(flat)
        return routed.view(shape)
