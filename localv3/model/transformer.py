"""The DeepSeek-V3 decoder: embeddings, decoder blocks, final norm, lm_head, and the MTP module.

Module names mirror the Hugging Face checkpoint names (`model.layers.{i}.self_attn.q_a_proj`, ...)
so that the loader maps tensors one to one; only the routed experts are stacked per layer.
Nothing here names a device: where a layout splits the model across devices, offload moves the
activations at the boundaries (localv3.offload.device_hops).
"""

from __future__ import annotations

import torch
from torch import nn

from localv3.config import ModelConfig
from localv3.model.attention import MLA
from localv3.model.cache import LatentCache
from localv3.model.moe import MoE, FeedForward
from localv3.model.norm import RMSNorm
from localv3.model.rope import RotaryEmbedding


class DecoderBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.self_attn = MLA(config)
        self.mlp = MoE(config) if config.is_moe_layer(layer_index) else FeedForward(
            config.hidden_size, config.intermediate_size
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, start, rope, cache: LatentCache, cache_layer: int) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), start, rope, cache, cache_layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class MTPHead(nn.Module):
    """Multi-Token Prediction module: predicts token t+2 from h_t and the embedding of t+1.

    h' = eh_proj(cat[enorm(embed(t+1)), hnorm(h_t)]) -> decoder block -> shared_head.norm -> head.
    h_t is the main model's hidden state after its final norm (as DeepSeek-V3 wires it).
    """

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = DecoderBlock(config, layer_index)
        self.shared_head_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, next_embeds, start, rope, cache, cache_layer) -> torch.Tensor:
        """hidden, next_embeds: [B, S, D] -> the MTP hidden state [B, S, D] after shared_head.norm."""
        h = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(hidden)], dim=-1))
        h = self.block(h, start, rope, cache, cache_layer)
        return self.shared_head_norm(h)


class TokenEmbedding(nn.Embedding):
    """The embedding table, which may be held narrower than the model computes (a checkpoint's
    bf16 table with float32 arithmetic on the CPU: half the memory, the same values): the rows
    looked up are widened to `compute_dtype` (None: the table's own dtype)."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__(vocab_size, hidden_size)
        self.compute_dtype: torch.dtype | None = None

    @property
    def output_dtype(self) -> torch.dtype:
        return self.compute_dtype or self.weight.dtype

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(token_ids).to(self.output_dtype)  # [B, S, D]


class DecoderStack(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = TokenEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, with_mtp: bool = True):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        n_mtp = config.num_nextn_predict_layers if with_mtp else 0
        self.mtp = nn.ModuleList(MTPHead(config, config.num_hidden_layers + j) for j in range(n_mtp))

    def absorb_kv_b(self) -> None:
        """Split every MLA's kv_b_proj into its absorbed W_UK/W_UV buffers, the MTP heads'
        included: once, after the weights are loaded (see MLA.absorb_kv_b)."""
        for attention in [m for m in self.modules() if isinstance(m, MLA)]:
            attention.absorb_kv_b()

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the hidden states (and of the cache rows by default)."""
        return self.model.embed_tokens.output_dtype

    @property
    def num_cache_layers(self) -> int:
        return self.config.num_hidden_layers + len(self.mtp)

    def new_cache(
        self,
        max_tokens: int,
        batch_size: int = 1,
        dtype: torch.dtype | None = None,
        layer_devices: list[torch.device] | None = None,
    ) -> LatentCache:
        """A cache for the main layers and the MTP layers, each layer's rows on the device the
        caller names for it (default: all on the CPU)."""
        dtype = dtype or self.compute_dtype
        return LatentCache(
            self.config, max_tokens, self.num_cache_layers, batch_size, dtype, layer_devices=layer_devices
        )

    def rope(self, start: int, length: int, device: torch.device, dtype: torch.dtype):
        positions = torch.arange(start, start + length, device=device)
        return self.rotary(positions, dtype)

    def hidden_states(self, tokens: torch.Tensor, start: int, cache: LatentCache) -> torch.Tensor:
        """tokens [B, S] at positions start.. -> final-normed hidden states [B, S, D]."""
        h = self.model.embed_tokens(tokens)  # [B, S, D]
        rope = self.rope(start, tokens.shape[1], h.device, h.dtype)
        for i, block in enumerate(self.model.layers):
            h = block(h, start, rope, cache, i)
        return self.model.norm(h)

    def logits(self, hidden: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """hidden [B, S, D] -> fp32 logits [B, rows, V] of the last `rows` positions (None: all S).

        Prefill and drafting need only the last row: for DeepSeek-V3 (vocab 129,280) full logits
        of an 8k-token prompt would be 4.2 GB of fp32.
        """
        if rows is not None:
            hidden = hidden[:, hidden.shape[1] - rows :]
        return self.lm_head(hidden).float()

    def forward(
        self, tokens: torch.Tensor, start: int, cache: LatentCache, logits_rows: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits [B, logits_rows or S, V] fp32 of the last positions, hidden [B, S, D])."""
        hidden = self.hidden_states(tokens, start, cache)
        return self.logits(hidden, logits_rows), hidden

    def mtp_forward(
        self,
        hidden: torch.Tensor,
        next_tokens: torch.Tensor,
        start: int,
        cache: LatentCache,
        depth: int = 0,
        logits_rows: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module `depth` on hidden [B, S, D] (positions start..) and the tokens one ahead [B, S].

        -> (logits [B, logits_rows or S, V] for the token two ahead, MTP hidden [B, S, D]).
        """
        embeds = self.model.embed_tokens(next_tokens)  # [B, S, D]
        rope = self.rope(start, next_tokens.shape[1], hidden.device, hidden.dtype)
        h = self.mtp[depth](hidden, embeds, start, rope, cache, self.config.num_hidden_layers + depth)
        return self.logits(h, logits_rows), h
