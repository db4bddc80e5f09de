"""`localv3 plan MODEL`: where every part of a model would live on this (or a stated) machine,
and how fast it would run. Works from config.json alone, before any download; a GGUF is
planned in the tensor types its file holds."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from localv3.commands.plan_picture import picture
from localv3.config import ModelConfig
from localv3.engines import DEFAULT_MAX_CONTEXT
from localv3.errors import LocalV3Error
from localv3.render import format_bytes, format_count
from localv3.offload.alternatives import Alternative, what_would_change
from localv3.offload.gguf_model import GgufModel, nominal_expert_formats, read_gguf, type_named
from localv3.offload.hardware import Hardware
from localv3.offload.planner import Fix, Plan, PlanError, Policy, layer_ranges, plan
from localv3.offload.profiles import load_profiles
from localv3.offload.quant import ROLE_SCHEMES, Quantization
from localv3.offload.routing_stats import find_profile, load_profile
from localv3.offload.shape import ModelShape
from localv3.offload.stated import StatedHardware, hardware_for
from localv3.offload.units import format_rate

KIND_LABELS = {
    "embedding": "embeddings",
    "attention": "attention (MLA)",
    "norm": "norms",
    "router": "routers",
    "dense_ffn": "dense FFN",
    "shared_expert": "shared experts",
    "routed_expert": "routed experts",
    "lm_head": "lm_head",
    "mtp": "MTP module",
    "kv_cache": "KV cache",
}


def plan_command(
    model: str = typer.Argument(..., help="models.toml name, pulled hub repo id, model directory, or config.json"),
    profile: Optional[str] = typer.Option(
        None, "--profile", help=f"named hardware instead of this machine: {', '.join(load_profiles().machines)}"
    ),
    gpu_mem: Optional[str] = typer.Option(None, "--gpu-mem", help="GPU memory, e.g. 24GiB (0: no GPU)"),
    ram: Optional[str] = typer.Option(None, "--ram", help="RAM, e.g. 512GiB"),
    cpu_bw: Optional[str] = typer.Option(None, "--cpu-bw", help="peak CPU memory bandwidth, e.g. 460GB/s"),
    cpu_flops: Optional[str] = typer.Option(
        None, "--cpu-flops", help="peak CPU FLOP/s, e.g. 7.4TFLOPS (default: the hardware class's per core, times --cores)"
    ),
    gpu_bw: Optional[str] = typer.Option(None, "--gpu-bw", help="peak GPU memory bandwidth, e.g. 1008GB/s"),
    pcie: Optional[str] = typer.Option(None, "--pcie", help="PCIe rate per direction, e.g. 25GB/s"),
    cores: Optional[int] = typer.Option(None, "--cores", help="physical CPU cores (scales the CPU's FLOP/s)"),
    context: Optional[int] = typer.Option(
        None, "--context", help=f"tokens of KV cache to plan for (default {DEFAULT_MAX_CONTEXT}, as run and chat hold; at most the model's)"
    ),
    experts: Optional[str] = typer.Option(
        None,
        "--experts",
        help=f"routed experts: {', '.join(ROLE_SCHEMES['experts'])} (default: as a localv3 checkpoint or GGUF stores them, else q4)",
    ),
    dense: Optional[str] = typer.Option(
        None,
        "--dense",
        help=f"attention, dense FFN, shared experts: {', '.join(ROLE_SCHEMES['dense'])} (default: as stored, else q8)",
    ),
    embeddings: Optional[str] = typer.Option(
        None, "--embeddings", help=f"embeddings and lm_head: {', '.join(ROLE_SCHEMES['embeddings'])} (default: as stored, else bf16)"
    ),
    cpu_moe: bool = typer.Option(False, "--cpu-moe", help="keep every routed expert off the GPU"),
    n_cpu_moe: Optional[int] = typer.Option(
        None, "--n-cpu-moe", help="routed experts of layers < N in RAM, of the other layers on the GPU"
    ),
    gpu_experts: Optional[int] = typer.Option(
        None, "--gpu-experts", help="the N hottest routed experts of every MoE layer on the GPU"
    ),
    mtp: bool = typer.Option(True, "--mtp/--no-mtp", help="place the MTP module (speculative decoding)"),
    disk: bool = typer.Option(True, "--disk/--no-disk", help="let experts that do not fit in RAM be read from disk"),
    routing_profile: Optional[Path] = typer.Option(
        None, "--routing-profile", help="routing counts recorded by a run (default: the model's own, when it has one)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
    gpus: Optional[int] = typer.Option(
        None, "--gpus", min=1, help="GPUs per box: say how many such boxes SGLang/vLLM need and print the launch command"
    ),
) -> None:
    """Plan where each part of MODEL lives (GPU, RAM, disk) and predict its speed."""
    stated = StatedHardware.from_text(
        gpu_mem=gpu_mem, ram=ram, cpu_bw=cpu_bw, cpu_flops=cpu_flops, gpu_bw=gpu_bw, pcie=pcie, cores=cores
    )
    source = _plan_source(model)
    model_dir = source.model_dir
    shape = ModelShape.from_config(source.config, source.name)
    quant = _planned_quantization(source, shape, {"experts": experts, "dense": dense, "embeddings": embeddings})
    hardware = hardware_for(profile, stated)
    profile_path = routing_profile or find_profile(model_dir)
    policy = Policy(
        cpu_moe=cpu_moe,
        n_cpu_moe=n_cpu_moe,
        gpu_experts=gpu_experts,
        include_mtp=mtp and source.runs_mtp,
        allow_disk=disk,
        routing_profile=load_profile(profile_path) if profile_path else None,
    )
    tokens = context if context is not None else min(DEFAULT_MAX_CONTEXT, shape.max_position_embeddings)
    _report_hardware(hardware)
    for note in source.notes:
        print(note, file=sys.stderr)
    if profile_path:
        print(f"routing profile: {profile_path}", file=sys.stderr)
    try:
        result = plan(shape, quant, hardware, tokens, policy)
    except PlanError as error:
        raise LocalV3Error(error.render(PLAN_FLAGS, _plan_fix)) from None
    alternatives = what_would_change(result, shape, policy)
    advice = _launch_advice(model, source, hardware, gpus, tokens) if gpus else None
    if as_json:
        launch = {"launch": advice.to_dict()} if advice else {}
        print(json.dumps({**result.to_dict(), "what_would_change": [a.to_dict() for a in alternatives], **launch}))
        return
    render_plan(result, shape, alternatives, Console(file=sys.stdout))
    for line in advice.lines() if advice else []:
        print(line)


def _launch_advice(model: str, source: PlanSource, hardware: Hardware, gpus: int, tokens: int):
    """`--gpus N`: the model on boxes of N of this hardware's GPUs under SGLang/vLLM (localv3.launch)."""
    from localv3.launch import launch_advice

    return launch_advice(model, source.config, gpus, hardware.gpu_mem_bytes, tokens)


@dataclass(frozen=True)
class PlanSource:
    """What is planned: a configuration, the model's name and local directory, and the tensor
    types a GGUF fixes (its own, or those its models.toml entry names before it is pulled)."""

    config: ModelConfig
    name: str
    model_dir: Path | None
    gguf: GgufModel | None = None
    nominal_experts: str | None = None  # a GGUF entry not pulled yet: the ggml type of its precision
    notes: tuple[str, ...] = ()

    @property
    def runs_mtp(self) -> bool:
        """The llama.cpp engine, which runs GGUFs, has no MTP speculation."""
        return self.gguf is None and self.nominal_experts is None


def _planned_quantization(source: PlanSource, shape: ModelShape, stated: dict[str, str | None]) -> Quantization:
    """The schemes stated, else what the model's files store (a localv3 checkpoint's schemes,
    a GGUF's tensor types), else q4 experts and q8 dense weights (`localv3 quantize`'s default)."""
    for role, name in stated.items():
        if name is not None and name not in ROLE_SCHEMES[role]:
            raise PlanError(f"unknown quantisation {name!r} for --{role}; choose one of {', '.join(ROLE_SCHEMES[role])}")
    quant = Quantization()
    if source.gguf is not None:
        quant = replace(quant, stored=source.gguf.stored_formats(shape))
    elif source.nominal_experts is not None:
        quant = replace(quant, stored=nominal_expert_formats(shape, source.nominal_experts))
    elif source.model_dir is not None:
        from localv3.quantized import read_manifest

        manifest = read_manifest(source.model_dir)
        quant = Quantization(experts=manifest.experts, dense=manifest.dense) if manifest else quant
    for role, name in stated.items():
        quant = quant.with_scheme(role, name) if name is not None else quant
    return quant


def _plan_source(spec: str) -> PlanSource:
    """A config.json or .gguf path, a model directory, or anything the registry resolves."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _gguf_source(path)
    if path.is_file():
        name = path.parent.resolve().name if path.name == "config.json" else path.stem
        return PlanSource(ModelConfig.from_file(path), name, path.parent)
    from localv3.registry import config_for, find_model

    local = path if path.is_dir() else _downloaded_dir(spec)
    name = path.resolve().name if path.is_dir() else spec
    if local is not None and not (local / "config.json").is_file() and any(local.glob("*.gguf")):
        from localv3.engine_choice import find_gguf

        return replace(_gguf_source(find_gguf(str(local))), name=name)
    entry = find_model(spec)
    nominal = type_named(entry.precision) if entry is not None and entry.format == "gguf" and local is None else None
    notes = ()
    if nominal is not None:
        notes = (
            f"{spec} is not downloaded: its routed experts are planned as {nominal} (its precision, {entry.precision}), "
            f"the rest as q8; pull it to plan the file's own tensor types",
        )
    return PlanSource(config_for(spec), name, local, nominal_experts=nominal, notes=notes)


def _gguf_source(path: Path) -> PlanSource:
    gguf = read_gguf(path)
    return PlanSource(gguf.config, gguf.name, path.parent, gguf=gguf)


def _downloaded_dir(spec: str) -> Path | None:
    """Where a registry name or hub repo id is downloaded (its routing profile lives there), if it is."""
    from localv3.registry import resolve_model_path

    try:
        return resolve_model_path(spec, offline=True)
    except LocalV3Error:
        return None


def _report_hardware(hardware: Hardware) -> None:
    print(f"hardware ({hardware.source}): {hardware.describe()}", file=sys.stderr)
    for figure, basis in hardware.basis.items():
        print(f"  {figure}: {basis}", file=sys.stderr)


# ----- tables --------------------------------------------------------------------------------
# the planner's settings as this command's flags
PLAN_FLAGS = {
    "context": "--context",
    "experts": "--experts",
    "dense": "--dense",
    "embeddings": "--embeddings",
    "cpu_moe": "--cpu-moe",
    "n_cpu_moe": "--n-cpu-moe",
    "gpu_experts": "--gpu-experts",
}


def _plan_fix(fix: Fix) -> str:
    return "experts spilling to disk (drop --no-disk)" if fix.setting == "allow_disk" else fix.describe()


def render_plan(result: Plan, shape: ModelShape, alternatives: tuple[Alternative, ...], console: Console) -> None:
    quant = ", ".join(
        f"{role} {name} ({result.bits_per_weight[role]:.3g} bits)" for role, name in result.quantization.to_dict().items()
    )
    params = result.parameters
    console.print(
        f"[bold]{result.model}[/bold] ({format_count(params.total)} parameters, {format_count(params.active)} active): "
        f"{quant}; {result.hardware.describe()}",
        soft_wrap=True,
        highlight=False,
    )
    console.print(_groups_table(result, shape))
    console.print(_kv_table(result))
    console.print(_prediction_table(result))
    for note in result.notes:
        console.print(f"- {note}", soft_wrap=True)
    for line in picture(result, alternatives):
        console.print(line, soft_wrap=True, highlight=False)
    console.print(result.summary(), soft_wrap=True, highlight=False)


def _groups_table(result: Plan, shape: ModelShape) -> Table:
    rows: dict[tuple[str, str], dict] = {}
    for g in result.groups:
        label = KIND_LABELS[g.kind]
        if shape.is_mtp_layer(g.layer) and g.kind != "kv_cache":
            label = "MTP routed experts" if g.kind == "routed_expert" else KIND_LABELS["mtp"]
        row = rows.setdefault((label, g.device), {"count": 0, "layers": set(), "bytes": 0})
        row["count"] += len(g.experts) if g.experts is not None else 1
        row["bytes"] += g.bytes
        if g.layer is not None:
            row["layers"].add(g.layer)
    table = Table(title="placement")
    for column in ("part", "device", "count", "layers"):
        table.add_column(column)
    table.add_column("bytes", justify="right")
    for (label, device), row in rows.items():
        table.add_row(label, device, f"{row['count']:,}", layer_ranges(sorted(row["layers"])), format_bytes(row["bytes"]))
    return table


def _kv_table(result: Plan) -> Table:
    kv = result.kv_cache
    table = Table(title="KV cache (latent, bf16)")
    for column in ("per token", "context", "reserved", "on", "max context"):
        table.add_column(column, justify="right")
    where = ", ".join(f"{device} {format_bytes(n)}" for device, n in kv.device_bytes.items())
    table.add_row(format_bytes(kv.bytes_per_token), f"{kv.context:,}", format_bytes(kv.bytes), where, f"{kv.max_context:,}")
    return table


def _prediction_table(result: Plan) -> Table:
    p = result.predicted
    table = Table(title=f"predicted (roofline; decode with {p.context:,} cached tokens, prefill in chunks of {p.prefill_chunk})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("decode", f"{p.decode_tok_s:.2f} tok/s")
    table.add_row("prefill", f"{p.prefill_tok_s:.0f} tok/s")
    table.add_row("bottleneck", p.bottleneck)
    for resource, seconds in sorted(p.decode_seconds.items(), key=lambda item: -item[1]):
        table.add_row(f"  {resource}", f"{seconds * 1e3:.1f} ms/token")
    if p.decode_tok_s_all_in_ram is not None:
        table.add_row("decode with every expert in RAM", f"{p.decode_tok_s_all_in_ram:.2f} tok/s")
    if p.mtp_decode_tok_s is not None:
        table.add_row(f"decode with MTP ({p.mtp_acceptance:.0%} accepted)", f"{p.mtp_decode_tok_s:.2f} tok/s")
    hw = result.hardware
    rates = [f"CPU {format_rate(hw.effective('cpu_bw'))}"]
    if hw.has_gpu:
        rates = [f"GPU {format_rate(hw.effective('gpu_bw'))}"] + rates + [f"PCIe {format_rate(hw.effective('pcie_bw'))}"]
    table.add_row("achievable rates used", ", ".join(rates))
    return table


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_command)
