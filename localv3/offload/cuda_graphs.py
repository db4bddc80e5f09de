"""Runs a DecodeProgram (localv3.offload.decode_segments): every segment eagerly, or with each
CUDA segment captured once per capacity bucket (`keys`) in a torch.cuda.CUDAGraph and replayed.

Capture: the first step in a bucket runs the whole program eagerly on a side stream (the
warm-up, which also computes that step: segments are idempotent over their static buffers),
then each CUDA segment is captured in order into one memory pool, which every bucket and every
session of an engine shares (`GraphPool`). Only static buffers cross segments, so a graph's own
intermediates may share pool memory with any other graph's: graphs never run concurrently (one
stream, one engine thread). Host segments and host calls are
never captured. Between them: a host call waits for the event recorded after the segment it
reads (so the next segment, the shared expert, runs on the GPU meanwhile); a host segment
waits for everything queued before it.
"""

from __future__ import annotations

import torch

from localv3.offload.decode_segments import DecodeProgram, HostCall, Segment


class GraphPool:
    """One CUDA graph memory pool, made when the first graph is captured."""

    def __init__(self):
        self._handle = None

    def handle(self):
        if self._handle is None:
            self._handle = torch.cuda.graph_pool_handle()
        return self._handle


class SegmentPlayer:
    def __init__(self, program: DecodeProgram, capture: bool, pool: GraphPool):
        self.items = program.items
        cuda = [item for item in self.items if isinstance(item, Segment) and item.device.type == "cuda"]
        self.capture = capture and bool(cuda)
        self.events = {id(segment): torch.cuda.Event() for segment in cuda}
        self.graphs: dict[int, dict[int, torch.cuda.CUDAGraph]] = {}  # keys -> segment id -> graph
        self.pool = pool

    @property
    def buckets(self) -> list[int]:
        """The capacity buckets captured so far."""
        return sorted(self.graphs)

    def run(self, keys: int) -> None:
        """One step over the first `keys` cache rows."""
        if not self.capture:
            self._play(keys, {})
        elif keys in self.graphs:
            self._play(keys, self.graphs[keys])
        else:
            self._warm_up_and_capture(keys)

    def _play(self, keys: int, graphs: dict[int, torch.cuda.CUDAGraph]) -> None:
        last_cuda = None
        for item in self.items:
            if isinstance(item, HostCall):
                if id(item.after) in self.events:
                    self.events[id(item.after)].synchronize()
                item.run()
            elif item.device.type == "cuda":
                graph = graphs.get(id(item))
                graph.replay() if graph is not None else item.run(keys)
                last_cuda = self.events[id(item)]
                last_cuda.record()
            else:
                if last_cuda is not None:
                    last_cuda.synchronize()
                item.run(keys)

    def _warm_up_and_capture(self, keys: int) -> None:
        main = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self._play(keys, {})
        main.wait_stream(side)
        graphs = {}
        for item in self.items:
            if isinstance(item, Segment) and item.device.type == "cuda":
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool.handle()):
                    item.run(keys)
                graphs[id(item)] = graph
        self.graphs[keys] = graphs
