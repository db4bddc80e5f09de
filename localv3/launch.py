"""Beyond one box: the SGLang or vLLM command line that serves a model on N GPUs per node, M nodes.

localv3 runs one GPU plus CPU RAM; a model that outgrows one machine moves to an engine with
tensor and expert parallelism. This module turns a models.toml entry (or a checkpoint
directory) into that engine's command for the same checkpoint: tensor/expert parallel sizes
from N and M, the context, the served name and the port. The flags are the engines' own:
SGLang's `python -m sglang.launch_server` and vLLM's `vllm serve` (tests/test_launch.py
records the versions checked).

SGLang shards over every GPU of every node (`--tp-size N*M`, `--ep-size N*M`), as its DeepSeek
multi-node recipes do; vLLM keeps tensor parallelism inside a node and spans nodes with
pipeline parallelism (`--tensor-parallel-size N --pipeline-parallel-size M`), the layout its
documentation recommends, with `--enable-expert-parallel` for the experts.
"""

from __future__ import annotations

import importlib.util
import math
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from localv3.config import ModelConfig
from localv3.errors import LocalV3Error, ModelNotFoundError

ENGINES = ("sglang", "vllm")
DEFAULT_PORT = 8000  # as `localv3 serve`
SGLANG_INIT_PORT = 50000  # --dist-init-addr needs HOST:PORT; every node must name the same one
USABLE_GPU_FRACTION = 0.85  # of each GPU's memory for weights + KV cache (both engines keep ~10-20% back)


class LaunchError(LocalV3Error):
    pass


@dataclass(frozen=True)
class Topology:
    gpus: int  # per node
    nodes: int = 1
    node_rank: int = 0
    master: str | None = None  # HOST or HOST:PORT of node 0

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.nodes < 1:
            raise LaunchError("--gpus and --nodes must be at least 1")
        if not 0 <= self.node_rank < self.nodes:
            raise LaunchError(f"--node-rank {self.node_rank} is not a node of {self.nodes} (0 to {self.nodes - 1})")
        if self.nodes > 1 and not self.master:
            raise LaunchError(f"{self.nodes} nodes need --master ADDR: the address of node 0, which every node names")
        if self.master:
            self.master_host_port()  # validates

    @property
    def total_gpus(self) -> int:
        return self.gpus * self.nodes

    def master_host_port(self) -> tuple[str, int | None]:
        host, colon, port = self.master.rpartition(":") if self.master.count(":") == 1 else ("", "", "")
        if not colon:
            return self.master, None
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise LaunchError(f"--master {self.master!r}: expected HOST or HOST:PORT")
        return host, int(port)


@dataclass(frozen=True)
class LaunchTarget:
    """What the engine loads: a local checkpoint directory or a hub repo id it downloads."""

    model: str
    served_name: str
    config: ModelConfig
    trust_remote_code: bool  # the checkpoint ships Python code (a custom tokenizer)


@dataclass(frozen=True)
class LaunchCommand:
    engine: str
    program: tuple[str, ...]  # how a shell starts the engine
    module: tuple[str, ...]  # the same with this Python: ("-m", module, ...)
    arguments: tuple[str, ...]

    def shell_line(self) -> str:
        return shlex.join([*self.program, *self.arguments])


def launch_target(spec: str) -> LaunchTarget:
    """The checkpoint `spec` names, as SGLang and vLLM read it (never a localv3-quantised one)."""
    from localv3 import hub
    from localv3.quantized import read_manifest
    from localv3.registry import REPO_ID_PATTERN, config_for, find_model, resolve_model_dir

    entry = find_model(spec)
    if entry is not None and entry.format == "gguf":
        raise LaunchError(f"{entry.name} is a GGUF build for the llama.cpp engine; SGLang and vLLM serve Hugging Face checkpoints")
    if entry is not None and entry.repo:
        snapshot = hub.cached_snapshot(entry.repo, entry.revision)
        local = snapshot if snapshot is not None and hub.snapshot_problem(snapshot) is None else None
        model, name, config = str(local or entry.repo), entry.name, config_for(spec)
    elif entry is not None or Path(spec).expanduser().is_dir():
        local = resolve_model_dir(spec)
        model, name, config = str(local), entry.name if entry else local.name, ModelConfig.from_file(local)
    elif REPO_ID_PATTERN.fullmatch(spec):
        local, model, name, config = None, spec, spec, config_for(spec)
    else:
        raise ModelNotFoundError(f"unknown model {spec!r}: not a models.toml name, a directory, or a hub repo id")
    if local is not None and read_manifest(local) is not None:
        raise LaunchError(
            f"{local} is a localv3-quantised checkpoint, which SGLang and vLLM cannot read; launch the original model"
        )
    ships_code = any(p.endswith(".py") for p in entry.allow) if entry else False
    return LaunchTarget(model, name, config, ships_code or (local is not None and any(Path(local).glob("*.py"))))


def launch_command(
    engine: str,
    target: LaunchTarget,
    topology: Topology,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    context: int | None = None,
) -> LaunchCommand:
    if engine not in ENGINES:
        raise LaunchError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    config = target.config
    if context is not None and not 0 < context <= config.max_position_embeddings:
        raise LaunchError(f"--ctx {context}: {target.served_name} holds 1 to {config.max_position_embeddings:,} tokens")
    tensor = topology.total_gpus if engine == "sglang" else topology.gpus
    _check_divides(tensor, config.num_attention_heads, "attention heads", target.served_name)
    _check_divides(tensor, config.n_routed_experts or 0, "routed experts", target.served_name)
    build = _sglang_arguments if engine == "sglang" else _vllm_arguments
    program, module, arguments = build(target, topology, tensor, host, port, context)
    if target.trust_remote_code:
        arguments.append("--trust-remote-code")
    return LaunchCommand(engine, program, module, tuple(arguments))


def _check_divides(size: int, count: int, what: str, name: str) -> None:
    if count and count % size:
        raise LaunchError(f"{size}-way tensor/expert parallelism does not divide the {count} {what} of {name}")


def _sglang_arguments(target, topology, tensor, host, port, context):
    arguments = ["--model-path", target.model, "--served-model-name", target.served_name]
    arguments += ["--host", host, "--port", str(port), "--tp-size", str(tensor), "--ep-size", str(tensor)]
    if context is not None:
        arguments += ["--context-length", str(context)]
    if topology.nodes > 1:
        master, master_port = topology.master_host_port()
        arguments += ["--nnodes", str(topology.nodes), "--node-rank", str(topology.node_rank)]
        arguments += ["--dist-init-addr", f"{master}:{master_port or SGLANG_INIT_PORT}"]
    return ("python", "-m", "sglang.launch_server"), ("-m", "sglang.launch_server"), arguments


def _vllm_arguments(target, topology, tensor, host, port, context):
    arguments = ["serve", target.model, "--served-model-name", target.served_name, "--host", host, "--port", str(port)]
    arguments += ["--tensor-parallel-size", str(tensor), "--enable-expert-parallel"]
    if context is not None:
        arguments += ["--max-model-len", str(context)]
    if topology.nodes > 1:
        master, master_port = topology.master_host_port()
        arguments += ["--pipeline-parallel-size", str(topology.nodes)]
        arguments += ["--nnodes", str(topology.nodes), "--node-rank", str(topology.node_rank), "--master-addr", master]
        if master_port is not None:
            arguments += ["--master-port", str(master_port)]
        if topology.node_rank > 0:
            arguments.append("--headless")  # the API server runs on node 0 only
    return ("vllm",), ("-m", "vllm.entrypoints.cli.main"), arguments


def check_can_run(engine: str, topology: Topology) -> None:
    """The engine is importable by this Python, and this node sees the GPUs it is to use."""
    if importlib.util.find_spec(engine) is None:
        raise LaunchError(f"{engine} is not installed in this Python environment (pip install {engine}); --dry-run prints the command")
    import torch

    visible = torch.cuda.device_count()
    if visible < topology.gpus:
        raise LaunchError(f"--gpus {topology.gpus} but this machine shows {visible} CUDA GPU(s) (see CUDA_VISIBLE_DEVICES)")


# ----- does it fit one box? -------------------------------------------------------------------
@dataclass(frozen=True)
class BoxFit:
    """The model served from GPU memory alone, as SGLang/vLLM do, on boxes of `gpus` GPUs."""

    weights_bytes: int  # at the checkpoint's own precision
    kv_bytes: int  # the latent cache for one sequence of the planned context
    gpus: int
    gpu_bytes: int  # memory of one GPU
    nodes: int  # boxes needed

    def to_dict(self) -> dict:
        return asdict(self)


def box_fit(config: ModelConfig, gpus: int, gpu_bytes: int, context: int) -> BoxFit:
    from localv3.offload.quant import Quantization
    from localv3.offload.shape import ModelShape

    if gpu_bytes <= 0:
        raise LaunchError("--gpus needs the memory of one GPU: this machine has none; give --gpu-mem or --profile")
    precision = checkpoint_precision(config)
    quant = Quantization(experts=precision, dense=precision, embeddings="fp32" if precision == "fp32" else "bf16")
    shape = ModelShape.from_config(config)
    weights = sum(group.bytes(quant) for group in shape.groups)
    kv = shape.kv_bytes_per_token_per_layer * shape.num_layers * context
    box = gpus * int(gpu_bytes * USABLE_GPU_FRACTION)
    return BoxFit(weights, kv, gpus, gpu_bytes, nodes=max(1, math.ceil((weights + kv) / box)))


def checkpoint_precision(config: ModelConfig) -> str:
    """How the Hugging Face checkpoint stores its weights: fp8 (block-scaled), else its torch_dtype."""
    if config.fp8_block_size:
        return "fp8"
    return {"float32": "fp32", "float16": "fp16"}.get(config.torch_dtype or "", "bf16")


MAX_NODES = 64  # how far `launch_advice` looks for a node count the model's shapes divide
MASTER_PLACEHOLDER = "NODE0"  # stands for node 0's address in printed multi-node commands


@dataclass(frozen=True)
class LaunchAdvice:
    """What `localv3 plan --gpus N` adds: how many boxes of N GPUs the model needs under SGLang or
    vLLM, and the commands that start it (None where neither engine can read the model)."""

    model: str
    fit: BoxFit
    nodes: int  # fit.nodes, raised until the parallel sizes divide the model's heads and experts
    launch: str  # the `localv3 launch` line for node 0
    engine_command: str | None
    reason: str | None = None  # why there is no engine command

    def to_dict(self) -> dict:
        return {**self.fit.to_dict(), "nodes": self.nodes, "launch": self.launch, "engine_command": self.engine_command}

    def lines(self) -> list[str]:
        from localv3.render import format_bytes

        fit = self.fit
        box = format_bytes(fit.gpus * int(fit.gpu_bytes * USABLE_GPU_FRACTION))
        need = (
            f"On GPUs alone (SGLang, vLLM) {self.model} needs {format_bytes(fit.weights_bytes)} of weights and "
            f"{format_bytes(fit.kv_bytes)} of KV cache; a box of {fit.gpus} x {format_bytes(fit.gpu_bytes)} GPUs "
            f"holds {box} of that ({USABLE_GPU_FRACTION:.0%} of its memory)."
        )
        if self.engine_command is None:
            return [need, f"No launch command: {self.reason}"]
        if self.nodes == 1:
            lines = [need, "One box is enough:"]
        else:
            lines = [need, f"One box is not enough: {self.nodes} nodes, each running (with its own --node-rank):"]
        return [*lines, f"  {self.launch}", f"  which runs: {self.engine_command}"]


def launch_advice(spec: str, config: ModelConfig, gpus: int, gpu_bytes: int, context: int, engine: str = "sglang") -> LaunchAdvice:
    fit = box_fit(config, gpus, gpu_bytes, context)
    try:
        target = launch_target(spec)
    except LocalV3Error as exc:
        target, reason = None, str(exc)
    nodes, command = fit.nodes, None
    while target is not None and command is None and nodes <= MAX_NODES:
        master = MASTER_PLACEHOLDER if nodes > 1 else None
        try:
            command = launch_command(engine, target, Topology(gpus, nodes, 0, master), context=context).shell_line()
        except LaunchError as exc:
            nodes, reason = nodes + 1, str(exc)
    nodes = fit.nodes if command is None else nodes
    launch = f"localv3 launch {engine} {shlex.quote(spec)} --gpus {gpus} --ctx {context}"
    if nodes > 1:
        launch += f" --nodes {nodes} --node-rank 0 --master {MASTER_PLACEHOLDER}"
    return LaunchAdvice(spec, fit, nodes, launch, command, None if command else reason)
