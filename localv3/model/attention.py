"""Multi-head Latent Attention (MLA) with a naive and an absorbed path over one latent cache.

Naive: expand every cached latent through kv_b_proj into per-head keys and values.
Absorbed: fold W_UK into the query and W_UV into the output, so attention runs directly
on the cached latents (the path DeepSeek uses for decoding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from localv3.config import ModelConfig
from localv3.model.cache import LatentCache
from localv3.model.norm import RMSNorm
from localv3.model.rope import apply_rope


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        c = config
        self.layer_index = layer_index
        self.n_heads = c.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank = c.kv_lora_rank
        self.softmax_scale = c.softmax_scale
        self.rope_interleaved = c.rope_interleave or c.model_type == "deepseek_v2"
        self.absorb = True
        qk_dim = c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, self.n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + self.rope_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, c.hidden_size, bias=c.attention_bias)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def _kv_b_weight(self) -> torch.Tensor:
        """kv_b_proj as [H, nope + v, kv_lora_rank] (dequantised if the module is quantised)."""
        weight = getattr(self.kv_b_proj, "dense_weight", None)
        weight = weight() if callable(weight) else self.kv_b_proj.weight
        return weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)

    def forward(
        self,
        x: torch.Tensor,  # [B, S, D]
        start: int,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LatentCache,
        cache_layer: int,
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q = self._query(x).view(bsz, seq, self.n_heads, self.nope_dim + self.rope_dim)  # [B, S, H, nope+rope]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        cos, sin = rope
        q_rope = apply_rope(q_rope, cos, sin, self.rope_interleaved)  # [B, S, H, rope]

        kv = self.kv_a_proj_with_mqa(x)  # [B, S, kv_lora + rope]
        latent, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B, S, C]
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin, self.rope_interleaved).squeeze(2)  # [B, S, rope]
        latents, rope_keys = cache.write(cache_layer, start, latent, k_rope)  # [B, T, C], [B, T, rope]
        mask = _causal_mask(seq, latents.shape[1], start, x.device)  # [S, T]

        wkv_b = self._kv_b_weight().to(x.dtype)  # [H, nope+v, C]
        w_uk, w_uv = wkv_b[:, : self.nope_dim], wkv_b[:, self.nope_dim :]  # [H, nope, C], [H, v, C]
        if self.absorb:
            q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # [B, S, H, C]
            scores = torch.einsum("bshc,btc->bsht", q_latent, latents) + torch.einsum(
                "bshr,btr->bsht", q_rope, rope_keys
            )  # [B, S, H, T]
            probs = _softmax(scores * self.softmax_scale, mask[None, :, None, :], x.dtype)
            context_latent = torch.einsum("bsht,btc->bshc", probs, latents)  # [B, S, H, C]
            out = torch.einsum("bshc,hvc->bshv", context_latent, w_uv)  # [B, S, H, v]
        else:
            k_nope = torch.einsum("btc,hdc->bthd", latents, w_uk)  # [B, T, H, nope]
            values = torch.einsum("btc,hvc->bthv", latents, w_uv)  # [B, T, H, v]
            scores = torch.einsum("bshd,bthd->bsht", q_nope, k_nope) + torch.einsum(
                "bshr,btr->bsht", q_rope, rope_keys
            )
            probs = _softmax(scores * self.softmax_scale, mask[None, :, None, :], x.dtype)
            out = torch.einsum("bsht,bthv->bshv", probs, values)  # [B, S, H, v]
        return self.o_proj(out.reshape(bsz, seq, self.n_heads * self.v_dim))


def _causal_mask(seq: int, total: int, start: int, device: torch.device) -> torch.Tensor:
    """Boolean [S, T]: query at position start+i may see keys 0..start+i."""
    query_pos = torch.arange(start, start + seq, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    return key_pos <= query_pos


def _softmax(scores: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    scores = scores.float().masked_fill(~mask, float("-inf"))
    return F.softmax(scores, dim=-1).to(dtype)
