"""Routing statistics: how many tokens each MoE layer sent to each routed expert.

An engine loaded with routing recorded (the CLI's) counts every router's choices and saves them
after each generation (`RoutingStats.save`) as a routing profile: JSON with `format`, `model`,
`n_routed_experts` and `layers` ({layer: [count per expert]}), in the localv3 home
(`$LOCALV3_HOME`, else `~/.localv3`) as `profiles/<name>.json`, <name> being the model
directory's name or, for a Hugging Face cache snapshot, its repository's folder. The model's
own directory is never written: it may be a hub snapshot or the installed package.

A profile shipped next to a model (`<model dir>/routing_profile.json`) is read before the
recorded one, by the planner and as a run's starting counts. A run saves the counts it started
from plus its own: without a shipped profile counts accumulate over runs; with one, the saved
file holds the shipped counts plus the last run's. The planner reads a profile as
`Policy.routing_profile` ({MoE layer: [count per expert]}) to pick the hottest experts for
spare VRAM.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from localv3.errors import LocalV3Error
from localv3.files import write_text_atomic

if TYPE_CHECKING:  # `localv3 plan` reads profiles without importing torch
    import torch

    from localv3.model.moe import MoE
    from localv3.model.transformer import Transformer

PROFILE_FILE = "routing_profile.json"
FORMAT = "localv3-routing-profile"


class RoutingProfileError(LocalV3Error):
    """A routing profile file that cannot be read."""


def moe_layers(model: Transformer) -> Iterator[tuple[int, MoE]]:
    """(layer index as the checkpoint numbers it, MoE module) for the main and the MTP layers."""
    from localv3.model.moe import MoE  # torch; this module is read by the planner too

    blocks = list(model.model.layers) + [head.block for head in model.mtp]
    for layer, block in enumerate(blocks):
        if isinstance(block.mlp, MoE):
            yield layer, block.mlp


@dataclass
class RoutingStats:
    n_experts: int
    previous: dict[int, list[int]] = field(default_factory=dict)  # counts saved by earlier runs
    counts: dict[int, torch.Tensor] = field(default_factory=dict)  # this run: layer -> int64 [E], on the layer's device

    def record(self, layer: int, indices: torch.Tensor) -> None:
        """indices [T, k]: the experts chosen for each token (no host sync: counts stay on device)."""
        chosen = indices.flatten().bincount(minlength=self.n_experts)  # [E]
        self.counts[layer] = self.counts[layer] + chosen if layer in self.counts else chosen

    def attach(self, model: Transformer) -> None:
        """Observe every router's choices."""
        for layer, moe in moe_layers(model):
            moe.routing_observers.append(functools.partial(self.record, layer))

    def profile(self) -> dict[int, list[int]]:
        """{MoE layer: tokens routed to each expert}, earlier runs included."""
        merged = {layer: list(counts) for layer, counts in self.previous.items()}
        for layer, counts in self.counts.items():
            base = merged.get(layer, [0] * self.n_experts)
            merged[layer] = [a + b for a, b in zip(base, counts.tolist())]
        return dict(sorted(merged.items()))

    def save(self, model_dir: Path) -> Path:
        """Write the profile into the localv3 home (never into the model's own directory, which may
        be a hub cache snapshot or the installed package); -> the file written."""
        data = {
            "format": FORMAT,
            "model": profile_key(model_dir),
            "n_routed_experts": self.n_experts,
            "layers": {str(layer): counts for layer, counts in self.profile().items()},
        }
        text = json.dumps(data, indent=1) + "\n"
        return write_text_atomic(profile_paths(model_dir)[1], text)

    @classmethod
    def resume(cls, model_dir: Path, n_experts: int) -> RoutingStats:
        """Stats that continue the model's saved profile (when it matches the expert count)."""
        path = find_profile(model_dir)
        previous = load_profile(path) if path else {}
        if any(len(counts) != n_experts for counts in previous.values()):
            previous = {}
        return cls(n_experts, previous)


def profile_key(model_dir: Path) -> str:
    """The model's name for the profiles folder: the directory's name, or for a Hugging Face
    cache snapshot (`models--owner--name/snapshots/<revision>`) the repository's folder."""
    model_dir = Path(model_dir).resolve()
    return model_dir.parent.parent.name if model_dir.parent.name == "snapshots" else model_dir.name


def profile_paths(model_dir: Path) -> tuple[Path, Path]:
    """(shipped next to the model, recorded in the localv3 home), in the order they are read."""
    from localv3.registry import localv3_home

    return Path(model_dir) / PROFILE_FILE, localv3_home() / "profiles" / f"{profile_key(model_dir)}.json"


def find_profile(model_dir: Path | None) -> Path | None:
    if model_dir is None:
        return None
    return next((path for path in profile_paths(model_dir) if path.is_file()), None)


def load_profile(path: Path) -> dict[int, list[int]]:
    """A saved profile as Policy.routing_profile wants it: {MoE layer: [count per expert]}."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        profile = {int(layer): [int(c) for c in counts] for layer, counts in data["layers"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RoutingProfileError(f"{path}: unreadable routing profile ({exc})") from None
    return profile
