"""What a model directory holds: architecture facts and a validated checkpoint summary."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from localv3.checkpoint import CheckpointReader
from localv3.config import ModelConfig
from localv3.loader import expected_tensors, has_mtp_weights, skeleton, validate_checkpoint
from localv3.quantized import quantized_expectations, read_manifest
from localv3.tokenizer import validate_tokenizer_files


@dataclass
class ModelSummary:
    path: str
    model_type: str
    layers: int
    hidden_size: int
    routed_experts: int
    experts_per_token: int
    params_total: int
    params_active: int
    mtp_layers: int
    kv_bytes_per_token_bf16: int
    checkpoint_bytes: int
    files: int
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> tensor count

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(model_dir: Path) -> ModelSummary:
    """Read config.json and every safetensors header, validate names and shapes (a localv3
    checkpoint's quantised weights as their blocks) and the tokenizer settings and chat
    templates; read no weights."""
    config = ModelConfig.from_file(model_dir)
    reader = CheckpointReader(model_dir, config.fp8_block_size or (128, 128))
    with_mtp = has_mtp_weights(config, reader)
    expected = expected_tensors(config, skeleton(config, with_mtp))  # parameter shapes, as in the HF checkpoint
    manifest = read_manifest(model_dir)
    validate_checkpoint(reader, quantized_expectations(expected, manifest) if manifest else expected)
    validate_tokenizer_files(model_dir)
    total = routed = 0
    for tensor_name, (_, shape) in expected.items():
        n = 1
        for d in shape:
            n *= d
        total += n
        if ".mlp.experts." in tensor_name:
            routed += n
    active_share = (config.num_experts_per_tok or 0) / (config.n_routed_experts or 1)
    return ModelSummary(
        path=str(model_dir),
        model_type=config.model_type,
        layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        routed_experts=config.n_routed_experts or 0,
        experts_per_token=config.num_experts_per_tok or 0,
        params_total=total,
        params_active=int(total - routed + routed * active_share),
        mtp_layers=config.num_nextn_predict_layers if with_mtp else 0,
        kv_bytes_per_token_bf16=config.kv_bytes_per_token(2),
        checkpoint_bytes=sum(info.nbytes for info in reader.tensors.values()),
        files=len({info.file for info in reader.tensors.values()}),
        dtypes=dict(Counter(str(info.dtype).removeprefix("torch.") for info in reader.tensors.values())),
    )
