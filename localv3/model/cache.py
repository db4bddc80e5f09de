"""The compressed latent KV cache of MLA, preallocated per sequence.

Per token and layer it holds the kv_lora_rank latent (after kv_a_layernorm) and the roped
shared key (qk_rope_head_dim): (512 + 64) values for DeepSeek-V3. The cache keeps no length:
each forward says where it writes and reads the rows before it, so rolling back rejected
speculative tokens is the session's position moving back; later writes overwrite the stale rows.
"""

from __future__ import annotations

import torch

from localv3.config import ModelConfig
from localv3.errors import ContextFullError


class LatentCache:
    def __init__(
        self,
        config: ModelConfig,
        max_tokens: int,
        num_layers: int,
        batch_size: int = 1,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        layer_devices: list[torch.device] | None = None,
    ):
        self.max_tokens = max_tokens
        devices = layer_devices or [torch.device(device)] * num_layers
        self.latent = [  # per layer: [B, T, kv_lora_rank]
            torch.zeros(batch_size, max_tokens, config.kv_lora_rank, dtype=dtype, device=d) for d in devices
        ]
        self.rope_key = [  # per layer: [B, T, qk_rope_head_dim]
            torch.zeros(batch_size, max_tokens, config.qk_rope_head_dim, dtype=dtype, device=d) for d in devices
        ]

    @property
    def bytes_per_token(self) -> int:
        return sum(t.shape[-1] * t.element_size() for t in self.latent + self.rope_key)

    def write(self, layer: int, start: int, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store [B, S, *] rows at positions start..start+S-1; return the views [B, start+S, *]."""
        end = start + latent.shape[1]
        if end > self.max_tokens:
            raise ContextFullError(f"the context is full ({self.max_tokens} tokens)")
        rows = latent.shape[1]
        self.latent[layer].narrow(1, start, rows).copy_(latent)
        self.rope_key[layer].narrow(1, start, rows).copy_(rope_key)
        return self.latent[layer].narrow(1, 0, end), self.rope_key[layer].narrow(1, 0, end)

    def write_at(
        self, layer: int, position: torch.Tensor, latent: torch.Tensor, rope_key: torch.Tensor, keys: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one row [B, 1, *] at `position` ([1] int64 on the layer's device: never read on
        the host, so the call has the same shapes and addresses at every position); return the
        views of the first `keys` rows [B, keys, *]. The caller keeps position < keys <= max_tokens."""
        self.latent[layer].index_copy_(1, position, latent)
        self.rope_key[layer].index_copy_(1, position, rope_key)
        return self.latent[layer].narrow(1, 0, keys), self.rope_key[layer].narrow(1, 0, keys)

