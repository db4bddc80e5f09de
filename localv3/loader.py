"""Build the model from a checkpoint: checkpoint tensor names -> module parameters.

The model is created on the meta device, then each parameter is read from the checkpoint
(shape-checked, dequantised if FP8) straight onto the device `place(name)` chooses, so the
whole model never passes through RAM twice. Routed experts are stacked per layer.
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
    return {proj: f"{prefix}.{expert}.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")}


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
        gate = reader.get(names["gate_proj"], dtype)
        up = reader.get(names["up_proj"], dtype, expected_shape=tuple(gate.shape))
        gate_ups.append(torch.cat([gate, up]).to(device))
        downs.append(reader.get(names["down_proj"], dtype, expected_shape=(gate.shape[1], gate.shape[0])).to(device))
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
    with_mtp = with_mtp and all(
        f"model.layers.{config.num_hidden_layers + j}.eh_proj.weight" in reader
        for j in range(config.num_nextn_predict_layers)
    )
    with torch.device("meta"):
        model = Transformer(config, with_mtp=with_mtp)
    banks = {name: m for name, m in model.named_modules() if isinstance(m, DenseExpertBank)}
    for name, param in list(model.named_parameters()) + list(model.named_buffers()):
        bank_name = name.rpartition(".")[0]
        if bank_name in banks:
            continue
        if name == "rotary.inv_freq":
            continue
        tensor_name = checkpoint_name(config, name)
        if tensor_name not in reader and name == "lm_head.weight" and config.tie_word_embeddings:
            tensor_name = "model.embed_tokens.weight"
        wanted = torch.float32 if name.endswith(FP32_TENSOR_SUFFIXES) else dtype
        tensor = reader.get(tensor_name, wanted, expected_shape=tuple(param.shape))
        set_tensor(model, name, tensor.to(place(name)))
    for name, bank in banks.items():
        device = place(name)
        gate_up, down = load_expert_bank(reader, checkpoint_name(config, name), bank.gate_up.shape[0], dtype, device)
        if gate_up.shape != bank.gate_up.shape or down.shape != bank.down.shape:
            raise CheckpointError(
                f"{reader.dir}: experts of {checkpoint_name(config, name)} have shape "
                f"{list(gate_up.shape)}/{list(down.shape)}, expected {list(bank.gate_up.shape)}/{list(bank.down.shape)}"
            )
        set_tensor(model, f"{name}.gate_up", gate_up)
        set_tensor(model, f"{name}.down", down)
    model.rotary = RotaryEmbedding(config).to(place("rotary"))
    return model.eval()
