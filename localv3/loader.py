"""From checkpoint tensor names to module parameters: the pieces localv3.offload.runtime builds a
model with (the one load path: localv3.api.load -> plan -> localv3.offload.runtime.build_model).

`expected_tensors` lists every checkpoint tensor the model needs with its shape, so a
checkpoint is validated (missing tensors, wrong shapes) before any weight is read; the model is
created on the meta device (`skeleton`) and each parameter set in place (`set_tensor`,
`set_module`). Routed experts are listed one by one (`expert_tensor_names`).
"""

from __future__ import annotations

import torch
from torch import nn

from localv3.checkpoint import FLOAT_DTYPES, CheckpointReader
from localv3.config import ModelConfig
from localv3.errors import CheckpointError
from localv3.model.moe import DenseExpertBank
from localv3.model.transformer import Transformer

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
        expected[checkpoint_name(config, name)] = (name, tuple(tensor.shape))
    return expected


def validate_checkpoint(reader: CheckpointReader, expected: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """One clear error for the first missing tensor, wrong shape or wrong dtype (weights are
    floats, a localv3 checkpoint's quantised blocks bytes), naming file and tensor."""
    for tensor_name, (name, shape) in expected.items():
        if tensor_name not in reader:
            raise CheckpointError(
                f"{reader.dir}: config.json expects tensor {tensor_name}, which no weight file holds "
                f"({_file_list(reader)})"
            )
        info = reader.info(tensor_name)
        if info.shape != shape:
            raise CheckpointError(
                f"{info.file}: tensor {tensor_name} has shape {list(info.shape)}, config.json expects {list(shape)}"
            )
        allowed = (torch.uint8,) if name.endswith(".qweight") else FLOAT_DTYPES
        if info.dtype not in allowed:
            wanted = "uint8 blocks" if allowed == (torch.uint8,) else "a float dtype (F32, F16, BF16, F8)"
            raise CheckpointError(f"{info.file}: tensor {tensor_name} is {str(info.dtype).removeprefix('torch.')}, expected {wanted}")


def _file_list(reader: CheckpointReader) -> str:
    names = sorted({info.file.name for info in reader.tensors.values()})
    return ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:2])} and {len(names) - 2} more"


def set_tensor(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_path) if module_path else root
    if leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_path, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent_path), leaf, module)
