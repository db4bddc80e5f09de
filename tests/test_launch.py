"""`localv3 launch sglang|vllm`: the generated command lines against each engine's documented flags.

The flag tables below were read from the engines' released sources; each maps a flag to
whether it takes a value. The engines' own argument parsers also run where the engine is
importable (skipped otherwise).

SGLang 0.5.23 (the `sglang` wheel on PyPI), started as `python -m sglang.launch_server`:
sglang/srt/arg_groups/fields/model.py (model_path, context_length, trust_remote_code),
fields/parallel.py (tp_size, ep_size, nnodes, node_rank, dist_init_addr: "HOST:PORT"),
fields/serving.py (host, port, served_model_name); arg_groups/arg_utils.py derives each flag
from its field name (`tp_size` -> `--tp-size`), booleans are switches.

vLLM 0.33.0 (the `vllm` wheel on PyPI), started as `vllm serve MODEL`: vllm/engine/arg_utils.py
(--tensor-parallel-size, --pipeline-parallel-size, --enable-expert-parallel, --nnodes,
--node-rank, --master-addr, --master-port, --max-model-len, --served-model-name,
--trust-remote-code), vllm/entrypoints/common/cli_args.py (the model_tag positional,
--headless for the nodes that run no API server, --host, --port).
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import localv3.cli as cli
from localv3.cli import app
from localv3.launch import LaunchError, Topology, box_fit, launch_advice, launch_command, launch_target
from localv3.quantized import Manifest
from localv3.registry import config_for, resolve_model_dir

SGLANG_FLAGS = {
    "--model-path": True,
    "--served-model-name": True,
    "--host": True,
    "--port": True,
    "--tp-size": True,
    "--ep-size": True,
    "--context-length": True,
    "--nnodes": True,
    "--node-rank": True,
    "--dist-init-addr": True,
    "--trust-remote-code": False,
}
VLLM_FLAGS = {
    "--served-model-name": True,
    "--host": True,
    "--port": True,
    "--tensor-parallel-size": True,
    "--pipeline-parallel-size": True,
    "--enable-expert-parallel": False,
    "--max-model-len": True,
    "--nnodes": True,
    "--node-rank": True,
    "--master-addr": True,
    "--master-port": True,
    "--headless": False,
    "--trust-remote-code": False,
}
DOCUMENTED = {"sglang": (SGLANG_FLAGS, 0), "vllm": (VLLM_FLAGS, 2)}  # flags, leading positionals (serve MODEL)


def parsed(engine: str, arguments: tuple[str, ...]) -> dict[str, str | bool]:
    """The arguments read against the documented flags: each known, each value where one is due."""
    flags, positionals = DOCUMENTED[engine]
    values: dict[str, str | bool] = {}
    rest = list(arguments[positionals:])
    while rest:
        flag = rest.pop(0)
        assert flag in flags, f"{flag} is not a documented {engine} flag"
        assert flag not in values, f"{flag} given twice"
        if flags[flag]:
            assert rest and not rest[0].startswith("--"), f"{flag} needs a value"
            values[flag] = rest.pop(0)
        else:
            values[flag] = True
    return values


@pytest.mark.parametrize("gpus, nodes, rank", [(8, 1, 0), (8, 2, 0), (8, 2, 1), (4, 4, 3)])
def test_sglang_shards_over_every_gpu_of_every_node(gpus, nodes, rank):
    topology = Topology(gpus=gpus, nodes=nodes, node_rank=rank, master="10.0.0.1" if nodes > 1 else None)
    command = launch_command("sglang", launch_target("deepseek-v3"), topology, host="0.0.0.0", port=30000, context=32768)
    values = parsed("sglang", command.arguments)
    assert command.shell_line().startswith("python -m sglang.launch_server --model-path deepseek-ai/DeepSeek-V3 ")
    assert values["--tp-size"] == values["--ep-size"] == str(gpus * nodes)
    assert (values["--served-model-name"], values["--host"], values["--port"]) == ("deepseek-v3", "0.0.0.0", "30000")
    assert values["--context-length"] == "32768"
    if nodes > 1:
        assert (values["--nnodes"], values["--node-rank"]) == (str(nodes), str(rank))
        assert values["--dist-init-addr"] == "10.0.0.1:50000"  # the same on every node
    else:
        assert "--nnodes" not in values and "--dist-init-addr" not in values


@pytest.mark.parametrize("gpus, nodes, rank", [(8, 1, 0), (8, 2, 0), (8, 2, 1), (4, 4, 3)])
def test_vllm_keeps_tensor_parallelism_in_a_node_and_pipelines_across_nodes(gpus, nodes, rank):
    topology = Topology(gpus=gpus, nodes=nodes, node_rank=rank, master="head:29600" if nodes > 1 else None)
    command = launch_command("vllm", launch_target("deepseek-r1"), topology, context=16384)
    values = parsed("vllm", command.arguments)
    assert command.arguments[:2] == ("serve", "deepseek-ai/DeepSeek-R1") and command.program == ("vllm",)
    assert values["--tensor-parallel-size"] == str(gpus) and values["--enable-expert-parallel"] is True
    assert values["--max-model-len"] == "16384" and values["--served-model-name"] == "deepseek-r1"
    if nodes > 1:
        assert values["--pipeline-parallel-size"] == values["--nnodes"] == str(nodes)
        assert (values["--node-rank"], values["--master-addr"], values["--master-port"]) == (str(rank), "head", "29600")
        assert values.get("--headless", False) is (rank > 0)
    else:
        assert not {"--pipeline-parallel-size", "--nnodes", "--headless"} & set(values)


def test_a_checkpoint_that_ships_code_is_trusted_and_a_local_one_is_used_in_place():
    kimi = launch_command("sglang", launch_target("kimi-k2-instruct"), Topology(gpus=8, nodes=2, master="h0"))
    assert parsed("sglang", kimi.arguments)["--trust-remote-code"] is True
    tiny = launch_command("vllm", launch_target("tiny"), Topology(gpus=2))
    assert tiny.arguments[1].endswith("assets/tiny") and "--trust-remote-code" not in tiny.arguments


@pytest.mark.parametrize(
    "engine, model, topology, message",
    [
        ("sglang", "deepseek-v3", dict(gpus=6), "does not divide the 128 attention heads"),
        ("vllm", "kimi-k2-instruct", dict(gpus=5), "does not divide"),
        ("sglang", "deepseek-r1-gguf", dict(gpus=8), "GGUF build"),
        ("sglang", "deepseek-v3", dict(gpus=8, context=10**9), "--ctx"),
        ("tensorrt", "deepseek-v3", dict(gpus=8), "unknown engine"),
    ],
)
def test_commands_that_cannot_work_are_refused(engine, model, topology, message):
    context = topology.pop("context", None)
    with pytest.raises(LaunchError, match=message):
        launch_command(engine, launch_target(model), Topology(**topology), context=context)


@pytest.mark.parametrize(
    "topology, message",
    [
        (dict(gpus=8, nodes=2), "--master"),
        (dict(gpus=8, nodes=2, node_rank=2, master="h0"), "--node-rank 2"),
        (dict(gpus=8, nodes=2, master="h0:99999"), "HOST or HOST:PORT"),
        (dict(gpus=0), "at least 1"),
    ],
)
def test_bad_topologies_are_refused(topology, message):
    with pytest.raises(LaunchError, match=message):
        Topology(**topology)


def test_a_localv3_quantised_checkpoint_is_refused(tmp_path):
    model = tmp_path / "deepseek-v3-q4"
    model.mkdir()
    shutil.copy(resolve_model_dir("tiny") / "config.json", model / "config.json")
    Manifest(experts="q4", dense="q8", source={}).write(model)
    with pytest.raises(LaunchError, match="localv3-quantised"):
        launch_target(str(model))


# ----- the command ------------------------------------------------------------------------------
def run_main(monkeypatch, capsys, args: list[str]) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["localv3", *args])
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_dry_run_prints_the_command_on_stdout():
    result = CliRunner().invoke(app, ["launch", "sglang", "deepseek-v3", "--gpus", "8", "--dry-run"])
    expected = launch_command("sglang", launch_target("deepseek-v3"), Topology(gpus=8)).shell_line()
    assert result.exit_code == 0 and result.stdout == expected + "\n"


def test_launch_checks_the_engine_and_the_gpus_then_execs_it(monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, ["launch", "vllm", "deepseek-v3", "--gpus", "8"])
    if code == 1 and "not installed" in err:  # the usual case: no vLLM here
        assert err.count("\n") == 1 and err.startswith("error: vllm is not installed")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: SimpleNamespace(name=name))
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    code, _, err = run_main(monkeypatch, capsys, ["launch", "vllm", "deepseek-v3", "--gpus", "8"])
    assert code == 1 and err == "error: --gpus 8 but this machine shows 4 CUDA GPU(s) (see CUDA_VISIBLE_DEVICES)\n"
    executed = []
    monkeypatch.setattr("torch.cuda.device_count", lambda: 8)
    monkeypatch.setattr("os.execv", lambda path, argv: executed.append(argv) or sys.exit(0))
    code, out, err = run_main(monkeypatch, capsys, ["launch", "vllm", "deepseek-v3", "--gpus", "8"])
    command = launch_command("vllm", launch_target("deepseek-v3"), Topology(gpus=8))
    assert code == 0 and executed == [[sys.executable, "-m", "vllm.entrypoints.cli.main", *command.arguments]]
    assert err.strip() == command.shell_line() and out == ""


# ----- the engines' own parsers, where installed ---------------------------------------------------
def test_sglang_parser_reads_the_command():
    server_args = pytest.importorskip("sglang.srt.server_args")
    topology = Topology(gpus=8, nodes=2, node_rank=1, master="10.0.0.1")
    command = launch_command("sglang", launch_target("deepseek-v3"), topology, context=32768)
    args = server_args.prepare_server_args(list(command.arguments))
    assert (args.tp_size, args.ep_size, args.nnodes, args.node_rank) == (16, 16, 2, 1)
    assert (args.dist_init_addr, args.context_length, args.served_model_name) == ("10.0.0.1:50000", 32768, "deepseek-v3")


def test_vllm_parser_reads_the_command():
    pytest.importorskip("vllm")
    try:
        from vllm.entrypoints.common.cli_args import make_arg_parser  # 0.33
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError as exc:
        pytest.skip(f"vllm is installed but its server parser does not import ({exc})")

    topology = Topology(gpus=8, nodes=2, node_rank=1, master="head:29600")
    command = launch_command("vllm", launch_target("deepseek-v3"), topology, context=16384)
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(list(command.arguments[1:]))
    assert (args.model_tag, args.tensor_parallel_size, args.pipeline_parallel_size) == ("deepseek-ai/DeepSeek-V3", 8, 2)
    assert (args.nnodes, args.node_rank, args.master_addr, args.master_port) == (2, 1, "head", 29600)
    assert args.enable_expert_parallel and args.headless and args.max_model_len == 16384


# ----- does it fit one box? --------------------------------------------------------------------------
@pytest.mark.parametrize("gpu_gib, nodes", [(141, 1), (80, 2), (24, 4)])
def test_deepseek_v3_at_fp8_needs_one_h200_box_two_h100_boxes(gpu_gib, nodes):
    fit = box_fit(config_for("deepseek-v3"), gpus=8, gpu_bytes=gpu_gib << 30, context=8192)
    assert 620 << 30 < fit.weights_bytes < 700 << 30  # 671B parameters at ~1 byte, embeddings in bf16
    assert fit.nodes == nodes


def test_plan_with_gpus_says_when_one_box_is_not_enough():
    small = CliRunner().invoke(app, ["plan", "deepseek-v3", "--profile", "rtx4090-epyc-12ch", "--gpus", "8"])
    assert small.exit_code == 0, small.output
    assert "One box is not enough: 4 nodes" in small.stdout
    assert "localv3 launch sglang deepseek-v3 --gpus 8 --ctx 4096 --nodes 4 --node-rank 0 --master NODE0" in small.stdout  # plan's default context
    large = CliRunner().invoke(app, ["plan", "deepseek-v3", "--gpu-mem", "141GiB", "--gpus", "8", "--json"])
    launch = json.loads(large.stdout)["launch"]
    assert launch["nodes"] == 1 and launch["engine_command"].endswith("--tp-size 8 --ep-size 8 --context-length 4096")


def test_plan_with_gpus_names_what_no_engine_can_serve():
    advice = launch_advice("deepseek-r1-gguf", config_for("deepseek-r1-gguf"), 8, 80 << 30, 8192)
    assert advice.engine_command is None and advice.lines()[-1].startswith("No launch command: deepseek-r1-gguf is a GGUF")
    with pytest.raises(LaunchError, match="--gpu-mem"):
        launch_advice("deepseek-v3", config_for("deepseek-v3"), 8, 0, 8192)
