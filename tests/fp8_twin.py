"""An independent dequantisation of an FP8 block-scaled checkpoint, block by block."""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def dequantize_blockwise(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    out = weight.float().clone()
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            out[i * block : (i + 1) * block, j * block : (j + 1) * block] *= scale_inv[i, j]
    return out


def write_dequantized_twin(fp8_dir: Path, out_dir: Path, dtype: torch.dtype) -> Path:
    """Copy of an FP8 checkpoint with every FP8 weight dequantised and stored in `dtype`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((fp8_dir / "config.json").read_text())
    config.pop("quantization_config")
    (out_dir / "config.json").write_text(json.dumps(config))
    tensors = {}
    for file in sorted(fp8_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    twin = {}
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            twin[name] = dequantize_blockwise(tensor, tensors[name + "_scale_inv"]).to(dtype)
        else:
            twin[name] = tensor
    save_file(twin, str(out_dir / "model.safetensors"))
    for extra in ("tokenizer.json", "tokenizer_config.json"):
        if (fp8_dir / extra).is_file():
            shutil.copy(fp8_dir / extra, out_dir / extra)
    return out_dir
