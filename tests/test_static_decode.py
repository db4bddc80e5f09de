"""The static-shape decode step (localv3.offload.static_decode): its logits equal the dynamic
path's at every step, across capacity buckets and rollbacks, in three planned layouts with the
"GPU" being the CPU device (segments run eagerly over the same static buffers a CUDA graph
captures); the CUDA capture itself is checked where there is a GPU.

Measured (fp32, seeds 0-2, every layout, 24 steps): the static step's logits (up to ~3 in size) differ
from the dynamic path's by at most 2.3e-6 (masked keys and gathered experts sum in another order);
asserted <= 1e-5.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import localv3
from cli_entry import one_error_line, run_main
from localv3.config import ModelConfig
from localv3.engines.native import NativeSession
from localv3.model.moe import DenseExpertBank
from localv3.offload.decode_segments import HostCall
from localv3.offload.layout import CPU, GPU
from localv3.offload.planner import Policy
from localv3.offload.quant import Quantization
from localv3.offload.routing_stats import RoutingStats
from localv3.offload.runtime import load_planned
from localv3.offload.static_decode import StaticDecoding, capacity_bucket
from localv3.synthetic import TINY_V3, write_checkpoint
from test_runtime import CONTEXT, TIGHT, made_up_hardware

FLOAT = Quantization(experts="fp32", dense="fp32", embeddings="fp32")
PROMPT = [5, 9, 17, 3, 40, 41, 2, 77, 12, 30]  # 10 tokens: decoding crosses the 16- and 32-row buckets
CAPACITY = 64
MIN_KEYS = 8
SEEDS = [0, 1, 2]
LAYOUTS = ["gpu", "hybrid", "mixed"]


@pytest.fixture(scope="module", params=SEEDS)
def model_dir(request, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return write_checkpoint(out, TINY_V3, seed=request.param, dtype=torch.float32)


@pytest.fixture(autouse=True)
def one_thread_and_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALV3_HOME", str(tmp_path / "home"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hardware_for(layout: str, config: ModelConfig):
    """gpu: everything fits the (CPU-device) GPU; hybrid: every layer on it, every routed expert
    in RAM; mixed: layers 0-1 on it with some of their experts, layer 2 and the rest in RAM or on disk."""
    if layout == "mixed":
        return made_up_hardware(config, FLOAT), TIGHT
    roomy = replace(made_up_hardware(config, FLOAT), gpu_mem_bytes=1 << 34, gpu_free_bytes=1 << 34)
    return roomy, replace(TIGHT, cpu_moe=layout == "hybrid")


def engine_for(model_dir: Path, layout: str, **kwargs):
    config = ModelConfig.from_file(model_dir)
    hardware, policy = hardware_for(layout, config)
    engine = load_planned(
        model_dir, hardware, CONTEXT, policy, FLOAT, gpu_device="cpu", dtype=torch.float32, cpu_threads=1,
        cuda_graphs=True, **kwargs,
    )  # fmt: skip
    engine.static_decoding = replace(engine.static_decoding, min_keys=MIN_KEYS)
    return engine


def sessions(engine) -> tuple[NativeSession, NativeSession]:
    """(dynamic, static) sessions of one engine, prefilled with PROMPT."""
    dynamic = NativeSession(engine.model, CAPACITY, engine.cache_devices)
    static = engine.new_session(CAPACITY)
    for session in (dynamic, static):
        session.prefill(PROMPT)
    return dynamic, static


def decode_both(dynamic, static, first_token: int, steps: int) -> tuple[list[int], list[int]]:
    """Greedy decoding in both sessions, each on its own argmax; the logits compared every step."""
    tokens = {id(dynamic): first_token, id(static): first_token}
    emitted = {id(dynamic): [], id(static): []}
    for _ in range(steps):
        logits = {}
        for session in (dynamic, static):
            logits[id(session)] = session.decode(tokens[id(session)])
            tokens[id(session)] = int(logits[id(session)].argmax())
            emitted[id(session)].append(tokens[id(session)])
        torch.testing.assert_close(logits[id(static)], logits[id(dynamic)], atol=1e-5, rtol=0)
    return emitted[id(dynamic)], emitted[id(static)]


def test_capacity_buckets_are_powers_of_two_within_the_cache():
    assert [capacity_bucket(n, 64, 8) for n in (1, 8, 9, 16, 17, 33, 64)] == [8, 8, 16, 16, 32, 64, 64]
    assert capacity_bucket(5, 6, 8) == 6  # never beyond the cache
    assert capacity_bucket(300, 4096, 256) == 512


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_layouts_are_what_they_say(model_dir, layout):
    engine = engine_for(model_dir, layout)
    devices, config = engine.plan.layout, engine.config
    moe = range(config.first_k_dense_replace, config.num_hidden_layers)
    program = engine.new_session(CAPACITY).static.program
    host_calls = sum(isinstance(item, HostCall) for item in program.items)
    if layout == "gpu":
        assert all(not devices.experts_on(i, CPU) for i in moe) and host_calls == 0
    elif layout == "hybrid":
        assert all(devices.layer_devices[i] == GPU and not devices.experts_on(i, GPU) for i in moe)
        assert host_calls == len(moe)
    else:
        assert devices.layer_devices[1] == GPU and devices.experts_on(1, GPU) and devices.experts_on(1, CPU)
        assert devices.layer_devices[2] == CPU and host_calls == 1  # layer 2 runs whole, in a host segment
    assert "static decode, not captured" in engine.placement


@pytest.mark.parametrize("layout", LAYOUTS)
def test_static_steps_equal_the_dynamic_path_across_buckets(model_dir, layout):
    engine = engine_for(model_dir, layout)
    dynamic, static = sessions(engine)
    ours, theirs = decode_both(dynamic, static, 7, steps=24)  # positions 10..33: buckets 16, 32, 64
    assert ours == theirs
    assert static.position == dynamic.position == len(PROMPT) + 24
    torch.testing.assert_close(static.last_hidden, dynamic.last_hidden, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["hybrid", "mixed"])
def test_cache_rows_are_written_at_the_position(model_dir, layout):
    engine = engine_for(model_dir, layout)
    dynamic, static = sessions(engine)
    decode_both(dynamic, static, 7, steps=12)
    end = static.position
    for layer in range(engine.config.num_hidden_layers):
        for rows in ("latent", "rope_key"):
            ours, theirs = getattr(static.cache, rows)[layer], getattr(dynamic.cache, rows)[layer]
            torch.testing.assert_close(ours[:, :end], theirs[:, :end], atol=1e-5, rtol=0)
            assert not ours[:, end:].any()  # nothing written past the position


@pytest.mark.parametrize("layout", ["gpu", "hybrid"])
def test_rollback_then_continuing_still_matches(model_dir, layout):
    engine = engine_for(model_dir, layout)
    dynamic, static = sessions(engine)
    decode_both(dynamic, static, 7, steps=12)  # into the 32-row bucket
    for session in (dynamic, static):
        session.rollback(8)  # back into the 16-row bucket, stale rows left behind
    ours, theirs = decode_both(dynamic, static, 11, steps=10)
    assert ours == theirs and static.token_ids == dynamic.token_ids


def test_routing_statistics_see_the_static_steps(model_dir):
    """The split MoE layers tell their routing observers after the step: the statistics still see every choice."""
    engine = engine_for(model_dir, "hybrid", record_routing=True)
    counts = []
    for session in sessions(engine):
        engine.routing.counts = {}
        for token in (7, 11, 13, 7, 2, 5):
            session.decode(token)
        counts.append(engine.routing.counts)
    assert sorted(counts[1]) == sorted(counts[0]) == [1, 2]
    for layer, expected in counts[0].items():
        assert torch.equal(counts[1][layer], expected) and int(expected.sum()) == 6 * 2


def test_generation_through_the_api_equals_plain_decoding(model_dir):
    config = ModelConfig.from_file(model_dir)
    hardware, policy = hardware_for("hybrid", config)
    common = dict(hardware=hardware, policy=policy, quantization=FLOAT, cpu_threads=1)
    plain = localv3.load(model_dir, "cpu", torch.float32, CONTEXT, **common)
    static = localv3.load(model_dir, "cpu", torch.float32, CONTEXT, cuda_graphs=True, **common)
    assert static.static_decoding is not None and plain.static_decoding is None
    assert static.generate(PROMPT, 20) == plain.generate(PROMPT, 20, speculative=False)


# ----- the CLI flag --------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["run", "tiny", "Hi"], ["chat", "tiny", "Hi"], ["bench", "-p", "4", "-n", "4"]])
def test_the_flag_needs_a_cuda_device(command, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run_main(monkeypatch, capsys, [*command, "--cuda-graphs"])
    assert code == 1 and out == ""
    assert one_error_line(err) == "error: --cuda-graphs needs a CUDA device, and torch sees none here"


def test_the_flag_is_refused_for_the_llama_cpp_engine(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    code, _, err = run_main(monkeypatch, capsys, ["run", "tiny", "Hi", "--cuda-graphs", "--engine", "llama.cpp"])
    assert code == 1 and "--cuda-graphs is an option of the native engine" in one_error_line(err)


def test_the_flag_reaches_the_engine_and_answers_the_same(monkeypatch, capsys, chat_model_dir):
    """With a CUDA device (stood in for: the plan's GPU part stays on the CPU device, so nothing
    is captured) `run --cuda-graphs` decodes through the static step and answers as without it."""
    from localv3.offload import runtime

    opened = []
    real_load = runtime.load_planned
    def on_the_cpu_device(*args, **kwargs):
        opened.append(kwargs)
        return real_load(*args, **{**kwargs, "gpu_device": "cpu"})

    monkeypatch.setattr(runtime, "load_planned", on_the_cpu_device)
    answers = []
    for flags in ([], ["--cuda-graphs"]):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        args = ["run", str(chat_model_dir), "Hello", "-n", "12", "--no-mtp", "--temp", "0", *flags]
        code, out, err = run_main(monkeypatch, capsys, args)
        assert code == 0, err
        answers.append(out)
    assert [k["cuda_graphs"] for k in opened] == [False, True] and answers[1] == answers[0]


# ----- CUDA: the capture itself ---------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["gpu", "hybrid"])
def test_cuda_graphs_replay_what_the_eager_segments_compute(model_dir, layout):
    config = ModelConfig.from_file(model_dir)
    hardware, policy = hardware_for(layout, config)
    engine = load_planned(
        model_dir, hardware, CONTEXT, policy, FLOAT, gpu_device="cuda", dtype=torch.float32, cpu_threads=1,
        cuda_graphs=True,
    )  # fmt: skip
    captured = replace(engine.static_decoding, min_keys=MIN_KEYS)
    assert captured.capture and "CUDA graphs" in engine.placement
    eager = replace(captured, capture=False)
    sessions_of = []
    for decoding in (eager, captured):
        engine.static_decoding = decoding
        session = engine.new_session(CAPACITY)
        session.prefill(PROMPT)
        sessions_of.append(session)
    dynamic = NativeSession(engine.model, CAPACITY, engine.cache_devices)
    dynamic.prefill(PROMPT)
    token = 7
    for _ in range(24):
        logits = [s.decode(token) for s in (*sessions_of, dynamic)]
        torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[1], logits[2], atol=1e-4, rtol=1e-4)
        token = int(logits[2].argmax())
    assert sessions_of[1].static.player.buckets == [16, 32, 64]
