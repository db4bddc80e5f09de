"""Speed measurement in llama-bench's terms: ppP (prefill of P random tokens) and tgN (N
tokens decoded one at a time), repeated after a warm-up, as records for a table or JSON.

Everything runs through the common Engine interface, so native and llama.cpp engines are
measured the same way, each at the CPU thread count it was loaded with. Peak memory is per
load: the resident set's high-water mark is reset before loading where Linux allows it, and
torch's CUDA allocator peak is read when a GPU is present. The prediction beside a native
measurement is the roofline figure of the plan the engine was built from (localv3.offload.runtime's
load_planned: the checkpoint's stored schemes on this machine), never a second plan.
"""

from __future__ import annotations

import functools
import platform
import random
import re
import resource
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from localv3.errors import LocalV3Error
from localv3.render import mtp_acceptance

if TYPE_CHECKING:
    from localv3.engines.base import Engine
    from localv3.generate import GenerationStats
    from localv3.offload.planner import Plan

THREAD_COUNT = re.compile(r"[0-9]+")


class BenchError(LocalV3Error):
    pass


def parse_thread_counts(text: str) -> list[int]:
    """'1,2' -> [1, 2] (repeats dropped), as llama-bench's -t; anything but positive integers is refused."""
    values = [value.strip() for value in text.split(",")]
    bad = [value for value in values if not THREAD_COUNT.fullmatch(value) or int(value) == 0]
    if bad:
        raise BenchError(f"--threads {text!r}: thread counts are positive integers, e.g. -t 1,2 (not {bad[0]!r})")
    return list(dict.fromkeys(int(value) for value in values))


@dataclass
class BenchSettings:
    n_prompt: int = 512
    n_gen: int = 128
    repetitions: int = 5
    mtp: bool = False  # also measure tgN with MTP speculation
    predict: bool = False  # add the planner's roofline prediction for each test
    seed: int = 1234  # for the random prompt tokens


@dataclass
class WeightsInfo:
    size_bytes: int
    params: int


@dataclass
class BenchRecord:
    model: str
    engine: str
    test: str  # "pp512", "tg128"
    tok_s_mean: float
    tok_s_std: float
    tok_s_samples: list[float]
    n_prompt: int
    n_gen: int
    repetitions: int
    size_bytes: int
    params: int
    placement: str
    threads: int  # CPU threads the engine computed with
    ttft_s_mean: float | None = None  # pp tests: prefill of P tokens up to the first new token
    tpot_s_mean: float | None = None  # tg tests: time per output token after the first
    mtp: bool = False
    mtp_acceptance: float | None = None
    mtp_speedup: float | None = None  # tok/s with MTP over tok/s without
    mtp_tokens_per_step: float | None = None  # tokens emitted per verify forward
    experts_read_per_step: float | None = None  # tg tests, where the engine counts them
    peak_rss_bytes: int | None = None
    peak_vram_bytes: int | None = None
    predicted_tok_s: float | None = None  # the roofline figure of the plan the engine was built from
    quantization: dict[str, str] | None = None  # that plan's schemes (experts, dense, embeddings)
    cpu: str | None = None  # the machine's CPU model
    gpu: str | None = None  # its CUDA device, None without one
    version: str | None = None  # localv3's
    test_time: str | None = None  # when the test finished, ISO 8601 UTC

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MachineInfo:
    cpu: str
    gpu: str | None
    version: str


@functools.cache
def machine_info() -> MachineInfo:
    """What a record says about where it was measured (read once per run)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        localv3_version = version("localv3")
    except PackageNotFoundError:
        localv3_version = "unknown"
    cuda = _cuda()
    return MachineInfo(_cpu_model(), cuda.get_device_name(0) if cuda is not None else None, localv3_version)


def _cpu_model() -> str:
    """/proc/cpuinfo's model name on Linux, else what the platform module says."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return found.group(1).strip() if found else platform.processor() or platform.machine() or "unknown"


def weights_info(path: Path) -> WeightsInfo:
    """Size on disk and parameter count of a safetensors checkpoint directory or a GGUF file."""
    if path.is_file():
        from gguf import GGUFReader

        tensors = GGUFReader(str(path)).tensors
        return WeightsInfo(path.stat().st_size, sum(int(t.n_elements) for t in tensors))
    from localv3.checkpoint import CheckpointReader
    from localv3.config import ModelConfig
    from localv3.offload.shape import ModelShape

    tensors = CheckpointReader(path).tensors
    config = ModelConfig.from_file(path)
    with_mtp = any(name.startswith(f"model.layers.{config.num_hidden_layers}.") for name in tensors)
    params = ModelShape.from_config(config).parameter_count(with_mtp).total  # as `show` and `plan` count them
    return WeightsInfo(sum(t.nbytes for t in tensors.values()), params)


class PeakMemory:
    """High-water marks of host RSS and (torch-allocated) GPU memory since `reset`."""

    STATUS = Path("/proc/self/status")
    CLEAR_REFS = Path("/proc/self/clear_refs")

    def reset(self) -> None:
        try:
            self.CLEAR_REFS.write_text("5")  # Linux: reset the peak RSS (VmHWM)
        except OSError:
            pass  # elsewhere the peak is the process's lifetime peak
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()

    def rss_bytes(self) -> int:
        try:
            for line in self.STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max_rss if sys.platform == "darwin" else max_rss * 1024

    def vram_bytes(self) -> int | None:
        cuda = _cuda()
        return cuda.max_memory_allocated() if cuda is not None else None


def _cuda():
    import torch

    return torch.cuda if torch.cuda.is_available() else None


def engine_plan(engine: Engine) -> Plan | None:
    """The offload plan the native engine was built from (its schemes are what the checkpoint
    stores, its prediction is for this machine); None for other engines."""
    from localv3.offload.runtime import PlannedEngine

    return engine.plan if isinstance(engine, PlannedEngine) else None


def cpu_threads(engine: Engine) -> int:
    """The CPU threads `engine` computes with: llama.cpp's context setting, else torch's intra-op threads."""
    if engine.name == "llama.cpp":
        return engine.settings.n_threads
    import torch

    return torch.get_num_threads()


def random_tokens(vocab_size: int, count: int, rng: random.Random) -> list[int]:
    return [rng.randrange(vocab_size) for _ in range(count)]


def _final_stats(engine: Engine, token_ids: list[int], max_new_tokens: int, speculative: bool) -> GenerationStats:
    from localv3.generate import final_stats

    return final_stats(
        engine.stream_generate(
            token_ids, max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=[], speculative=speculative
        )
    )


@dataclass
class Measurement:
    tok_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)  # TTFT for pp tests, TPOT for tg tests
    acceptance: list[float] = field(default_factory=list)  # MTP drafts accepted
    experts_per_step: list[float] = field(default_factory=list)  # routed experts read per decode step
    tokens_per_step: list[float] = field(default_factory=list)  # MTP: tokens emitted per verify step


def prompt_test(engine: Engine, n_prompt: int, repetitions: int, rng: random.Random) -> Measurement:
    """ppP: prefill P random tokens; tok/s = P / prefill time."""
    result = Measurement()
    for _ in range(repetitions):
        stats = _final_stats(engine, random_tokens(engine.config.vocab_size, n_prompt, rng), 1, False)
        result.tok_s.append(stats.prompt_tok_s)
        result.latency_s.append(stats.ttft_s)
    return result


def generation_test(engine: Engine, n_gen: int, repetitions: int, rng: random.Random, speculative: bool) -> Measurement:
    """tgN: N tokens after a one-token prompt; N forward passes (the prefill of one token gives the first)."""
    result = Measurement()
    for _ in range(repetitions):
        stats = _final_stats(engine, random_tokens(engine.config.vocab_size, 1, rng), n_gen, speculative)
        result.tok_s.append(stats.completion_tokens / (stats.ttft_s + stats.decode_s))
        decoded = stats.completion_tokens - 1
        result.latency_s.append(stats.decode_s / decoded if decoded > 0 else stats.ttft_s)
        acceptance = mtp_acceptance(stats)
        if acceptance is not None:
            result.acceptance.append(acceptance)
        speculation = stats.speculation or {}
        if speculation.get("experts_read_per_step") is not None:
            result.experts_per_step.append(speculation["experts_read_per_step"])
        if speculation.get("tokens_per_step") is not None:
            result.tokens_per_step.append(speculation["tokens_per_step"])
    return result


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def fit_to_context(settings: BenchSettings, max_context: int, progress: Callable[[str], None]) -> BenchSettings:
    """Shrink ppP and tgN to what the engine's context holds (a test needs one more position
    than its tokens), saying so, as llama-bench users expect a run rather than a refusal."""
    fitted = replace(settings, n_prompt=min(settings.n_prompt, max_context - 1), n_gen=min(settings.n_gen, max_context - 1))
    if fitted != settings:
        progress(
            f"the context holds {max_context} tokens: measuring pp{fitted.n_prompt} / tg{fitted.n_gen}"
            f" instead of pp{settings.n_prompt} / tg{settings.n_gen}"
        )
    return fitted


def bench_engine(
    engine: Engine,
    model: str,
    weights: WeightsInfo,
    settings: BenchSettings,
    progress: Callable[[str], None] = lambda message: None,
) -> Iterator[BenchRecord]:
    """Warm up, then the pp test, the tg test and (with settings.mtp) tg with MTP (test name
    tgN-mtp); each record is yielded as soon as its test is measured."""
    settings = fit_to_context(settings, engine.max_context, progress)
    rng = random.Random(settings.seed)
    plan = engine_plan(engine)
    predicted = plan.predicted if plan is not None and settings.predict else None
    p, n, r = settings.n_prompt, settings.n_gen, settings.repetitions
    threads = cpu_threads(engine)
    label = f"{model} [{engine.name}, {threads} threads]"
    machine = machine_info()

    def record(test: str, result: Measurement, **extra) -> BenchRecord:
        return BenchRecord(
            model=model,
            engine=engine.name,
            test=test,
            tok_s_mean=_mean(result.tok_s),
            tok_s_std=_std(result.tok_s),
            tok_s_samples=result.tok_s,
            n_prompt=p if test.startswith("pp") else 0,
            n_gen=n if test.startswith("tg") else 0,
            repetitions=r,
            size_bytes=weights.size_bytes,
            params=weights.params,
            placement=engine.placement,
            threads=threads,
            quantization=plan.quantization.to_dict() if plan is not None else None,
            cpu=machine.cpu,
            gpu=machine.gpu,
            version=machine.version,
            test_time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **extra,
        )

    progress(f"{label}: warm-up")
    if p:
        prompt_test(engine, p, 1, rng)
    if n:
        generation_test(engine, min(n, 8), 1, rng, False)
    if p:
        progress(f"{label}: pp{p} x {r}")
        result = prompt_test(engine, p, r, rng)
        yield record(
            f"pp{p}",
            result,
            ttft_s_mean=_mean(result.latency_s),
            predicted_tok_s=predicted.prefill_tok_s if predicted else None,
        )
    if n:
        progress(f"{label}: tg{n} x {r}")
        plain = generation_test(engine, n, r, rng, False)
        yield record(
            f"tg{n}",
            plain,
            tpot_s_mean=_mean(plain.latency_s),
            experts_read_per_step=_mean(plain.experts_per_step),
            predicted_tok_s=predicted.decode_tok_s if predicted else None,
        )
        if settings.mtp:
            progress(f"{label}: tg{n} with MTP x {r}")
            spec = generation_test(engine, n, r, rng, True)
            acceptance = _mean(spec.acceptance)
            if acceptance is None:
                progress(f"{label}: this engine did not speculate; no MTP row")
            else:
                yield record(
                    f"tg{n}-mtp",
                    spec,
                    tpot_s_mean=_mean(spec.latency_s),
                    experts_read_per_step=_mean(spec.experts_per_step),
                    mtp=True,
                    mtp_acceptance=acceptance,
                    mtp_speedup=_mean(spec.tok_s) / _mean(plain.tok_s),
                    mtp_tokens_per_step=_mean(spec.tokens_per_step),
                    predicted_tok_s=predicted.mtp_decode_tok_s if predicted else None,
                )
