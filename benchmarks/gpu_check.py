"""The GPU path, checked end to end on a DeepSeek-V3-width slice in a few minutes.

What it checks, on one random checkpoint with DeepSeek-V3's exact widths (hidden 7168, 128 heads,
q_lora 1536, kv_lora 512, nope 128 + rope 64, v 128, dense FFN 18432, expert FFN 2048, YaRN as V3)
but few layers (default 3: 1 dense + 2 MoE), few routed experts (default 32, top-8 of 4 groups /
2, 1 shared expert) and a 2048-token vocabulary, stored in bf16 (localv3.synthetic's streaming
writer, shards of ~1 GiB):

1. `cpu`: `localv3.offload.runtime.load_planned` for a machine without a GPU, fp32: the reference.
2. `hybrid`: the same for a machine stating the real GPU (its memory) and this host's RAM, with
   every routed expert kept in RAM (Policy.cpu_moe): attention, dense FFN, shared experts, norms,
   router, embeddings and lm_head on the GPU, routed experts computed by the CPU; bf16.
3. `gpu`: everything on the GPU (routed experts too), bf16, when the planner says it fits.
Then, on the `hybrid` engine, its decode steps with CUDA graphs (localv3.offload.static_decode;
its CPU-device form with --device cpu): a session prefilled as the timed one, two untimed steps
(the capture), then the same greedy decode timed; and its logits step by step against the same
engine's dynamic decode fed the same tokens (relative RMS, top-1, max |difference|: both bf16,
summed in other orders, so only roughly equal; PASS needs finite logits and top-1 >= --min-top1).
Each planned layout is checked before building. For 2 and 3: the logits of a 32-token prompt
against the reference (relative RMS error, top-1 agreement, finite), then prefill (128 tokens)
and greedy decode (32 tokens) speed through the engine's session API, with
torch.cuda.synchronize() around each timing (after a short warm-up). bf16 against fp32 is only
roughly equal: PASS needs finite logits and top-1 agreement >= --min-top1 (default 0.8), and
every run that should happen to happen within its time limit. The exit status is 0 on PASS, 1 on
FAIL, 2 when the check could not start.

Run it on a CUDA machine (one H200, 16 cores: expected ~1-3 minutes, most of it writing the 3.9B-
parameter slice and building the fp32 CPU reference; not yet measured there):

    python benchmarks/gpu_check.py [--work DIR] [--layers 3] [--experts 32] [--mtp]
        [--prompt 32] [--prefill 128] [--decode 32] [--threads N] [--budget 290]

`--device cpu` runs the same checks with the CPU device as the "GPU" (the planner is told of a
GPU; the runtime puts its parts on the CPU device): on 2 cores `--layers 2 --experts 16
--prefill 64 --decode 16` takes ~3 minutes (45 s of it writing the 1.5B-parameter slice).
`--without-llama-cpp` makes `llama_cpp` unimportable first, as on a machine without
llama-cpp-python. psutil, tokenizers and jinja2 are optional here: when one is missing, an
import-time stand-in takes its place (this check uses no tokenizer and no probe).

Progress goes to stderr with timestamps; stdout gets a table and one JSON line, which is also
written to $OUT/gpu_check.json when OUT is set. Each phase runs under a time limit (SIGALRM),
all of them within --budget seconds. The slice is written to a temporary directory (removed
afterwards) or to --work DIR, where it is kept and reused by later runs with the same options.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GiB = 2**30
SHARD_BYTES = 1 << 30
STAMP_FILE = "gpu_check_stamp.json"
WARMUP_TOKENS = 8
CPU, HYBRID, ALL_GPU = "cpu", "hybrid", "gpu"


# ----- progress and time limits ----------------------------------------------------------------
def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class CannotStart(Exception):
    """The check cannot start here (options, no CUDA device, no disk space): exit status 2."""


class PhaseTimeout(Exception):
    """A phase ran past its limit (raised from SIGALRM between Python bytecodes)."""


@dataclass
class Clock:
    """The overall budget and each phase's cap (seconds, scaled with the budget)."""

    budget_s: float
    start: float = field(default_factory=time.monotonic)
    caps: dict[str, float] = field(default_factory=lambda: {"build": 150, "load": 90, "logits": 60, "speed": 90})

    def __post_init__(self) -> None:
        scale = max(self.budget_s / 290, 1.0)
        self.caps = {name: cap * scale for name, cap in self.caps.items()}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def limit(self, kind: str) -> float:
        return min(self.caps[kind], self.left())


@contextmanager
def phase(name: str, limit_s: float) -> Iterator[None]:
    """Log the start and end of a phase; raise PhaseTimeout in it after `limit_s` seconds."""
    if limit_s < 1:
        raise PhaseTimeout(f"{name}: no time left in the budget")

    def expire(signum, frame):
        raise PhaseTimeout(f"{name} ran past its {limit_s:.0f} s limit")

    log(f"{name}: start (limit {limit_s:.0f} s)")
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        log(f"{name}: {time.perf_counter() - start:.1f} s")


# ----- optional packages -----------------------------------------------------------------------
def importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


def psutil_stand_in() -> types.ModuleType:
    """The three psutil calls localv3 makes, from os, /proc and shutil."""
    module = types.ModuleType("psutil")

    def virtual_memory():
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0]) * 1024
        return types.SimpleNamespace(total=info["MemTotal"], available=info.get("MemAvailable", info["MemFree"]))

    module.cpu_count = lambda logical=True: os.cpu_count()
    module.virtual_memory = virtual_memory
    module.disk_usage = shutil.disk_usage
    return module


class AbsentModule(types.ModuleType):
    """An import-time stand-in: every name is an exception class that fails when made."""

    def __getattr__(self, attr: str) -> type:
        if attr.startswith("__"):
            raise AttributeError(attr)
        package = self.__name__

        def absent(*args, **kwargs):
            raise RuntimeError(f"{package} is not installed (gpu_check put a stand-in in its place)")

        return type(attr, (Exception,), {"__init__": absent})


def install_stand_ins(without_llama_cpp: bool) -> list[str]:
    """Stand-ins for the optional packages that localv3's import chain names; -> those replaced."""
    if without_llama_cpp:
        sys.modules["llama_cpp"] = None  # type: ignore[assignment]  # import llama_cpp -> ImportError
    replaced = []
    if not importable("psutil"):
        sys.modules["psutil"] = psutil_stand_in()
        replaced.append("psutil")
    for package, submodules in (("tokenizers", ()), ("jinja2", ("exceptions", "sandbox"))):
        if importable(package):
            continue
        sys.modules[package] = AbsentModule(package)
        for sub in submodules:
            sys.modules[f"{package}.{sub}"] = AbsentModule(f"{package}.{sub}")
        replaced.append(package)
    return replaced


# ----- the slice -------------------------------------------------------------------------------
def deepseek_v3_config() -> dict[str, Any]:
    """DeepSeek-V3's published config.json, as tests/model_configs.py states it."""
    spec = importlib.util.spec_from_file_location("localv3_model_configs", REPO / "tests" / "model_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.DEEPSEEK_V3_FULL)


def slice_config(layers: int, experts: int, vocab: int, mtp: bool) -> dict[str, Any]:
    """V3's widths and routing, cut to `layers` (the first dense) and `experts` per MoE layer."""
    raw = deepseek_v3_config()
    n_group, topk_group, top_k = 4, 2, raw["num_experts_per_tok"]
    if layers < 2:
        raise CannotStart("--layers: at least 2 (one dense layer, then MoE layers)")
    if experts % n_group or experts // n_group * topk_group < top_k:
        least = top_k * n_group // topk_group
        raise CannotStart(f"--experts: a multiple of {n_group}, at least {least} (top-{top_k} of {topk_group} of {n_group} groups)")
    return {
        **raw,
        "num_hidden_layers": layers,
        "first_k_dense_replace": 1,
        "num_key_value_heads": raw["num_attention_heads"],
        "n_routed_experts": experts,
        "n_group": n_group,
        "topk_group": topk_group,
        "vocab_size": vocab,
        "num_nextn_predict_layers": 1 if mtp else 0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def parameter_count(raw: dict[str, Any]) -> int:
    from localv3.config import ModelConfig
    from localv3.offload.shape import ModelShape

    return sum(g.elements for g in ModelShape.from_config(ModelConfig.from_dict(raw), "slice").groups)


@dataclass(frozen=True)
class Built:
    path: Path
    reused: bool
    seconds: float
    parameters: int
    file_bytes: int


def ensure_slice(work: Path, raw: dict[str, Any], seed: int, limit_s: float) -> Built:
    """The bf16 slice in work/slice: reused when its stamp matches, else written (atomically)."""
    from localv3.synthetic import write_checkpoint_streaming

    target = work / "slice"
    stamp = {"config": raw, "seed": seed}
    start = time.perf_counter()
    parameters = parameter_count(raw)
    reused = _stamp_of(target) == stamp
    if not reused:
        _check_disk(work, 2 * parameters)
        partial = work / "slice.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        log(f"writing {parameters / 1e9:.2f}B random bf16 parameters to {target}")
        with phase("build", limit_s):
            write_checkpoint_streaming(
                partial, raw, seed=seed, shard_bytes=SHARD_BYTES,
                progress=lambda shard, nbytes: log(f"  wrote {shard} ({nbytes / GiB:.2f} GiB)"),
            )
            (partial / STAMP_FILE).write_text(json.dumps(stamp) + "\n")
            partial.rename(target)
    else:
        log(f"reusing the slice in {target}")
    file_bytes = sum(f.stat().st_size for f in target.glob("*.safetensors"))
    return Built(target, reused, time.perf_counter() - start, parameters, file_bytes)


def _stamp_of(path: Path) -> dict | None:
    try:
        return json.loads((path / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


def _check_disk(work: Path, need: int) -> None:
    free = shutil.disk_usage(work).free
    if free < need * 1.1:
        raise CannotStart(f"{work}: {free / GiB:.1f} GiB free, the slice needs {need / GiB:.1f} GiB (use --work)")


# ----- machines, as the planner is told of them ------------------------------------------------
@dataclass(frozen=True)
class Accelerator:
    """The device the plan's `gpu` parts go to, and what the planner is told about it."""

    device: str  # torch device string: cuda:0, or cpu (the CPU device standing in)
    name: str
    total_bytes: int
    free_bytes: int

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def synchronize(self) -> None:
        if self.is_cuda:
            import torch

            torch.cuda.synchronize(self.device)


def accelerator(kind: str) -> Accelerator:
    import torch

    if kind == "cpu":
        ram = host_ram()
        return Accelerator("cpu", "CPU device standing in for a GPU", ram[0], ram[1])
    if not torch.cuda.is_available():
        raise CannotStart("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    free, total = torch.cuda.mem_get_info(0)
    return Accelerator("cuda:0", torch.cuda.get_device_name(0), total, free)


def host_ram() -> tuple[int, int]:
    import psutil

    memory = psutil.virtual_memory()
    return memory.total, memory.available


def stated_hardware(gpu: Accelerator | None, threads: int):
    """Hardware for the planner: this host's RAM and cores, and `gpu` (None: no GPU). Rates are
    placeholders: they only feed the plan's predictions, which this check does not use."""
    from localv3.offload.hardware import Hardware

    ram_total, ram_free = host_ram()
    return Hardware(
        source="stated by gpu_check",
        gpu_name=gpu.name if gpu else None,
        gpu_mem_bytes=gpu.total_bytes if gpu else 0,
        gpu_free_bytes=gpu.free_bytes if gpu else 0,
        gpu_bw=4.8e12 if gpu else 0.0,
        gpu_flops=9.9e14 if gpu else 0.0,
        cpu_name="host CPU",
        physical_cores=threads,
        ram_bytes=ram_total,
        ram_available_bytes=ram_free,
        cpu_bw=100e9,
        cpu_flops=1e12,
        pcie_bw=25e9 if gpu else 0.0,
        disk_bw=3e9,
    )


# ----- the variants ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    name: str
    device: str  # the runtime's gpu_device
    dtype: str  # torch dtype name
    hardware: Any  # localv3.offload.hardware.Hardware
    policy: Any  # localv3.offload.planner.Policy
    quantization: Any  # localv3.offload.quant.Quantization
    required: bool  # a skip is a FAIL

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def variants(gpu: Accelerator, threads: int) -> list[Variant]:
    from localv3.offload.planner import Policy
    from localv3.offload.quant import Quantization

    policy = Policy(allow_disk=False)
    fp32, bf16 = Quantization("fp32", "fp32", "fp32"), Quantization("bf16", "bf16", "bf16")
    with_gpu = stated_hardware(gpu, threads)
    return [
        Variant(CPU, "cpu", "float32", stated_hardware(None, threads), policy, fp32, True),
        Variant(HYBRID, gpu.device, "bfloat16", with_gpu, replace(policy, cpu_moe=True), bf16, True),
        Variant(ALL_GPU, gpu.device, "bfloat16", with_gpu, policy, bf16, False),
    ]


def layout_problem(name: str, layout) -> str | None:
    """What is wrong with a planned layout for variant `name` (None: as intended)."""
    from localv3.offload.layout import CPU as ON_CPU, GPU as ON_GPU

    resident = set(layout.layer_devices) | {layout.head_device, layout.embedding_device}
    experts = {d for devices in layout.expert_devices.values() for d in devices}
    want_resident, want_experts = {
        CPU: ({ON_CPU}, {ON_CPU}),
        HYBRID: ({ON_GPU}, {ON_CPU}),
        ALL_GPU: ({ON_GPU}, {ON_GPU}),
    }[name]
    if resident != want_resident or experts != want_experts:
        return (
            f"planned non-expert parts on {sorted(resident)} and routed experts on {sorted(experts)}, "
            f"wanted {sorted(want_resident)} and {sorted(want_experts)}"
        )
    return None


def planned_layout(model_dir: Path, variant: Variant, context: int):
    from localv3.config import ModelConfig
    from localv3.offload.planner import plan
    from localv3.offload.shape import ModelShape

    shape = ModelShape.from_config(ModelConfig.from_file(model_dir), model_dir.name)
    return plan(shape, variant.quantization, variant.hardware, context, variant.policy).layout


# ----- measurements ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Agreement:
    rel_rms: float  # RMS(logits - reference) / RMS(reference), over every position
    top1: float  # fraction of positions whose argmax matches the reference's
    max_abs: float
    finite: bool


def agreement(logits, reference) -> Agreement:
    import torch

    logits, reference = logits.float(), reference.float()
    diff = logits - reference
    rel = (diff.pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return Agreement(rel, top1, diff.abs().max().item(), bool(torch.isfinite(logits).all()))


@dataclass(frozen=True)
class Speed:
    prefill_tokens: int
    prefill_s: float
    decode_tokens: int
    decode_s: float

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_s

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s


def timed(work: Callable[[], Any], sync: Callable[[], None]) -> tuple[Any, float]:
    sync()
    start = time.perf_counter()
    result = work()
    sync()
    return result, time.perf_counter() - start


def greedy_decode(session, first_logits, steps: int) -> None:
    token = int(first_logits.argmax())
    for _ in range(steps):
        token = int(session.decode(token).argmax())


def measure_speed(engine, prefill_ids: list[int], decode_steps: int, sync: Callable[[], None]) -> Speed:
    """Prefill then greedy decode in a fresh session, after a short warm-up session."""
    warm = engine.new_session(WARMUP_TOKENS + 2)
    greedy_decode(warm, warm.prefill(prefill_ids[:WARMUP_TOKENS]), 2)
    sync()
    session = engine.new_session(len(prefill_ids) + decode_steps)
    logits, prefill_s = timed(lambda: session.prefill(prefill_ids), sync)
    _, decode_s = timed(lambda: greedy_decode(session, logits, decode_steps), sync)
    return Speed(len(prefill_ids), prefill_s, decode_steps, decode_s)


@dataclass(frozen=True)
class GraphsCheck:
    """The hybrid decode with CUDA graphs: its speed, and its logits against the dynamic decode."""

    decode_tokens: int
    decode_s: float
    agreement: Agreement  # over the compared decode steps
    buckets: list[int]  # capacity buckets captured in the timed session

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s


def check_graphs(engine, prefill_ids: list[int], decode_steps: int, sync: Callable[[], None]) -> GraphsCheck:
    """Turn the engine's static decode on; time `decode_steps` steps after two untimed ones (the
    capture), then compare its logits with the dynamic decode's at every step."""
    import torch

    from localv3.engines.native import NativeSession
    from localv3.offload.static_decode import StaticDecoding

    engine.static_decoding = StaticDecoding.planned(engine.model, engine.plan.layout, engine.gpu_device)
    capacity = len(prefill_ids) + decode_steps + 3
    session = engine.new_session(capacity)
    logits = session.prefill(prefill_ids)
    token = int(logits.argmax())
    for _ in range(2):
        token = int(session.decode(token).argmax())
    _, decode_s = timed(lambda: greedy_decode(session, session.decode(token), decode_steps - 1), sync)
    static, dynamic = engine.new_session(capacity), NativeSession(engine.model, capacity, engine.cache_devices)
    token = int(static.prefill(prefill_ids).argmax())
    dynamic.prefill(prefill_ids)
    ours, theirs = [], []
    for _ in range(decode_steps):
        ours.append(static.decode(token).float().cpu())
        theirs.append(dynamic.decode(token).float().cpu())
        token = int(theirs[-1].argmax())
    engine.static_decoding = None
    compared = agreement(torch.stack(ours), torch.stack(theirs))
    return GraphsCheck(decode_steps, decode_s, compared, session.static.player.buckets)


@dataclass
class Result:
    name: str
    status: str = "not run"  # ok | skipped | failed | timeout
    required: bool = True
    device: str = ""
    dtype: str = ""
    placement: str = ""
    load_s: float | None = None
    logits_s: float | None = None
    agreement: Agreement | None = None
    speed: Speed | None = None
    graphs: GraphsCheck | None = None
    peak_gpu_gib: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.speed:
            data["speed"].update(prefill_tok_s=self.speed.prefill_tok_s, decode_tok_s=self.speed.decode_tok_s)
        if self.graphs:
            data["graphs"].update(decode_tok_s=self.graphs.decode_tok_s)
        return data


def run_variant(variant: Variant, model_dir: Path, prompt: list[int], prefill_ids: list[int], decode_steps: int,
                threads: int, gpu: Accelerator, clock: Clock, reference) -> tuple[Result, Any]:
    """Plan, check the layout, load, take the prompt's logits, measure speed; free the model.
    -> (result, the prompt's logits [S, V] fp32 on the CPU, or None)."""
    result = Result(variant.name, required=variant.required, device=variant.device, dtype=variant.dtype)
    context = len(prefill_ids) + decode_steps
    try:
        problem = layout_problem(variant.name, planned_layout(model_dir, variant, context))
    except Exception as error:  # noqa: BLE001 (PlanError: the planner refuses this machine)
        problem = f"not planned: {type(error).__name__}: {error}"
    if problem:
        result.status, result.note = ("failed" if variant.required else "skipped"), problem
        log(f"{variant.name}: {result.status}: {problem}")
        return result, None
    engine = logits = None
    try:
        engine = load(variant, model_dir, context, threads, gpu, clock, result)
        with phase(f"{variant.name}: logits of {len(prompt)} tokens", clock.limit("logits")):
            logits, result.logits_s = timed(lambda: engine.logits(prompt), gpu.synchronize)
        if reference is not None:
            result.agreement = agreement(logits, reference)
            log(f"{variant.name}: {result.agreement}")
        with phase(f"{variant.name}: prefill {len(prefill_ids)} + decode {decode_steps}", clock.limit("speed")):
            result.speed = measure_speed(engine, prefill_ids, decode_steps, gpu.synchronize)
        if variant.name == HYBRID:
            with phase(f"{variant.name}: decode {decode_steps} with CUDA graphs, then against eager", clock.limit("speed")):
                result.graphs = check_graphs(engine, prefill_ids, decode_steps, gpu.synchronize)
            log(f"{variant.name}: graphs {result.graphs.decode_tok_s:.2f} tok/s; {result.graphs.agreement}")
        if gpu.is_cuda and variant.device != "cpu":
            import torch

            result.peak_gpu_gib = torch.cuda.max_memory_allocated(variant.device) / GiB
        result.status = "ok"
    except PhaseTimeout as timeout:
        result.status, result.note = "timeout", str(timeout)
        log(str(timeout))
    except Exception as error:  # noqa: BLE001 (a failed variant is reported, the others still run)
        result.status, result.note = "failed", f"{type(error).__name__}: {error}"
        log(f"{variant.name}: failed: {result.note}")
    finally:
        engine = None  # the model's last reference: its memory goes back before the next variant
        release_memory(gpu)
    return result, logits


def load(variant: Variant, model_dir: Path, context: int, threads: int, gpu: Accelerator, clock: Clock, result: Result):
    from localv3.offload.runtime import load_planned

    release_memory(gpu)
    if gpu.is_cuda:
        import torch

        torch.cuda.reset_peak_memory_stats(gpu.device)
    with phase(f"{variant.name}: load ({variant.dtype} on {variant.device})", clock.limit("load")):
        engine, result.load_s = timed(
            lambda: load_planned(
                model_dir, hardware=variant.hardware, context=context, policy=variant.policy,
                quantization=variant.quantization, gpu_device=variant.device, dtype=variant.torch_dtype(),
                cpu_threads=threads,
            ),
            gpu.synchronize,
        )
    result.placement = engine.placement
    log(f"{variant.name}: {engine.placement}")
    return engine


def release_memory(gpu: Accelerator) -> None:
    gc.collect()
    if gpu.is_cuda:
        import torch

        torch.cuda.empty_cache()


# ----- the verdict and the report --------------------------------------------------------------
def failures(results: list[Result], min_top1: float) -> list[str]:
    found = []
    for r in results:
        if r.status == "skipped" and not r.required:
            continue
        if r.status != "ok":
            found.append(f"{r.name}: {r.status}: {r.note}")
        elif r.agreement is not None:
            if not r.agreement.finite:
                found.append(f"{r.name}: logits not finite")
            if r.agreement.top1 < min_top1:
                found.append(f"{r.name}: top-1 agreement {r.agreement.top1:.1%} < {min_top1:.0%}")
        if r.status == "ok" and r.graphs is not None:
            if not r.graphs.agreement.finite or r.graphs.agreement.top1 < min_top1:
                found.append(f"{r.name}: CUDA-graph decode against eager: {r.graphs.agreement}")
    return found


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(results: list[Result]) -> str:
    header = (
        f"{'run':<7} {'status':<8} {'dtype':<9} {'load s':>7} {'prefill tok/s':>14} {'decode tok/s':>13} "
        f"{'rel RMS':>8} {'top-1':>6} {'peak GiB':>9}"
    )
    rows = [header, "-" * len(header)]
    for r in results:
        a, s = r.agreement, r.speed
        rows.append(
            f"{r.name:<7} {r.status:<8} {r.dtype:<9} {fmt(r.load_s, '.1f'):>7} "
            f"{fmt(s and s.prefill_tok_s, '.1f'):>14} {fmt(s and s.decode_tok_s, '.2f'):>13} "
            f"{fmt(a and a.rel_rms, '.4f'):>8} {fmt(a and a.top1, '.0%'):>6} {fmt(r.peak_gpu_gib, '.2f'):>9}"
        )
    rows += [f"  {r.name}: {r.placement or r.note}" for r in results if r.placement or r.note]
    for r in results:
        if r.graphs is not None:
            g, a = r.graphs, r.graphs.agreement
            rows.append(
                f"  {r.name} decode with CUDA graphs: {g.decode_tok_s:.2f} tok/s (eager {fmt(r.speed and r.speed.decode_tok_s, '.2f')});"
                f" against eager decode: rel RMS {a.rel_rms:.4f}, top-1 {a.top1:.0%}, max |diff| {a.max_abs:.3g}; buckets {g.buckets}"
            )
    return "\n".join(rows)


def write_json(report: dict[str, Any]) -> None:
    line = json.dumps(report, default=str)
    print(line, flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_check.json").write_text(line + "\n")


# ----- main ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="the 'GPU' of the plan (cpu: the CPU device)")
    p.add_argument("--work", type=Path, help="keep (and reuse) the slice here instead of a temporary directory")
    p.add_argument("--layers", type=int, default=3, help="decoder layers: 1 dense + the rest MoE (default 3)")
    p.add_argument("--experts", type=int, default=32, help="routed experts per MoE layer (default 32)")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--mtp", action="store_true", help="add the MTP layer (loaded, not run)")
    p.add_argument("--prompt", type=int, default=32, help="tokens whose logits are compared")
    p.add_argument("--prefill", type=int, default=128, help="tokens of the timed prefill")
    p.add_argument("--decode", type=int, default=32, help="tokens of the timed greedy decode")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-top1", type=float, default=0.8, help="top-1 agreement needed against fp32 (default 0.8)")
    p.add_argument("--budget", type=float, default=290, help="seconds for everything (phase limits scale with it)")
    p.add_argument("--without-llama-cpp", action="store_true", help="make llama_cpp unimportable first")
    args = p.parse_args(argv)
    if min(args.prompt, args.prefill, args.decode) < 1 or args.prefill < WARMUP_TOKENS:
        p.error(f"--prompt and --decode must be positive, --prefill at least {WARMUP_TOKENS}")
    return args


def token_ids(count: int, vocab: int, seed: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (count,), generator=g).tolist()  # ids 0 and 1 are BOS and EOS


def check(args: argparse.Namespace, work: Path, clock: Clock) -> dict[str, Any]:
    import torch

    gpu = accelerator(args.device)
    memory = f"{gpu.total_bytes / GiB:.1f} GiB, {gpu.free_bytes / GiB:.1f} free"
    log(f"torch {torch.__version__}; 'GPU': {gpu.name} ({memory}); {args.threads} CPU threads")
    raw = slice_config(args.layers, args.experts, args.vocab, args.mtp)
    torch.set_num_threads(args.threads)
    built = ensure_slice(work, raw, args.seed, clock.limit("build"))
    prompt = token_ids(args.prompt, args.vocab, args.seed + 1)
    prefill_ids = token_ids(args.prefill, args.vocab, args.seed + 2)
    results, reference = [], None
    for variant in variants(gpu, args.threads):
        result, logits = run_variant(variant, built.path, prompt, prefill_ids, args.decode, args.threads, gpu, clock, reference)
        results.append(result)
        if variant.name == CPU:
            if logits is None:
                break  # no reference: nothing to compare against (the cpu failure is the verdict)
            reference = logits
    found = failures(results, args.min_top1)
    print(table(results), flush=True)
    verdict = "FAIL" if found else "PASS"
    print(f"{verdict}" + "".join(f"\n  {f}" for f in found), flush=True)
    return {
        "benchmark": "gpu_check",
        "verdict": verdict,
        "failures": found,
        "device": args.device,
        "gpu": asdict(gpu),
        "torch": torch.__version__,
        "threads": args.threads,
        "slice": {k: raw[k] for k in ("num_hidden_layers", "n_routed_experts", "vocab_size", "num_nextn_predict_layers")}
        | {"parameters": built.parameters, "file_bytes": built.file_bytes, "reused": built.reused, "build_s": built.seconds},
        "prompt_tokens": args.prompt,
        "min_top1": args.min_top1,
        "results": [r.to_dict() for r in results],
        "total_s": time.monotonic() - clock.start,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clock = Clock(args.budget)
    replaced = install_stand_ins(args.without_llama_cpp)
    if replaced:
        log(f"not installed, replaced by import-time stand-ins: {', '.join(replaced)}")
    temporary = args.work is None
    work = Path(tempfile.mkdtemp(prefix="localv3-gpu-check-")) if temporary else args.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = check(args, work, clock)
    except PhaseTimeout as timeout:
        print(f"FAIL\n  {timeout}", flush=True)
        report = {"benchmark": "gpu_check", "verdict": "FAIL", "failures": [str(timeout)], "device": args.device}
    except CannotStart as reason:
        print(f"ERROR\n  {reason}", flush=True)
        report = {"benchmark": "gpu_check", "verdict": "ERROR", "failures": [str(reason)], "device": args.device}
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    report["llama_cpp_loaded"] = sys.modules.get("llama_cpp") is not None
    report["stand_ins"] = replaced
    write_json(report)
    log(f"{report['verdict']} in {time.monotonic() - clock.start:.0f} s")
    return {"PASS": 0, "FAIL": 1}.get(report["verdict"], 2)


if __name__ == "__main__":
    sys.exit(main())
