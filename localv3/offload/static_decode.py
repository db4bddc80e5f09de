"""A session's static-shape decode step: the token and position go into device tensors, the step's
segments run (captured in CUDA graphs where asked and the device is CUDA), and attention reads a
capacity bucket of the cache: the smallest power of two >= the tokens it holds (at least
`min_keys`, at most the cache's capacity), so a step at position 10 of a 4k context reads
`min_keys` rows, not 4k, at the price of one set of graphs per bucket.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from localv3.errors import ContextFullError
from localv3.model.cache import LatentCache
from localv3.model.transformer import Transformer
from localv3.offload.cuda_graphs import GraphPool, SegmentPlayer
from localv3.offload.decode_segments import StepPlacement, build_program, notify_routing
from localv3.offload.layout import CPU, DISK, GPU, Layout

MIN_KEYS = 256  # the smallest bucket: fewer rows than this cost less than another set of graphs


def capacity_bucket(tokens: int, capacity: int, min_keys: int) -> int:
    """The cache rows a step reads when `tokens` are in the cache (the new one included)."""
    bucket = max(min_keys, 1 << max(tokens - 1, 0).bit_length())
    return min(bucket, capacity)


@dataclass(frozen=True)
class StaticDecoding:
    """How a session decodes statically: the model, the plan's split and whether to capture."""

    model: Transformer
    placement: StepPlacement
    capture: bool
    min_keys: int = MIN_KEYS
    pool: GraphPool = field(default_factory=GraphPool)  # shared by every session's graphs

    @classmethod
    def planned(cls, model: Transformer, layout: Layout, gpu: torch.device) -> StaticDecoding:
        """For a model built from `layout` with its GPU part on `gpu`: captured there when it is
        CUDA, else the same segments run eagerly."""
        main_layers = range(len(model.model.layers))
        placement = StepPlacement(
            gpu_layers=frozenset(i for i in main_layers if layout.layer_devices[i] == GPU),
            host_experts={i: frozenset(layout.experts_on(i, CPU) + layout.experts_on(i, DISK)) for i in main_layers},
        )
        return cls(model, placement, capture=gpu.type == "cuda")

    def describe(self) -> str:
        return "decode in CUDA graphs" if self.capture else "static decode, not captured"

    def __call__(self, cache: LatentCache) -> StaticDecoder:
        return StaticDecoder(self, cache)


class StaticDecoder:
    def __init__(self, decoding: StaticDecoding, cache: LatentCache):
        self.cache = cache
        self.min_keys = decoding.min_keys
        self.program = build_program(decoding.model, cache, decoding.placement)
        self.player = SegmentPlayer(self.program, decoding.capture, decoding.pool)

    def step(self, token_id: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The token at `position` -> (logits [1, V] fp32, final-normed hidden [1, 1, D]), copies
        (the buffers are overwritten by the next step)."""
        capacity = self.cache.max_tokens
        if position >= capacity:
            raise ContextFullError(f"the context is full ({capacity} tokens)")
        program = self.program
        program.token.fill_(token_id)
        for tensor in program.positions.values():
            tensor.fill_(position)
        self.player.run(capacity_bucket(position + 1, capacity, self.min_keys))
        notify_routing(program)
        return program.logits[0].clone(), program.hidden.clone()
