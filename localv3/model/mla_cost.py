"""What MLA's two attention paths cost, counted in multiply-adds over all heads: the engine
takes the cheaper one for each call (localv3.model.attention) and the planner predicts with the
same count (localv3.offload.roofline). Torch-free, so the planner can use it.

For `queries` new positions attending to `keys` positions (cached ones and their own):
- naive: every key's latent is expanded through kv_b (keys x C x (nope + v) per head), then
  scores are nope + rope deep and values v wide;
- absorbed: every query goes through W_UK and its context through W_UV (queries x C x (nope + v)
  per head), then scores are C + rope deep and values C wide.
The projections around attention (q, kv_a, o) cost the same on both paths and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MLAWidths:
    heads: int
    rank: int  # kv_lora_rank
    nope: int  # qk_nope_head_dim
    rope: int  # qk_rope_head_dim
    v: int  # v_head_dim

    def costs(self, queries: int, keys: int) -> dict[str, int]:
        """{"naive": multiply-adds, "absorbed": multiply-adds} of one call."""
        up = self.nope + self.v
        naive = keys * self.rank * up + queries * keys * (self.nope + self.rope + self.v)
        absorbed = queries * self.rank * up + queries * keys * (2 * self.rank + self.rope)
        return {"naive": self.heads * naive, "absorbed": self.heads * absorbed}

    def cheaper_path(self, queries: int, keys: int) -> str:
        costs = self.costs(queries, keys)
        return "naive" if costs["naive"] < costs["absorbed"] else "absorbed"
