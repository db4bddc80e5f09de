"""A layout split across two devices: activations cross at its boundaries (localv3.offload.device_hops),
the model code itself never moves them. Here the two devices are `cpu` and `cpu:0`, which torch
tells apart as devices but which share memory: the hooks run on any machine and must leave the
numbers as they are; that a hop is needed where one is added is checked on CUDA (tests marked
gpu in test_runtime.py)."""

from __future__ import annotations

import pytest
import torch

from localv3.config import ModelConfig
from localv3.model.transformer import Transformer
from localv3.synthetic import TINY_V3
from localv3.offload.device_hops import StageDevices, add_device_hops
from localv3.offload.layout import GPU
from localv3.offload.runtime import load_planned
from test_runtime import CONTEXT, FLOAT, PROMPT, TIGHT, made_up_hardware, model_dir, one_thread, reference  # noqa: F401

HOST, OTHER = torch.device("cpu"), torch.device("cpu", 0)


def split_engine(model_dir):
    config = ModelConfig.from_file(model_dir)
    return load_planned(
        model_dir, made_up_hardware(config, FLOAT), CONTEXT, TIGHT, FLOAT, gpu_device=OTHER, dtype=torch.float32, cpu_threads=1
    )


def test_a_split_model_gives_the_unplaced_logits_and_tokens(model_dir, reference):
    _, ref_logits, ref_tokens = reference
    engine = split_engine(model_dir)
    devices = engine.plan.layout.layer_devices
    assert GPU in devices and devices.count(GPU) < len(devices)  # really split
    torch.testing.assert_close(engine.logits(PROMPT), ref_logits, atol=1e-5, rtol=0)
    assert engine.generate(PROMPT, 16) == ref_tokens
    assert engine.generate(PROMPT, 16, speculative=True) == ref_tokens  # the MTP head crosses too


def test_the_split_engine_keeps_each_layers_cache_rows_on_its_device(model_dir):
    engine = split_engine(model_dir)
    expected = [OTHER if d == GPU else HOST for d in engine.plan.layout.layer_devices[: engine.model.num_cache_layers]]
    assert engine.cache_devices == expected


@pytest.mark.parametrize(
    "stages,hooked",
    [
        (StageDevices(HOST, [HOST] * 4, [HOST], HOST), []),
        (StageDevices(OTHER, [OTHER] * 4, [OTHER], OTHER), ["model.embed_tokens"]),
        (StageDevices(OTHER, [OTHER, OTHER, HOST, HOST], [HOST], OTHER), ["model.embed_tokens", "model.layers.2", "model.norm", "mtp.0", "lm_head"]),
        (StageDevices(HOST, [OTHER, HOST, OTHER, HOST], [], HOST), ["model.layers.0", "model.layers.1", "model.layers.2", "model.layers.3"]),
        (StageDevices(OTHER, [OTHER] * 4, [OTHER], HOST), ["model.embed_tokens", "model.norm", "mtp.0", "lm_head"]),
    ],
)
def test_hops_are_added_exactly_where_the_device_changes(stages, hooked):
    config = ModelConfig.from_dict({**TINY_V3, "num_hidden_layers": 4})
    with torch.device("meta"):
        model = Transformer(config, with_mtp=bool(stages.mtp))
    assert add_device_hops(model, stages) == hooked
