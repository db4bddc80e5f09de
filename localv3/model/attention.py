"""Multi-head Latent Attention (MLA) with a naive and an absorbed path over one latent cache.

kv_b_proj maps a cached latent (kv_lora_rank = C) to every head's key (nope part) and value;
`absorb_kv_b` splits its weight once, after loading, into W_UK and W_UV. Naive: expand every
cached latent into per-head keys and values. Absorbed: fold W_UK into the query and W_UV into
the output, so attention runs directly on the cached latents (the path DeepSeek uses for decoding).

Each call takes the path with fewer multiply-adds (localv3.model.mla_cost): absorbed for a
decode step or a short draft over a long cache, naive for a prompt chunk, whose keys number
about as many as its queries. For DeepSeek-V3 and a 256-token prompt the naive path costs half
the absorbed one (its scores are 192 values deep, not 576, and no context passes through W_UV
per query).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from localv3.config import ModelConfig
from localv3.model.cache import LatentCache
from localv3.model.mla_cost import MLAWidths
from localv3.model.norm import RMSNorm
from localv3.model.rope import apply_rope, rope_interleaved


class MLA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads = c.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank = c.kv_lora_rank
        self.widths = MLAWidths(self.n_heads, c.kv_lora_rank, self.nope_dim, self.rope_dim, self.v_dim)
        self.softmax_scale = c.softmax_scale
        self.rope_interleaved = rope_interleaved(c)
        self.path = "auto"  # "absorbed", "naive" or "auto": the cheaper one for each call
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

    def absorb_kv_b(self) -> None:
        """Split kv_b_proj's weight [H * (nope + v), C] once into two per-head projections and
        drop kv_b_proj, so that no forward re-derives them: `uk` (W_UK, [H, C, nope]: a head's
        query nope part -> its latent query) and `uv` (W_UV, [H, v, C]: a head's latent context ->
        its value output), each a HeadProjection the runtime may swap for a quantised one.
        They keep kv_b_proj's dtype (the compute dtype): fp32 models must match transformers.
        """
        weight = self.kv_b_proj.weight.detach().view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = weight.split([self.nope_dim, self.v_dim], dim=1)  # [H, nope, C], [H, v, C]
        self.uk = HeadProjection(w_uk.transpose(1, 2))  # [H, C, nope]
        self.uv = HeadProjection(w_uv)  # [H, v, C]
        del self.kv_b_proj

    def _up_projections(self) -> tuple[nn.Module, nn.Module]:
        """(W_UK, W_UV) as per-head projections: the absorbed ones; before `absorb_kv_b` (a model
        being trained, scripts/train_tiny.py) views of kv_b_proj.weight, so gradients reach it."""
        if not hasattr(self, "kv_b_proj"):
            return self.uk, self.uv
        weight = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return HeadProjection(weight[:, : self.nope_dim].transpose(1, 2)), HeadProjection(weight[:, self.nope_dim :])

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(
        self,
        x: torch.Tensor,  # [B, S, D]
        start: int,
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin [S, 1, rope]
        cache: LatentCache,
        cache_layer: int,
    ) -> torch.Tensor:
        seq = x.shape[1]
        q_nope, q_rope, latent, k_rope = self._project(x, rope)
        latents, rope_keys = cache.write(cache_layer, start, latent, k_rope)  # [B, T, C], [B, T, rope]
        total = latents.shape[1]
        mask = _future_mask(seq, total, start, x.device)  # [S, T] or None
        path = self.widths.cheaper_path(seq, total) if self.path == "auto" else self.path
        attend = self._absorbed if path == "absorbed" else self._naive
        return self.o_proj(attend(q_nope, q_rope, latents, rope_keys, mask))

    def decode_at(
        self,
        x: torch.Tensor,  # [B, 1, D]
        position: torch.Tensor,  # [1] int64, on x's device
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin [1, 1, rope] of that position
        cache: LatentCache,
        cache_layer: int,
        keys: int,
    ) -> torch.Tensor:
        """One decode step whose shapes and addresses do not depend on the position: the new
        row is written at `position` (a tensor), and the absorbed attention runs over the
        cache's first `keys` rows with those after `position` masked. Equals `forward` at
        start=position, S=1 (tests/test_static_decode.py) -> [B, 1, D]."""
        q_nope, q_rope, latent, k_rope = self._project(x, rope)
        latents, rope_keys = cache.write_at(cache_layer, position, latent, k_rope, keys)  # [B, keys, *]
        mask = keys_after(position, keys)  # [1, keys]
        return self.o_proj(self._absorbed(q_nope, q_rope, latents, rope_keys, mask))

    def _project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """x [B, S, D] -> (q_nope [B, S, H, nope], roped q_rope [B, S, H, rope], normed latent
        [B, S, C], roped shared key [B, S, rope]): everything before the cache."""
        bsz, seq, _ = x.shape
        cos, sin = rope
        q = self._query(x).view(bsz, seq, self.n_heads, self.nope_dim + self.rope_dim)  # [B, S, H, nope+rope]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin, self.rope_interleaved)  # [B, S, H, rope]
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin, self.rope_interleaved).squeeze(2)  # [B, S, rope]
        return q_nope, q_rope, self.kv_a_layernorm(latent), k_rope

    def _absorbed(self, q_nope, q_rope, latents, rope_keys, mask) -> torch.Tensor:
        """Attention over the latents themselves: q_nope through W_UK, the context through W_UV.

        q_nope [B, S, H, nope], q_rope [B, S, H, rope], latents [B, T, C], rope_keys [B, T, rope]
        -> [B, S, H * v]. Heads stay ahead of positions ([B, H*S, *]), so at B = 1 every reshape
        is a view.
        """
        bsz, seq, heads, _ = q_nope.shape
        rank = self.kv_lora_rank
        uk, uv = self._up_projections()
        q_nope = q_nope.permute(2, 0, 1, 3).reshape(heads, bsz * seq, self.nope_dim)  # [H, B*S, nope]
        q_latent = uk(q_nope).view(heads, bsz, seq, rank)  # [H, B, S, C]
        q_latent = q_latent.transpose(0, 1).reshape(bsz, heads * seq, rank)  # [B, H*S, C]
        q_rope = q_rope.transpose(1, 2).reshape(bsz, heads * seq, self.rope_dim)  # [B, H*S, rope]
        rope_scores = torch.bmm(q_rope, rope_keys.transpose(1, 2))  # [B, H*S, T]
        scale = self.softmax_scale
        scores = torch.baddbmm(rope_scores, q_latent, latents.transpose(1, 2), beta=scale, alpha=scale)  # [B, H*S, T]
        probs = _attention_probs(scores.view(bsz, heads, seq, -1), mask)  # [B, H, S, T]
        context = torch.bmm(probs.view(bsz, heads * seq, -1), latents)  # [B, H*S, C]
        context = context.view(bsz, heads, seq, rank).transpose(0, 1).reshape(heads, bsz * seq, rank)  # [H, B*S, C]
        out = uv(context).view(heads, bsz, seq, self.v_dim)  # [H, B, S, v]
        return out.permute(1, 2, 0, 3).reshape(bsz, seq, heads * self.v_dim)  # [B, S, H*v]

    def _naive(self, q_nope, q_rope, latents, rope_keys, mask) -> torch.Tensor:
        """Attention over per-head keys and values expanded from every cached latent (shapes as
        `_absorbed`): two products over all cached positions, then one fused attention call,
        which never holds the [H, S, T] scores of a long prompt at once."""
        bsz, seq, heads, _ = q_nope.shape
        total = latents.shape[1]
        uk, uv = self._up_projections()
        flat = latents.reshape(bsz * total, self.kv_lora_rank)  # [B*T, C]
        k_nope = F.linear(flat, uk.transposed_rows(flat.dtype)).view(bsz, total, heads, self.nope_dim)  # [B, T, H, nope]
        values = uv.every_head(flat).view(bsz, total, heads, self.v_dim).transpose(1, 2)  # [B, H, T, v]
        k_rope = rope_keys.unsqueeze(2).expand(bsz, total, heads, self.rope_dim)  # [B, T, H, rope]
        keys = torch.cat([k_nope, k_rope], dim=-1).transpose(1, 2)  # [B, H, T, nope+rope]
        queries = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # [B, H, S, nope+rope]
        allowed = None if mask is None else ~mask  # [S, T]: true where a query may see a key
        # values padded with zero columns to the keys' depth: the fused kernels want one head
        # size (the math fallback holds every score, and took twice the time at 256 tokens)
        padded = F.pad(values, (0, keys.shape[-1] - self.v_dim))  # [B, H, T, nope+rope]
        out = F.scaled_dot_product_attention(queries, keys, padded, attn_mask=allowed, scale=self.softmax_scale)
        return out[..., : self.v_dim].transpose(1, 2).reshape(bsz, seq, heads * self.v_dim)  # [B, S, H*v]


class HeadProjection(nn.Module):
    """One linear map per head: x [H, N, in] -> [H, N, out], given weight [H, out, in] (the
    nn.Linear convention), held as `right` [H, in, out] contiguous: bmm's right operand."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("right", weight.transpose(1, 2).contiguous())

    @property
    def shape(self) -> tuple[int, int, int]:
        """(heads, out, in)."""
        heads, in_features, out_features = self.right.shape
        return heads, out_features, in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, self.right)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """[H, out, in] in `dtype`."""
        return self.right.transpose(1, 2).to(dtype)

    def every_head(self, x: torch.Tensor) -> torch.Tensor:
        """Every head's map of the same inputs: x [N, in] -> [N, H * out]."""
        return F.linear(x, self.dense_weight(x.dtype).reshape(-1, x.shape[-1]))

    def transposed_rows(self, dtype: torch.dtype) -> torch.Tensor:
        """The heads' transposed maps stacked as rows: [H * in, out] (row h*in + i is weight[h, :, i])."""
        return self.right.reshape(-1, self.right.shape[-1]).to(dtype)


def _future_mask(seq: int, total: int, start: int, device: torch.device) -> torch.Tensor | None:
    """Boolean [S, T], true where key j lies after query i (position start+i); None for one
    query at the end of the cache (a decode step), which sees every key."""
    if seq == 1:
        return None
    query_pos = torch.arange(start, start + seq, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    return key_pos > query_pos


def keys_after(position: torch.Tensor, keys: int) -> torch.Tensor:
    """Boolean [1, keys], true where a key lies after the query at `position` ([1] int64), built
    on the position's device without reading it on the host."""
    return (torch.arange(keys, device=position.device) > position)[None, :]


def _attention_probs(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over keys in fp32 (as transformers), back in the scores' dtype: [B, H, S, T]."""
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return F.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
