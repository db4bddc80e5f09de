"""The role each weight of a DeepSeek checkpoint plays, by its Hugging Face name: one rule for
which format it gets (`localv3 quantize` writes it so, the runtime holds it so; the planner's
ModelShape gives its tensors the same roles).

- experts: the routed experts' projections (Quantization.experts)
- dense: the MLA projections but kv_b_proj, the dense FFN's and shared experts' projections
  (Quantization.dense)
- absorbed: kv_b_proj, which MLA absorbs into W_UK/W_UV at load: q8 when the dense scheme is
  quantised (formats.table.ABSORBED_SCHEME), else the dense scheme
- embeddings: the matrices held in the compute dtype: embed_tokens, lm_head, the MTP layer's
  eh_proj and shared head
- router: the gate weight and its correction bias, in fp32
- vector: norms and biases
"""

from __future__ import annotations

import re

# the router's weight and correction bias: kept in fp32 wherever they are stored or held
FP32_TENSOR_SUFFIXES = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")

_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
_DENSE = re.compile(r"\.(q|q_a|q_b|kv_a|o|gate|up|down)_proj(_with_mqa)?\.weight$")


def weight_role(name: str, ndim: int) -> str:
    """experts | dense | absorbed | embeddings | router | vector, for the tensor `name` of `ndim` dimensions."""
    if name.endswith(FP32_TENSOR_SUFFIXES):
        return "router"
    if ndim < 2:
        return "vector"
    if _EXPERT.search(name):
        return "experts"
    if _DENSE.search(name):
        return "dense"
    if name.endswith(".kv_b_proj.weight"):
        return "absorbed"
    return "embeddings"
