"""The runtime half of offloading: build the model a Plan lays out, and the engine around it.

`build_model` materialises a Transformer following a Layout and a Quantization:
- each decoder layer's attention, norms, router and shared expert or dense FFN on its layer's
  device (the engine puts its KV cache rows there too); the embeddings, the final norm and
  lm_head on theirs; activations cross devices through localv3.offload.device_hops;
- each MoE layer's routed experts in a `PlacedExperts` (localv3.offload.banks), one bank per device:
  on `gpu` and `cpu` a QuantExpertBank (q8/q4, localv3.formats) or a DenseExpertBank (float
  schemes), on `disk` a DiskExpertBank that reads the checkpoint per use. The layer's shared
  expert moves in with them, so on CUDA it runs while the CPU computes the routed experts;
- the dense-role linears (MLA projections, dense FFN, shared experts) as QuantLinear under q8/q4,
a dense FFN or shared expert whose three matrices are quantised as one QuantFeedForward.
MLA's absorbed W_UK/W_UV (from kv_b_proj) in Q8_0 whenever the dense scheme is quantised
(QuantHeadProjection), else in the compute dtype. lm_head and the MTP eh_proj stored and
planned in bf16 as ggml's BF16 rows where ggml runs them (the CPU); the embedding table stored
and planned in bf16 is held in bf16 under a wider compute dtype (its looked-up rows widened).
Held in the compute dtype: the rest of the embeddings role (those three elsewhere), any
matrix whose input dimension no block type of the format divides, and every float scheme
(fp32, bf16, fp16, fp8: FP8 is dequantised at load, there are no FP8 kernels here). The plan's `gpu` is `gpu_device`: CUDA where there is one, else the
CPU device, which runs the same model through the same banks.

A GGUF file (localv3.offload.gguf_weights) is planned in its own tensor types and built the same
way: its routed experts that the host computes are views of the file's read-only mapping (copied
from nothing), its other matrices as stored where their device computes their type, else
dequantised once at load.

`load_planned`: a model -> a Plan for this machine (or given hardware) -> a PlannedEngine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import torch
from torch import nn

from localv3.checkpoint import CheckpointReader
from localv3.config import ModelConfig
from localv3.engines import DEFAULT_MAX_CONTEXT
from localv3.engines.native import NativeEngine, default_device, default_dtype
from localv3.errors import CheckpointError, LocalV3Error
from localv3.files import warn
from localv3.loader import (
    checkpoint_name,
    expected_tensors,
    expert_tensor_names,
    has_mtp_weights,
    set_module,
    set_tensor,
    skeleton,
    validate_checkpoint,
)
from localv3.model.attention import MLA
from localv3.model.moe import DenseExpertBank, FeedForward, MoE
from localv3.model.rope import RotaryEmbedding
from localv3.model.transformer import Transformer
from localv3.formats.blocks import QuantizedWeight, quantize_to
from localv3.formats.modules import QuantExpertBank, QuantFeedForward, QuantHeadProjection, QuantLinear, runs_blocks
from localv3.formats.roles import FP32_TENSOR_SUFFIXES, weight_role
from localv3.formats.table import ABSORBED_SCHEME, DTYPE_SCHEMES, FORMATS, GGUF_BLOCK_TYPES, BlockType
from localv3.quantized import QUANTIZED_SUFFIX, Manifest, quantized_expectations, read_manifest, read_quantized
from localv3.registry import resolve_model_dir
from localv3.tokenizer import Tokenizer
from localv3.offload.banks import BankSlice, DiskExpertBank, PlacedExperts
from localv3.offload.device_hops import StageDevices, add_device_hops
from localv3.offload.gguf_weights import GgufSource, GgufWeights, is_gguf_file, open_gguf
from localv3.offload.hardware import Hardware, detect_hardware
from localv3.offload.layout import CPU, DISK, GPU, Layout
from localv3.offload.planner import Plan, Policy, plan
from localv3.offload.quant import Quantization
from localv3.offload.static_decode import StaticDecoding
from localv3.offload.routing_stats import RoutingStats, find_profile, load_profile, moe_layers
from localv3.offload.shape import ModelShape

BF16_ROWS = GGUF_BLOCK_TYPES["bf16"]  # a bf16 matrix as ggml multiplies it
EMBEDDING_TABLE = "model.embed_tokens.weight"


HOST = torch.device("cpu")


@dataclass(frozen=True)
class Devices:
    """The torch device of every parameter, from a Layout's device names."""

    layout: Layout
    gpu: torch.device
    num_hidden_layers: int

    def of(self, name: str) -> torch.device:
        """`gpu` -> the GPU device; `cpu` and `disk` (computed by the CPU) -> the host."""
        return self.gpu if name == GPU else HOST

    def of_param(self, param_name: str) -> torch.device:
        parts = param_name.split(".")
        if parts[:2] == ["model", "layers"]:
            return self.of(self.layout.layer_devices[int(parts[2])])
        if parts[0] == "mtp":
            return self.of(self.layout.layer_devices[self.num_hidden_layers + int(parts[1])])
        if parts[0] == "rotary" or parts[:2] == ["model", "embed_tokens"]:
            return self.of(self.layout.embedding_device)
        return self.of(self.layout.head_device)  # model.norm, lm_head

    def stages(self, mtp_heads: int) -> StageDevices:
        """Where the embeddings, each layer (the first `mtp_heads` MTP layers too) and the head run."""
        layers = [self.of(name) for name in self.layout.layer_devices]
        return StageDevices(
            embeddings=self.of(self.layout.embedding_device),
            layers=layers[: self.num_hidden_layers],
            mtp=layers[self.num_hidden_layers : self.num_hidden_layers + mtp_heads],
            head=self.of(self.layout.head_device),
        )


def build_model(
    model_dir: str | Path,
    config: ModelConfig,
    layout: Layout,
    quant: Quantization,
    gpu_device: torch.device | str,
    dtype: torch.dtype,
    with_mtp: bool = True,
    reader: CheckpointReader | None = None,
    weights: Weights | GgufWeights | None = None,
) -> Transformer:
    """The Transformer with every part where `layout` puts it, quantised as `quant` says (a
    GGUF's `weights`: as its tensor types are)."""
    if weights is None:
        reader = reader or CheckpointReader(model_dir, config.fp8_block_size or (128, 128))
        weights = Weights(reader, read_manifest(reader.dir))
    reader = weights.reader
    placed_mtp = len(layout.layer_devices) > config.num_hidden_layers
    model = skeleton(config, with_mtp and placed_mtp and has_mtp_weights(config, reader))
    expected = expected_tensors(config, model)
    if weights.manifest is not None:
        expected = quantized_expectations(expected, weights.manifest)
    weights.validate(expected)
    devices = Devices(layout, torch.device(gpu_device), config.num_hidden_layers)
    linears = _quantised_linears(model, config, weights, quant, devices)
    narrow_table = _embeddings_held_in_bf16(config, weights, quant, dtype)
    for tensor_name, (name, _) in expected.items():
        if "[" in name or name.endswith(QUANTIZED_SUFFIX) or name.removesuffix(".weight") in linears:
            continue  # routed experts and quantised weights: below
        wanted = torch.float32 if name.endswith(FP32_TENSOR_SUFFIXES) else dtype
        if name == EMBEDDING_TABLE and narrow_table:
            wanted = torch.bfloat16
        set_tensor(model, name, reader.get(tensor_name, wanted).to(devices.of_param(name)))
    model.model.embed_tokens.compute_dtype = dtype
    for name, module in model.named_modules():  # stored quantised, held in float (kv_b_proj)
        if not isinstance(module, nn.Linear) or name in linears:
            continue
        weight_name = checkpoint_name(config, f"{name}.weight")
        if stored := weights.stored_format(weight_name):
            weight = weights.quantized(weight_name, stored, module.in_features).dequantize(dtype)
            set_tensor(model, f"{name}.weight", weight.to(devices.of_param(name)))
    quantized = {name: weights.quantized(checkpoint_name(config, f"{name}.weight"), *stored) for name, stored in linears.items()}
    for name, module in list(model.named_modules()):
        parts = [quantized.get(f"{name}.{p}") for p in ("gate_proj", "up_proj", "down_proj")]
        if isinstance(module, FeedForward) and all(parts):
            set_module(model, name, QuantFeedForward(*parts, device=devices.of_param(name)))
            for p in ("gate_proj", "up_proj", "down_proj"):
                del quantized[f"{name}.{p}"]
    for name, weight in quantized.items():
        set_module(model, name, QuantLinear.from_weight(weight, model.get_submodule(name).bias, devices.of_param(name)))
    for layer, moe in moe_layers(model):
        _place_experts(moe, layer, weights, config, layout, devices, quant.experts, dtype)
    model.rotary = RotaryEmbedding(config).to(devices.of_param("rotary"))
    _check_materialised(model)
    add_device_hops(model, devices.stages(len(model.mtp)))
    model.absorb_kv_b()
    if FORMATS[quant.dense].quantized:
        _quantise_absorbed(model, devices)
    return model.eval()


def _quantise_absorbed(model: Transformer, devices: Devices) -> None:
    """MLA's absorbed W_UK and W_UV in the ABSORBED_SCHEME's block type where their rows take one."""
    for name, module in model.named_modules():
        if not isinstance(module, MLA):
            continue
        for projection in ("uk", "uv"):
            head_projection = getattr(module, projection)
            block_type = FORMATS[ABSORBED_SCHEME].block_type(head_projection.shape[2])
            if block_type is not None:
                weight = head_projection.dense_weight(torch.float32)  # [H, out, in]
                setattr(module, projection, QuantHeadProjection(weight, block_type, devices.of_param(name)))


@dataclass(frozen=True)
class Weights:
    """A checkpoint's matrices in the form a module takes: those a localv3 checkpoint stores
    quantised (its manifest names them) as stored, whatever the plan says; float ones are
    quantised on load where the plan asks for q8/q4."""

    reader: CheckpointReader
    manifest: Manifest | None

    def validate(self, expected: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        validate_checkpoint(self.reader, expected)

    def stored_format(self, weight_name: str) -> BlockType | None:
        return self.manifest.format_of(weight_name) if self.manifest else None

    def block_type(self, weight_name: str, scheme: str | None, in_features: int) -> BlockType | None:
        """The stored block type, else the one `scheme` gives this row length, else None (float)."""
        fmt = FORMATS.get(scheme)
        planned = fmt.block_type(in_features) if fmt is not None else None
        return self.stored_format(weight_name) or planned

    def quantized(self, weight_name: str, stored: BlockType, in_features: int) -> QuantizedWeight:
        if self.stored_format(weight_name) is not None:
            return read_quantized(self.reader, weight_name, stored, in_features)
        if stored == BF16_ROWS:  # the stored bf16 values themselves, never widened
            return QuantizedWeight(self.reader.get(weight_name, torch.bfloat16).contiguous().view(torch.uint8), stored, in_features)
        return quantize_to(self.reader.get(weight_name, torch.float32), stored)

    def held_in_bf16(self, weight_name: str) -> bool:
        """Whether the checkpoint stores this float matrix in bf16."""
        return self.reader.info(weight_name).dtype == torch.bfloat16

    def mapped_experts(self, layer: int, expert_ids: list[int]) -> None:
        """Experts are copied, not mapped, from safetensors: a shard stores each expert's
        projections as tensors of their own in name order (expert 10 before expert 2), a layer's
        experts may span shards, and the data is not 32-byte aligned, while ggml's mul_mat_id
        takes one 3-D tensor at one stride (a GGUF's ffn_*_exps: GgufWeights)."""
        return None


def _embeddings_held_in_bf16(config: ModelConfig, weights: Weights | GgufWeights, quant: Quantization, dtype: torch.dtype) -> bool:
    """Whether the embedding table is held in bf16 below a wider compute dtype: planned in bf16
    and stored in bf16 (its values as they are; DeepSeek-V3: 1.85 GB, not 3.7 in float32)."""
    return quant.embeddings == "bf16" and dtype != torch.bfloat16 and weights.held_in_bf16(checkpoint_name(config, EMBEDDING_TABLE))


def _quantised_linears(
    model: Transformer, config: ModelConfig, weights: Weights | GgufWeights, quant: Quantization, devices: Devices
) -> dict[str, tuple[BlockType, int]]:
    """Module name -> (block type, input features) of every nn.Linear held in a block type (the
    roles of localv3.formats.roles), where its device computes that type (else it is held in
    the compute dtype):
    - dense-role ones that the checkpoint stores quantised or that the dense scheme quantises;
    - embeddings-role ones (lm_head, the MTP eh_proj) stored and planned in bf16, as ggml's BF16
      rows: the bytes the plan sized, not a float32 compute dtype's twice as many (DeepSeek-V3's
      lm_head: 1.85 GB read per decode step, not 3.7). ggml rounds their activations to bf16."""
    chosen = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight_name = checkpoint_name(config, f"{name}.weight")
        role = weight_role(weight_name, 2)
        if role == "dense":
            stored = weights.block_type(weight_name, quant.dense, module.in_features)
        elif role == "embeddings" and quant.embeddings == "bf16" and weights.held_in_bf16(weight_name):
            stored = BF16_ROWS
        else:
            continue
        if stored is not None and runs_blocks(stored, devices.of_param(name)):
            chosen[name] = (stored, module.in_features)
    return chosen


def _place_experts(
    moe: MoE,
    layer: int,
    weights: Weights | GgufWeights,
    config: ModelConfig,
    layout: Layout,
    devices: Devices,
    scheme: str,
    dtype: torch.dtype,
) -> None:
    """Replace the layer's expert bank by its slices per device, the shared expert moved in.
    Experts computed by the host (cpu, disk and a CPU `gpu`) view the file where the weights
    map them (a GGUF); else a bank of their types where the device computes them, else floats."""
    n_experts, dim, hidden = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
    prefix = f"model.layers.{layer}.mlp.experts"
    first = expert_tensor_names(prefix, 0)
    gate_up_type = weights.block_type(first["gate_proj"], scheme, dim)
    down_type = weights.block_type(first["down_proj"], scheme, hidden)
    quantized = gate_up_type is not None and down_type is not None
    slices = []
    for where in (GPU, CPU, DISK):
        ids = layout.experts_on(layer, where)
        if not ids:
            continue
        device = devices.of(where)
        mapped = weights.mapped_experts(layer, ids) if device == HOST else None
        if mapped is not None:
            bank = mapped
        elif where == DISK:
            stored = (weights.stored_format(first["gate_proj"]), weights.stored_format(first["down_proj"]))
            bank = DiskExpertBank(weights.reader, prefix, ids, dim, hidden, stored if all(stored) else None)
        elif quantized and runs_blocks(gate_up_type, device) and runs_blocks(down_type, device):
            bank = _quant_bank(weights, prefix, ids, dim, hidden, gate_up_type, down_type, device)
        else:
            bank = _dense_bank(weights.reader, prefix, ids, dim, hidden, dtype, device)
        slices.append(BankSlice(bank, ids, n_experts, device))
    shared, moe.shared_experts = moe.shared_experts, None
    moe.experts = PlacedExperts(slices, shared)


def _quant_bank(weights: Weights | GgufWeights, prefix, ids, dim, hidden, gate_up_type, down_type, device) -> QuantExpertBank:
    bank = QuantExpertBank(len(ids), dim, hidden, gate_up_type, down_type, device)
    for j, expert in enumerate(ids):
        names = expert_tensor_names(prefix, expert)
        bank.store(
            j,
            weights.quantized(names["gate_proj"], gate_up_type, dim),
            weights.quantized(names["up_proj"], gate_up_type, dim),
            weights.quantized(names["down_proj"], down_type, hidden),
        )
    return bank


def _dense_bank(reader, prefix, ids, dim, hidden, dtype, device) -> DenseExpertBank:
    with torch.device("meta"):
        bank = DenseExpertBank(len(ids), dim, hidden)
    gate_up = torch.empty(len(ids), 2 * hidden, dim, dtype=dtype, device=device)  # [n, 2I, D]
    down = torch.empty(len(ids), dim, hidden, dtype=dtype, device=device)  # [n, D, I]
    for j, expert in enumerate(ids):
        names = expert_tensor_names(prefix, expert)
        gate_up[j, :hidden].copy_(reader.get(names["gate_proj"], dtype))
        gate_up[j, hidden:].copy_(reader.get(names["up_proj"], dtype))
        down[j].copy_(reader.get(names["down_proj"], dtype))
    set_tensor(bank, "gate_up", gate_up)
    set_tensor(bank, "down", down)
    return bank


def _check_materialised(model: Transformer) -> None:
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_meta:
            raise CheckpointError(f"the runtime left {name} unloaded: the checkpoint layout is not one it knows")


# ----- the engine ------------------------------------------------------------------------------
class PlannedEngine(NativeEngine):
    """The native engine on a planned model; records routing statistics when asked, saving the
    profile after each generation."""

    def __init__(
        self,
        path: Path,
        config: ModelConfig,
        model: Transformer,
        tokenizer: Tokenizer | None,
        max_context: int,
        plan: Plan,
        gpu_device: torch.device,
        routing: RoutingStats | None = None,
    ):
        devices = Devices(plan.layout, gpu_device, config.num_hidden_layers)
        cache_devices = [devices.of(name) for name in plan.layout.layer_devices[: model.num_cache_layers]]
        super().__init__(path, config, model, tokenizer, max_context, cache_devices)
        self.plan = plan
        self.gpu_device = gpu_device
        self.routing = routing

    @property
    def placement(self) -> str:
        layout, quant = self.plan.layout, self.plan.quantization
        gpu = f"gpu={self.gpu_device}"
        layers = f"{layout.layer_devices.count(GPU)}/{len(layout.layer_devices)} layers on gpu"
        experts = ", ".join(f"{n} {d}" for d in (GPU, CPU, DISK) if (n := layout.count_experts(d)))
        dtype = str(self.dtype).removeprefix("torch.")
        static = f"; {self.static_decoding.describe()}" if self.static_decoding else ""
        return f"planned ({gpu}): {layers}; experts {experts or 'none'} ({quant.experts}); dense {quant.dense}; {dtype}{static}"

    def step_strategy(self, speculative: bool | None):
        """MTP speculation by default only where the plan predicts it pays:
        with experts in RAM, each verified draft reads more experts per step; never by default with
        static decoding, which MTP verification (several tokens a step) would bypass."""
        if speculative is None and self.static_decoding is not None:
            speculative = False
        if speculative is None:
            predicted = self.plan.predicted
            speculative = bool(predicted.mtp_decode_tok_s and predicted.mtp_decode_tok_s > predicted.decode_tok_s)
        return super().step_strategy(speculative)

    def stream_generate(self, *args, **kwargs):
        try:
            yield from super().stream_generate(*args, **kwargs)
        finally:
            if self.routing is not None:
                self.save_routing_profile()

    def save_routing_profile(self) -> Path | None:
        """The profile written; a home that cannot be written costs a warning line, never the
        generation (it has already been printed)."""
        try:
            return self.routing.save(self.path)
        except OSError as exc:
            warn(f"could not save the routing profile of {self.path.name}: {exc.strerror or exc}")
            return None


def stored_quantization(manifest: Manifest | None, config: ModelConfig) -> Quantization:
    """The schemes the checkpoint stores: a localv3 checkpoint's manifest, else the Hugging Face
    checkpoint's own precision (FP8 block-scaled, or its torch_dtype) for every role."""
    if manifest is not None:
        return Quantization(experts=manifest.experts, dense=manifest.dense)
    native = "fp8" if config.fp8_block_size else DTYPE_SCHEMES.get(config.torch_dtype or "", "bf16")
    return Quantization(experts=native, dense=native, embeddings="fp32" if native == "fp32" else "bf16")


# Below this hidden size one thread decodes faster than several: each op is too small to
# outweigh waking sleeping OpenMP workers (localv3/cli.py sets OMP_WAIT_POLICY=PASSIVE). Measured on
# 2 cores, random V3 configs, decode tok/s with 1 vs 2 threads: hidden 256: 446 vs 144;
# 1024: 114 vs 96; 2048: 34.5 vs 47.5.
MIN_HIDDEN_FOR_THREADS = 2048


def default_cpu_threads(config: ModelConfig) -> int:
    """This machine's physical cores, or 1 for models too small for intra-op parallelism."""
    if config.hidden_size < MIN_HIDDEN_FOR_THREADS:
        return 1
    return psutil.cpu_count(logical=False) or torch.get_num_threads()


def load_planned(
    model: str | Path,
    hardware: Hardware | None = None,
    context: int | None = None,
    policy: Policy | None = None,
    quantization: Quantization | None = None,
    gpu_device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    with_mtp: bool = True,
    cpu_threads: int | None = None,
    record_routing: bool = False,
    cuda_graphs: bool = False,
) -> PlannedEngine:
    """Plan `model` for `hardware` (default: this machine, detected) and build it.

    `quantization` defaults to what the checkpoint stores (`localv3 quantize` makes smaller
    ones). The model's saved routing profile feeds the plan unless `policy` brings one; CPU
    threads default to default_cpu_threads(config); the compute dtype defaults to bf16 when the
    first layer runs on CUDA, else fp32. `cuda_graphs`: decode steps take the static-shape path,
    captured in CUDA graphs on a CUDA device, run eagerly on the CPU (localv3.offload.static_decode).
    """
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
        raise LocalV3Error(f"max_context must be a whole number of tokens >= 1, not {context!r}")
    gguf = open_gguf(Path(model).expanduser().resolve()) if is_gguf_file(model) else None
    if gguf is not None and quantization is not None:
        raise LocalV3Error(f"{gguf.path}: a GGUF's tensor types are fixed; it is planned and run as it stores them")
    model_dir = gguf.path if gguf else resolve_model_dir(model)  # a GGUF: the file
    config = gguf.config if gguf else ModelConfig.from_file(model_dir)
    hardware = hardware or detect_hardware()
    context = min(context or DEFAULT_MAX_CONTEXT, config.max_position_embeddings)
    policy = policy or Policy()
    profile_path = find_profile(model_dir)
    if policy.routing_profile is None and profile_path is not None:
        policy = replace(policy, routing_profile=load_profile(profile_path))
    policy = replace(policy, include_mtp=policy.include_mtp and with_mtp)
    shape = ModelShape.from_config(config, gguf.model.name if gguf else model_dir.name)
    stored = gguf.quantization(shape) if gguf else stored_quantization(read_manifest(model_dir), config)
    result = plan(shape, quantization or stored, hardware, context, policy)
    torch.set_num_threads(cpu_threads or default_cpu_threads(config))
    gpu = torch.device(gpu_device) if gpu_device is not None else default_device()
    first = Devices(result.layout, gpu, config.num_hidden_layers).of(result.layout.layer_devices[0])
    transformer = build_model(
        model_dir, config, result.layout, result.quantization, gpu, dtype or default_dtype(first), with_mtp,
        weights=gguf.weights if gguf else None,
    )  # fmt: skip
    routing = None
    if record_routing and config.n_routed_experts:
        routing = RoutingStats.resume(model_dir, config.n_routed_experts)
        routing.attach(transformer)
    tokenizer = _tokenizer(model_dir, gguf)
    engine = PlannedEngine(model_dir, config, transformer, tokenizer, context, result, gpu, routing)
    if cuda_graphs:
        engine.static_decoding = StaticDecoding.planned(transformer, result.layout, gpu)
    return engine


def _tokenizer(model_dir: Path, gguf: GgufSource | None) -> Tokenizer | None:
    if gguf is not None:
        return gguf.tokenizer()
    return Tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() else None
