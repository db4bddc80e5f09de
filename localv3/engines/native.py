"""The native engine: localv3.model on torch, with the latent KV cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from localv3.config import ModelConfig
from localv3.engines.base import Engine
from localv3.errors import LocalV3Error
from localv3.generate import StepStrategy, plain_steps
from localv3.model.transformer import Transformer
from localv3.speculative import MTPSpeculation
from localv3.tokenizer import Tokenizer


PREFILL_CHUNK = 512  # tokens per prefill forward


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU; fp32 on the CPU, where torch's bf16 matrix kernels are slow beyond batch 1."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class NativeSession:
    """One sequence: a preallocated latent cache and the position reached.

    `static_decoding` (a callable: cache -> a decoder with `step(token_id, position) -> (logits
    [1, V], hidden [1, 1, D])`, localv3.offload.static_decode) makes `decode` take the
    static-shape step; prefill and multi-token forwards (MTP verification) stay dynamic.
    """

    def __init__(
        self,
        model: Transformer,
        capacity: int,
        cache_devices: list[torch.device] | None = None,
        static_decoding: Callable | None = None,
    ):
        self.model = model
        self.capacity = capacity
        self.cache = model.new_cache(capacity, layer_devices=cache_devices)
        self.position = 0
        self.token_ids: list[int] = []  # the tokens in the cache, positions 0..position-1
        self.last_hidden: torch.Tensor | None = None  # [1, S, D] hidden states of the last forward
        self.static = static_decoding(self.cache) if static_decoding is not None else None

    def _check_vocabulary(self, token_ids: list[int]) -> None:
        vocab = self.model.config.vocab_size
        outside = [t for t in token_ids if not 0 <= t < vocab]
        if outside:
            raise LocalV3Error(f"token id {outside[0]} is outside the vocabulary (0..{vocab - 1})")

    @torch.inference_mode()
    def forward(self, token_ids: list[int], logits_rows: int | None = None) -> torch.Tensor:
        """Run tokens at the current position -> logits [logits_rows or S, V] fp32 of the last
        positions; advances the position."""
        self._check_vocabulary(token_ids)
        tokens = torch.tensor([token_ids], dtype=torch.long)  # [1, S] on the host: the model moves them
        logits, self.last_hidden = self.model(tokens, self.position, self.cache, logits_rows)
        self.position += len(token_ids)
        self.token_ids.extend(token_ids)
        return logits[0]

    def prefill(self, token_ids: list[int]) -> torch.Tensor:
        """The prompt in chunks of PREFILL_CHUNK tokens (activation memory stays bounded for long
        prompts; each chunk is one batched call per expert bank) -> the last position's logits [V].
        `last_hidden` then holds every prefilled position (MTP fills its cache rows from it)."""
        hidden = []
        for first in range(0, len(token_ids), PREFILL_CHUNK):
            chunk = token_ids[first : first + PREFILL_CHUNK]
            last = first + len(chunk) == len(token_ids)
            logits = self.forward(chunk, logits_rows=1 if last else 0)
            hidden.append(self.last_hidden)
        self.last_hidden = hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=1)  # [1, S, D]
        return logits[-1]

    def decode(self, token_id: int) -> torch.Tensor:
        if self.static is None:
            return self.forward([token_id], logits_rows=1)[-1]
        return self._static_decode(token_id)

    @torch.inference_mode()
    def _static_decode(self, token_id: int) -> torch.Tensor:
        self._check_vocabulary([token_id])
        logits, self.last_hidden = self.static.step(token_id, self.position)  # [1, V], [1, 1, D]
        self.position += 1
        self.token_ids.append(token_id)
        return logits[-1]

    def rollback(self, n_tokens: int) -> None:
        """Forget the last n tokens (rejected drafts); their cache rows are overwritten later."""
        self.position -= n_tokens
        del self.token_ids[self.position :]


class NativeEngine(Engine):
    name = "native"

    def __init__(
        self,
        path: Path,
        config: ModelConfig,
        model: Transformer,
        tokenizer: Tokenizer | None,
        max_context: int,
        cache_devices: list[torch.device] | None = None,
    ):
        self.path = Path(path)
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.cache_devices = cache_devices  # each cache layer's device (None: all on the CPU)
        self.static_decoding: Callable | None = None  # sessions' static decode step (NativeSession)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.compute_dtype

    @property
    def placement(self) -> str:
        device = self.model.model.embed_tokens.weight.device
        return f"all on {device.type}, {str(self.dtype).removeprefix('torch.')}"

    @property
    def kv_bytes_per_token(self) -> int:
        """Latent cache bytes per token over the main layers, in the engine's cache dtype."""
        return self.config.kv_bytes_per_token(torch.empty((), dtype=self.dtype).element_size())

    def new_session(self, capacity: int) -> NativeSession:
        return NativeSession(self.model, capacity, self.cache_devices, self.static_decoding)

    def step_strategy(self, speculative: bool | None) -> StepStrategy:
        """MTP speculation by default when the model has an MTP layer, one draft per step.

        Measured on the bundled tiny model (benchmarks/mtp_speedup.py, CPU, 1 thread, greedy,
        outputs identical): one draft 100% accepted, 1.38-1.40x decode over all six tasks; two
        chained drafts 84% accepted, 1.35-1.37x (1.46x vs 1.42x on the long count/reverse answers).
        """
        if speculative is None:
            speculative = len(self.model.mtp) > 0
        if speculative and len(self.model.mtp):
            return MTPSpeculation(self.model, draft_tokens=1)
        return plain_steps

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """[len(token_ids), vocab_size] fp32 from one prefill."""
        positions = self.config.max_position_embeddings
        if not token_ids or len(token_ids) > positions:
            raise LocalV3Error(f"logits() takes 1 to {positions:,} tokens (the model's positions), not {len(token_ids):,}")
        return self.new_session(len(token_ids)).forward(list(token_ids)).float().cpu()
