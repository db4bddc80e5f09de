"""`localv3 plan MODEL`: where every part of a model would live on this (or a stated) machine,
and how fast it would run. Works from config.json alone, before any download."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from localv3.config import ModelConfig
from localv3.errors import LocalV3Error
from localv3.render import format_bytes
from offload.hardware import Hardware, StatedHardware, detect_hardware, hardware_from_profile
from offload.planner import Plan, Policy, layer_ranges, plan
from offload.profiles import load_profiles
from offload.quant import Quantization, scheme
from offload.routing_stats import find_profile, load_profile
from offload.shape import ModelShape
from offload.units import format_rate

DEFAULT_CONTEXT = 8192
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
    gpu_bw: Optional[str] = typer.Option(None, "--gpu-bw", help="peak GPU memory bandwidth, e.g. 1008GB/s"),
    pcie: Optional[str] = typer.Option(None, "--pcie", help="PCIe rate per direction, e.g. 25GB/s"),
    cores: Optional[int] = typer.Option(None, "--cores", help="physical CPU cores"),
    context: Optional[int] = typer.Option(
        None, "--context", help=f"tokens of KV cache to plan for (default {DEFAULT_CONTEXT}, at most the model's)"
    ),
    experts: Optional[str] = typer.Option(
        None, "--experts", help="routed experts: q4, q8, fp8, bf16 (default: as a localv3 checkpoint stores them, else q4)"
    ),
    dense: Optional[str] = typer.Option(
        None, "--dense", help="attention, dense FFN, shared experts: q4, q8, fp8, bf16 (default: as stored, else q8)"
    ),
    embeddings: Optional[str] = typer.Option(None, "--embeddings", help="embeddings and lm_head: bf16, fp8 (default bf16)"),
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
) -> None:
    """Plan where each part of MODEL lives (GPU, RAM, disk) and predict its speed."""
    config, name, model_dir = _model_config(model)
    shape = ModelShape.from_config(config, name)
    stated = StatedHardware.from_text(gpu_mem, ram, cpu_bw, gpu_bw, pcie, cores)
    hardware = stated.apply(hardware_from_profile(profile) if profile else detect_hardware(model_dir))
    quant = _planned_quantization(model_dir, experts, dense, embeddings)
    profile_path = routing_profile or find_profile(model_dir)
    policy = Policy(
        cpu_moe=cpu_moe,
        n_cpu_moe=n_cpu_moe,
        gpu_experts=gpu_experts,
        include_mtp=mtp,
        allow_disk=disk,
        routing_profile=load_profile(profile_path) if profile_path else None,
    )
    tokens = context if context is not None else min(DEFAULT_CONTEXT, shape.max_position_embeddings)
    _report_hardware(hardware)
    if profile_path:
        print(f"routing profile: {profile_path}", file=sys.stderr)
    result = plan(shape, quant, hardware, tokens, policy)
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    render_plan(result, shape, Console(file=sys.stdout))


def _planned_quantization(model_dir: Path | None, experts: str | None, dense: str | None, embeddings: str | None) -> Quantization:
    """The schemes stated, else what a localv3 checkpoint stores (what the engine will load),
    else q4 experts and q8 dense weights (what `localv3 quantize` writes by default)."""
    from localv3.quantized import read_manifest

    manifest = read_manifest(model_dir) if model_dir is not None else None
    stored = Quantization(experts=manifest.experts, dense=manifest.dense) if manifest else Quantization()
    return Quantization(
        experts=experts or stored.experts, dense=dense or stored.dense, embeddings=embeddings or stored.embeddings
    )


def _model_config(spec: str) -> tuple[ModelConfig, str, Path | None]:
    """(config, display name, local model directory or None) for a config.json path or anything
    the registry resolves."""
    path = Path(spec).expanduser()
    if path.is_file():
        name = path.parent.resolve().name if path.name == "config.json" else path.stem
        return ModelConfig.from_file(path), name, path.parent
    from localv3.registry import config_for

    local = path if path.is_dir() else _downloaded_dir(spec)
    return config_for(spec), path.resolve().name if path.is_dir() else spec, local


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
def render_plan(result: Plan, shape: ModelShape, console: Console) -> None:
    quant = ", ".join(
        f"{role} {name} ({scheme(name).bits_per_weight:.3g} bits)" for role, name in result.quantization.to_dict().items()
    )
    console.print(
        f"[bold]{result.model}[/bold] ({shape.total_elements / 1e9:.1f}B parameters): {quant}; "
        f"{result.hardware.describe()}",
        soft_wrap=True,
    )
    console.print(_groups_table(result, shape))
    console.print(_devices_table(result))
    console.print(_kv_table(result))
    console.print(_prediction_table(result))
    for note in result.notes:
        console.print(f"- {note}", soft_wrap=True)
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


def _devices_table(result: Plan) -> Table:
    table = Table(title="devices")
    table.add_column("device")
    table.add_column("hardware")
    for column in ("capacity", "reserved", "used", "free"):
        table.add_column(column, justify="right")
    for d in result.devices:
        capacity = "-" if d.capacity_bytes is None else format_bytes(d.capacity_bytes)
        free = "-" if d.free_bytes is None else format_bytes(d.free_bytes)
        table.add_row(d.name, d.label, capacity, format_bytes(d.reserved_bytes), format_bytes(d.used_bytes), free)
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
