"""Build the model from a checkpoint: checkpoint tensor names -> module parameters.

`expected_tensors` lists every checkpoint tensor the model needs with its shape, so a
checkpoint is validated (missing tensors, wrong shapes) before any weight is read. The model
is created on the meta device, then each parameter is read (dequantised if FP8) straight onto
the device `place(name)` chooses. Routed experts are stacked per layer. A localv3 quantized
checkpoint (it has a manifest) gets QuantLinear / QuantExpertBank modules for its quantised weights
(localv3.formats), except kv_b_proj, which MLA absorbs: it is dequantised here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from localv3.checkpoint import FP32_TENSOR_SUFFIXES, CheckpointReader
from localv3.config import ModelConfig
from localv3.errors import CheckpointError
from localv3.model.moe import DenseExpertBank
from localv3.model.rope import RotaryEmbedding
from localv3.model.transformer import Transformer
from localv3.formats.modules import QuantExpertBank, QuantLinear
from localv3.quantized import QUANTIZED_SUFFIX, quantized_expectations, read_manifest, read_quantized

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def checkpoint_name(config: ModelConfig, param_name: str) -> str:
    """Our parameter name -> the Hugging Face checkpoint tensor name."""
    if param_name.startswith("mtp."):
        _, depth, rest = param_name.split(".", 2)
        layer = config.num_hidden_layers + int(depth)
        rest = rest.removeprefix("block.").replace("shared_head_norm", "shared_head.norm")
        return f"model.layers.{layer}.{rest}"
    return param_name


def expert_tensor_names(prefix: str, expert: int) -> dict[str, str]:
    """HF names of one routed expert's three projections; prefix is `model.layers.{i}.mlp.experts`."""
    return {proj: f"{prefix}.{expert}.{proj}.weight" for proj in EXPERT_PROJECTIONS}


def has_mtp_weights(config: ModelConfig, reader: CheckpointReader) -> bool:
    return config.num_nextn_predict_layers > 0 and all(
        f"model.layers.{config.num_hidden_layers + j}.eh_proj.weight" in reader
        for j in range(config.num_nextn_predict_layers)
    )


def skeleton(config: ModelConfig, with_mtp: bool) -> Transformer:
    with torch.device("meta"):
        return Transformer(config, with_mtp=with_mtp)


def expected_tensors(config: ModelConfig, model: Transformer) -> dict[str, tuple[str, tuple[int, ...]]]:
    """checkpoint tensor name -> (our parameter name, shape), experts listed one by one."""
    expected = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        if name == "rotary.inv_freq":
            continue
        if isinstance(model.get_submodule(owner), DenseExpertBank):
            if leaf == "gate_up":
                n_experts, two_hidden, dim = tensor.shape
                hidden = two_hidden // 2
                prefix = checkpoint_name(config, owner)
                shapes = {"gate_proj": (hidden, dim), "up_proj": (hidden, dim), "down_proj": (dim, hidden)}
                for e in range(n_experts):
                    for proj, tensor_name in expert_tensor_names(prefix, e).items():
                        expected[tensor_name] = (f"{owner}[{e}].{proj}", shapes[proj])
            continue
        tensor_name = checkpoint_name(config, name)
        if name == "lm_head.weight" and config.tie_word_embeddings:
            tensor_name = "model.embed_tokens.weight"
        expected[tensor_name] = (name, tuple(tensor.shape))
    return expected


def validate_checkpoint(reader: CheckpointReader, expected: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """One clear error for the first missing tensor or wrong shape, naming file and tensor."""
    for tensor_name, (_, shape) in expected.items():
        if tensor_name not in reader:
            raise CheckpointError(f"{reader.dir}: tensor {tensor_name} is missing from the checkpoint")
        info = reader.info(tensor_name)
        if info.shape != shape:
            raise CheckpointError(
                f"{info.file}: tensor {tensor_name} has shape {list(info.shape)}, expected {list(shape)}"
            )


def set_tensor(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_path) if module_path else root
    if leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def load_expert_bank(
    reader: CheckpointReader, prefix: str, n_experts: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a layer's experts -> (gate_up [E, 2I, D], down [E, D, I]) on `device`."""
    gate_ups, downs = [], []
    for expert in range(n_experts):
        names = expert_tensor_names(prefix, expert)
        gate_up = torch.cat([reader.get(names["gate_proj"], dtype), reader.get(names["up_proj"], dtype)])
        gate_ups.append(gate_up.to(device))
        downs.append(reader.get(names["down_proj"], dtype).to(device))
    return torch.stack(gate_ups), torch.stack(downs)


def load_transformer(
    model_dir: str | Path,
    config: ModelConfig,
    dtype: torch.dtype,
    place: Callable[[str], torch.device] = lambda name: torch.device("cpu"),
    with_mtp: bool = True,
    reader: CheckpointReader | None = None,
) -> Transformer:
    reader = reader or CheckpointReader(model_dir, config.fp8_block_size or (128, 128))
    model = skeleton(config, with_mtp and has_mtp_weights(config, reader))
    manifest = read_manifest(reader.dir)  # a localv3 quantized checkpoint, or None
    expected = expected_tensors(config, model)
    if manifest is not None:
        expected = quantized_expectations(expected, manifest)
    validate_checkpoint(reader, expected)
    for tensor_name, (name, _) in expected.items():
        if "[" in name or name.endswith(QUANTIZED_SUFFIX):  # experts and quantised weights: per module below
            continue
        wanted = torch.float32 if name.endswith(FP32_TENSOR_SUFFIXES) else dtype
        set_tensor(model, name, reader.get(tensor_name, wanted).to(place(name)))
    for name, module in list(model.named_modules()):
        if isinstance(module, DenseExpertBank):
            n_experts, two_hidden, dim = module.gate_up.shape
            names = [expert_tensor_names(checkpoint_name(config, name), e) for e in range(n_experts)]
            if manifest is not None and manifest.format_of(names[0]["gate_proj"]) is not None:
                set_module(model, name, load_quant_expert_bank(reader, manifest, names, dim, two_hidden // 2, place(name)))
                continue
            gate_up, down = load_expert_bank(reader, checkpoint_name(config, name), n_experts, dtype, place(name))
            set_tensor(model, f"{name}.gate_up", gate_up)
            set_tensor(model, f"{name}.down", down)
        elif isinstance(module, nn.Linear) and manifest is not None:
            weight_name = checkpoint_name(config, f"{name}.weight")
            stored = manifest.format_of(weight_name)
            if stored is None:
                continue
            weight = read_quantized(reader, weight_name, stored, module.in_features)
            if name.endswith("kv_b_proj"):
                set_tensor(model, f"{name}.weight", weight.dequantize(dtype).to(place(f"{name}.weight")))
            else:
                set_module(model, name, QuantLinear.from_weight(weight, module.bias, place(f"{name}.weight")))
    model.rotary = RotaryEmbedding(config).to(place("rotary"))
    model.absorb_kv_b()
    return model.eval()


def load_quant_expert_bank(
    reader: CheckpointReader, manifest, names: list[dict[str, str]], dim: int, hidden: int, device
) -> QuantExpertBank:
    """names: per expert, {gate_proj, up_proj, down_proj} -> HF weight name."""
    gate_up_type, down_type = manifest.format_of(names[0]["gate_proj"]), manifest.format_of(names[0]["down_proj"])
    bank = QuantExpertBank(len(names), dim, hidden, gate_up_type, down_type, device)
    for expert, expert_names in enumerate(names):
        bank.store(
            expert,
            read_quantized(reader, expert_names["gate_proj"], gate_up_type, dim),
            read_quantized(reader, expert_names["up_proj"], gate_up_type, dim),
            read_quantized(reader, expert_names["down_proj"], down_type, hidden),
        )
    return bank


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_path, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent_path), leaf, module)
