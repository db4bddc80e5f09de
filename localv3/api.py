"""`localv3.load`: the one way a model is loaded, for the Python API and the CLI alike.

A GGUF file gets the llama.cpp engine unless `engine="native"` is asked for; anything else (and
a GGUF file with `engine="native"`) is planned for this machine (or the `hardware` given) and
built by localv3.offload.runtime: the same PlannedEngine that `localv3 chat` uses, with the same
placement, quantisation and context options.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from localv3.engine_choice import ENGINE_NAMES, EngineChoiceError, default_engine, weights_path

if TYPE_CHECKING:
    from localv3.engines.base import Engine
    from localv3.offload.hardware import Hardware
    from localv3.offload.planner import Policy
    from localv3.offload.quant import Quantization


def load(
    model: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    max_context: int | None = None,
    with_mtp: bool = True,
    *,
    engine: str | None = None,
    hardware: Hardware | None = None,
    policy: Policy | None = None,
    quantization: Quantization | None = None,
    cpu_threads: int | None = None,
    record_routing: bool = False,
    cuda_graphs: bool = False,
) -> Engine:
    """model: a models.toml name, a pulled hub repo id, a model directory or a GGUF file.

    device: where the plan's GPU part goes (default: CUDA when there is one, else the CPU);
    dtype: the compute dtype (default bf16 on CUDA, fp32 on the CPU); hardware, policy and
    quantization: as `localv3 plan` takes them (default: this machine, detected; the
    checkpoint's stored quantisation); cpu_threads: default physical cores (1 for tiny models);
    cuda_graphs: decode steps in CUDA graphs (native engine; with a CPU device the same static
    step runs uncaptured).
    """
    engine = engine or default_engine(model)
    if engine not in ENGINE_NAMES:
        raise EngineChoiceError(f"unknown engine {engine!r}; choose from {', '.join(ENGINE_NAMES)}")
    path = weights_path(str(model), engine)
    if engine == "llama.cpp" and cuda_graphs:
        raise EngineChoiceError("cuda_graphs is an option of the native engine; llama.cpp runs its own CUDA graphs")
    if engine == "llama.cpp":
        try:
            from localv3.engines.llama_cpp import load_gguf
        except ImportError as exc:
            raise EngineChoiceError(f"the llama.cpp engine is not available ({exc}); install localv3[llama]") from None
        return load_gguf(path, max_context=max_context, n_threads=cpu_threads)
    from localv3.offload.runtime import load_planned  # the layer above the model: imported when used

    return load_planned(
        path,
        hardware=hardware,
        context=max_context,
        policy=policy,
        quantization=quantization,
        gpu_device=device,
        dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype,
        with_mtp=with_mtp,
        cpu_threads=cpu_threads,
        record_routing=record_routing,
        cuda_graphs=cuda_graphs,
    )
