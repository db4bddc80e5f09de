"""The native engine against llama.cpp on the same weights: a DeepSeek-V3-width slice, CPU only.

What it measures: prefill (ppP) and decode (tgN) speed of `localv3 bench --engine native` on a
localv3 checkpoint and `localv3 bench --engine llama.cpp` on a GGUF, both quantised from one
FP8 checkpoint, for pairs of comparable formats (default: native experts q4 / dense q8 vs
Q4_K_M, native q8 / q8 vs Q8_0). For tg it also gives the effective read bandwidth: the weight
bytes a decode step reads (attention, dense FFN, shared expert, router, norms, lm_head, and 8
of the 32 routed experts per MoE layer, as stored in each file) times tok/s.

The slice has DeepSeek-V3's exact widths (hidden 7168, 128 heads, q_lora 1536, kv_lora 512,
nope 128 + rope 64, v 128, dense FFN 18432, expert FFN 2048, YaRN as V3) but 3 layers (1 dense,
2 MoE with 32 routed experts, top-8 of 4 groups / 2, 1 shared expert) plus the MTP layer, and a
1024-token BPE vocabulary: ~3.9B parameters in the main model (~5.6B with MTP), written as
DeepSeek ships V3 (float8_e4m3fn with a weight_scale_inv per 128x128 block), random values
scaled like trained weights (localv3.synthetic).

Everything goes through the CLI (`localv3 quantize`, `localv3 bench --json`), each call in its
own process. The slice and the quantised models are cached under --work and reused.

With `--rounds N` each pair is benched N times in strict alternation (native, llama.cpp, native,
...): on a machine whose speed drifts from minute to minute, the ratio of two runs next to each
other is what holds, so each round gives its own ratios and the pair's ratio is their median (the
engines' tok/s: the median of their rounds).

    python benchmarks/slice_vs_llamacpp.py [--work /tmp/localv3-slice] [--rebuild]
        [--pairs native:q4/q8=gguf:q4_k_m,native:q8/q8=gguf:q8_0] [-p 64] [-n 32] [-r 3]
        [--rounds 1] [--threads 2] [--json]

Progress goes to stderr; stdout gets the table and then one JSON document (only the JSON
with --json). First run on 2 cores: ~30 min (FP8 build ~3 min, 2.9 GB peak RSS; four
quantisations 5-25 min depending on other load; four benches 2-4 min); cached runs ~2 min.
Peak memory is the native q8 bench (~9 GB RSS). The figures move with other load on the
machine: each result carries the 1-minute load average taken before it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from active_weights import active_weights  # noqa: E402

DEFAULT_WORK = Path("/tmp/localv3-slice")
DEFAULT_PAIRS = "native:q4/q8=gguf:q4_k_m,native:q8/q8=gguf:q8_0"
SLICE_SEED = 0
SLICE_VOCAB = 1024
SHARD_BYTES = 1 << 30  # ~1 GiB FP8 shards, as the hub's checkpoints are split
STDERR_TAIL_LINES = 40

# DeepSeek-V3's bundled config.json keeps its widths; depth and experts are cut to a slice
SLICE_SHAPE = {"num_hidden_layers": 3, "first_k_dense_replace": 1, "n_routed_experts": 32, "n_group": 4, "topk_group": 2}
V3_CONFIG = Path(__file__).resolve().parent.parent / "localv3" / "assets" / "configs" / "deepseek-v3.json"


def log(message: str) -> None:
    print(f"[slice-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- pairs and CLI discovery


@dataclass(frozen=True)
class Pair:
    """One comparison: a native localv3 checkpoint (experts/dense formats) vs a GGUF type."""

    experts: str
    dense: str
    gguf_type: str

    @property
    def spec(self) -> str:
        return f"native:{self.experts}/{self.dense}=gguf:{self.gguf_type}"

    @property
    def native_weights(self) -> str:
        return f"experts {self.experts}, dense {self.dense}"

    def native_dir(self, work: Path) -> Path:
        return work / f"native-{self.experts}-{self.dense}"

    def gguf_file(self, work: Path) -> Path:
        return work / f"slice-{self.gguf_type}.gguf"


def parse_pairs(text: str) -> list[Pair]:
    """'native:q4/q8=gguf:q4_k_m,native:q8/q8=gguf:q8_0' -> Pairs."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"native:([\w.-]+)/([\w.-]+)\s*=\s*gguf:([\w.-]+)", item)
        if not match:
            raise SystemExit(f"--pairs: cannot read {item!r}; expected native:EXPERTS/DENSE=gguf:TYPE")
        pairs.append(Pair(*match.groups()))
    if not pairs:
        raise SystemExit("--pairs: no pair given")
    return list(dict.fromkeys(pairs))


def localv3_command() -> list[str]:
    """How to run the CLI: the venv's `localv3` script beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "localv3"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("localv3")
    if found:
        return [found]
    return [sys.executable, "-c", "import cli; cli.main()"]


def cli_help(subcommand: str) -> str:
    """`localv3 SUBCOMMAND --help`, unwrapped and without colour."""
    env = {**os.environ, "COLUMNS": "1000", "NO_COLOR": "1", "TERM": "dumb"}
    done = subprocess.run([*localv3_command(), subcommand, "--help"], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"`localv3 {subcommand} --help` failed:\n{done.stderr}")
    return re.sub(r"\x1b\[[0-9;]*m", "", done.stdout)


def option_choices(help_text: str, option: str) -> set[str]:
    """Format names (q4, bf16, q4_k_m, ...) in the help of `option`; empty when none are found."""
    lines = help_text.splitlines()
    declared = re.compile(rf"^[\s│|*]*(?:-\w,?\s+)?{re.escape(option)}\b")  # the option's own row
    start = next((i for i, line in enumerate(lines) if declared.search(line)), None)
    if start is None:
        return set()
    text = lines[start].split(option, 1)[1]
    for line in lines[start + 1 :]:
        if re.search(r"(^|[\s│|])--?[a-z]", line):
            break
        text += " " + line
    text = text.split("default", 1)[0]  # "(default: the registry's, else q8)" names no new choice
    return set(re.findall(r"\b(?:q\d+(?:_[a-z0-9]+)*|[bi]?f(?:p)?\d+|bf16|iq\d\w*|tq\d\w*)\b", text.lower()))


@dataclass
class CliFeatures:
    experts: set[str]
    dense: set[str]
    gguf_types: set[str]
    bench_threads: bool


def discover_cli() -> CliFeatures:
    quantize_help, bench_help = cli_help("quantize"), cli_help("bench")
    return CliFeatures(
        experts=option_choices(quantize_help, "--experts"),
        dense=option_choices(quantize_help, "--dense"),
        gguf_types=option_choices(quantize_help, "--type"),
        bench_threads="--threads" in bench_help,
    )


def check_pairs(pairs: list[Pair], cli: CliFeatures) -> None:
    """Refuse formats that `localv3 quantize --help` does not list (when it lists any)."""
    for pair in pairs:
        for value, choices, option in (
            (pair.experts, cli.experts, "--experts"),
            (pair.dense, cli.dense, "--dense"),
            (pair.gguf_type, cli.gguf_types, "--type"),
        ):
            if choices and value not in choices:
                raise SystemExit(
                    f"--pairs {pair.spec}: `localv3 quantize --help` lists {option} "
                    f"{', '.join(sorted(choices))}, not {value!r}"
                )


# ---------------------------------------------------------------- running the CLI


@dataclass
class CliFailure:
    step: str
    command: str
    returncode: int
    stderr_tail: str


class CliError(Exception):
    def __init__(self, failure: CliFailure):
        super().__init__(f"{failure.step}: exit {failure.returncode}")
        self.failure = failure


def run_cli(step: str, args: list[str]) -> str:
    """Run `localv3 ARGS`, passing its stderr through as progress; its stdout, or CliError."""
    command = [*localv3_command(), *args]
    log(f"{step}: {' '.join(args)}")
    tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        stdout_chunks: list[str] = []
        reader = threading.Thread(target=lambda: stdout_chunks.append(process.stdout.read()), daemon=True)
        reader.start()
        for line in process.stderr:
            tail.append(line.rstrip("\n"))
            print(f"    {line.rstrip()}", file=sys.stderr, flush=True)
        reader.join()
        returncode = process.wait()
    if returncode != 0:
        raise CliError(CliFailure(step, " ".join(["localv3", *args]), returncode, "\n".join(tail)))
    return "".join(stdout_chunks)


# ---------------------------------------------------------------- the slice


def slice_config(vocab_size: int) -> dict:
    v3 = json.loads(V3_CONFIG.read_text(encoding="utf-8"))
    v3 = {k: v for k, v in v3.items() if k not in ("auto_map", "quantization_config")}  # the builder adds FP8's
    return {**v3, **SLICE_SHAPE, "vocab_size": vocab_size, "bos_token_id": 0, "eos_token_id": 1}


def build_slice(target: Path, vocab_size: int, seed: int) -> None:
    """The FP8 slice with its tokenizer, written shard by shard into `target` (atomically)."""
    import torch

    from localv3.synthetic import train_random_tokenizer, write_checkpoint_streaming, write_tokenizer_files

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tokenizer = train_random_tokenizer(vocab_size, seed)
    config = slice_config(tokenizer.get_vocab_size())
    written = 0

    def progress(shard: str, nbytes: int) -> None:
        nonlocal written
        written += nbytes
        log(f"build: {shard} {nbytes / 1e9:.2f} GB (total {written / 1e9:.2f} GB)")

    write_checkpoint_streaming(
        partial, config, seed=seed, dtype=torch.bfloat16, fp8=True, shard_bytes=SHARD_BYTES, progress=progress
    )
    write_tokenizer_files(partial, tokenizer)
    (partial / "slice.json").write_text(json.dumps({"seed": seed, "vocab_request": vocab_size}) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def slice_is_current(source: Path, vocab_size: int, seed: int) -> bool:
    stamp = source / "slice.json"
    if not stamp.is_file() or not (source / "model.safetensors.index.json").is_file():
        return False
    return json.loads(stamp.read_text()) == {"seed": seed, "vocab_request": vocab_size}


def ensure_slice(work: Path, vocab_size: int, seed: int, rebuild: bool) -> tuple[Path, bool, float]:
    """-> (slice directory, built now?, seconds)."""
    source = work / "slice-fp8"
    if not rebuild and slice_is_current(source, vocab_size, seed):
        log(f"reusing the FP8 slice in {source}")
        return source, False, 0.0
    log(f"building the FP8 slice in {source} (a few minutes)")
    started = time.perf_counter()
    build_slice(source, vocab_size, seed)
    return source, True, time.perf_counter() - started


def parameter_counts(source: Path) -> dict[str, int]:
    """Parameters of the FP8 slice: all, main model, MTP layer (scales not counted)."""
    import math

    config = json.loads((source / "config.json").read_text())
    mtp_prefix = f"model.layers.{config['num_hidden_layers']}."
    counts = {"total": 0, "main": 0, "mtp": 0}
    for file in sorted(source.glob("*.safetensors")):
        with file.open("rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for name, entry in header.items():
            if name == "__metadata__" or name.endswith("_scale_inv"):
                continue
            n = math.prod(entry["shape"])
            counts["total"] += n
            counts["mtp" if name.startswith(mtp_prefix) else "main"] += n
    return counts


# ---------------------------------------------------------------- quantisation


def ensure_quantized(output: Path, args: list[str], step: str, fresh: bool) -> float:
    """Run `localv3 quantize ARGS` unless `output` exists (and the slice was not rebuilt)."""
    if output.exists() and not fresh:
        log(f"reusing {output}")
        return 0.0
    if output.is_dir():
        shutil.rmtree(output)
    elif output.exists():
        output.unlink()
    started = time.perf_counter()
    run_cli(step, args)
    return time.perf_counter() - started


def quantize_all(source: Path, work: Path, pairs: list[Pair], fresh: bool) -> tuple[dict[str, float], list[CliFailure]]:
    timings, failures = {}, []
    jobs = []
    for pair in pairs:
        jobs.append(
            (pair.native_dir(work), ["quantize", str(source), "--experts", pair.experts, "--dense", pair.dense,
                                      "--out", str(pair.native_dir(work))])
        )  # fmt: skip
        jobs.append(
            (pair.gguf_file(work), ["quantize", str(source), "--format", "gguf", "--type", pair.gguf_type,
                                     "--out", str(pair.gguf_file(work))])
        )  # fmt: skip
    for output, args in dict((str(o), (o, a)) for o, a in jobs).values():
        step = f"quantize {output.name}"
        try:
            timings[output.name] = round(ensure_quantized(output, args, step, fresh), 1)
        except CliError as exc:
            failures.append(exc.failure)
    return timings, failures


# ---------------------------------------------------------------- benchmarking


@dataclass
class EngineResult:
    engine: str  # native | llama.cpp
    weights: str  # "experts q4, dense q8" | "gguf q4_k_m"
    model_path: str
    threads: str  # the --threads value passed, or "N (default)"
    pp_tok_s: float | None = None
    pp_tok_s_std: float | None = None
    tg_tok_s: float | None = None
    tg_tok_s_std: float | None = None
    file_bytes: int | None = None
    tg_read_bytes_per_token: float | None = None
    tg_read_gb_s: float | None = None  # effective read bandwidth of decode
    active_weights: dict = field(default_factory=dict)
    placement: str | None = None
    peak_rss_bytes: int | None = None
    load_avg_1m: float | None = None  # this machine's load just before the run: other work skews the figures
    records: list[dict] = field(default_factory=list)  # `localv3 bench --json` as printed
    error: str | None = None
    pp_tok_s_rounds: list[float] = field(default_factory=list)  # each round's pp_tok_s (--rounds)
    tg_tok_s_rounds: list[float] = field(default_factory=list)


@dataclass
class PairResult:
    pair: str
    native: EngineResult
    llama_cpp: EngineResult
    pp_ratio: float | None = None  # native / llama.cpp: the median of the rounds' ratios
    tg_ratio: float | None = None
    pp_ratios: list[float] = field(default_factory=list)  # each round's native / llama.cpp
    tg_ratios: list[float] = field(default_factory=list)


@dataclass
class BenchOptions:
    n_prompt: int
    n_gen: int
    repetitions: int
    threads: int
    pass_threads: bool  # `localv3 bench` has --threads


def default_threads() -> int:
    """What both engines use without --threads: the physical cores (models this wide)."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def bench_model(model: Path, engine: str, weights: str, options: BenchOptions, config: dict) -> EngineResult:
    threads = str(options.threads) if options.pass_threads else f"{default_threads()} (default)"
    result = EngineResult(engine, weights, str(model), threads)
    if not model.exists():
        result.error = f"{model} was not produced"
        return result
    args = ["bench", str(model), "--engine", engine, "-p", str(options.n_prompt), "-n", str(options.n_gen),
            "-r", str(options.repetitions), "--json"]  # fmt: skip
    if options.pass_threads:
        args += ["--threads", str(options.threads)]
    result.load_avg_1m = round(os.getloadavg()[0], 2)
    records = json.loads(run_cli(f"bench {engine} {model.name}", args))
    result.records = records
    for record in records:
        if record.get("mtp"):
            continue
        mean, std = round(record["tok_s_mean"], 3), round(record["tok_s_std"], 3)
        if record["test"].startswith("pp"):
            result.pp_tok_s, result.pp_tok_s_std = mean, std
        elif record["test"].startswith("tg"):
            result.tg_tok_s, result.tg_tok_s_std = mean, std
        result.placement = record.get("placement")
        result.peak_rss_bytes = record.get("peak_rss_bytes")
        if record.get("threads") is not None:  # what the engine computed with, where bench reports it
            result.threads = str(record["threads"])
    add_bandwidth(result, model, config)
    return result


def add_bandwidth(result: EngineResult, model: Path, config: dict) -> None:
    """Active weight bytes per decoded token, and that times tg tok/s."""
    keys = ("num_hidden_layers", "num_experts_per_tok", "n_routed_experts", "vocab_size")
    active = active_weights(model, *(config[k] for k in keys))
    result.file_bytes = model.stat().st_size if model.is_file() else sum(f.stat().st_size for f in model.iterdir())
    result.active_weights = active.to_dict()
    result.tg_read_bytes_per_token = round(active.per_token_bytes)
    if result.tg_tok_s:
        result.tg_read_gb_s = round(active.per_token_bytes * result.tg_tok_s / 1e9, 2)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def bench_round(pair: Pair, work: Path, options: BenchOptions, config: dict, failures: list[CliFailure]) -> list[EngineResult]:
    """One bench of each engine, native first: [native, llama.cpp]."""
    results = []
    for engine, model, weights in (
        ("native", pair.native_dir(work), pair.native_weights),
        ("llama.cpp", pair.gguf_file(work), f"gguf {pair.gguf_type}"),
    ):
        try:
            results.append(bench_model(model, engine, weights, options, config))
        except CliError as exc:
            failures.append(exc.failure)
            threads = str(options.threads) if options.pass_threads else "-"
            results.append(EngineResult(engine, weights, str(model), threads, error=exc.failure.stderr_tail[-2000:]))
    return results


def median_of(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def merged(rounds: list[EngineResult]) -> EngineResult:
    """One engine's rounds as one result: tok/s the median of the rounds', the rest the last round's."""
    result = replace(rounds[-1])
    result.pp_tok_s_rounds = [r.pp_tok_s for r in rounds if r.pp_tok_s is not None]
    result.tg_tok_s_rounds = [r.tg_tok_s for r in rounds if r.tg_tok_s is not None]
    result.pp_tok_s, result.tg_tok_s = median_of(result.pp_tok_s_rounds), median_of(result.tg_tok_s_rounds)
    result.error = next((r.error for r in rounds if r.error), None)
    if result.tg_tok_s and result.tg_read_bytes_per_token:
        result.tg_read_gb_s = round(result.tg_read_bytes_per_token * result.tg_tok_s / 1e9, 2)
    return result


def bench_pair(pair: Pair, work: Path, options: BenchOptions, config: dict, failures: list[CliFailure], rounds: int) -> PairResult:
    native_rounds, llama_rounds = zip(*(bench_round(pair, work, options, config, failures) for _ in range(rounds)))
    pp_ratios = [ratio(n.pp_tok_s, l.pp_tok_s) for n, l in zip(native_rounds, llama_rounds)]
    tg_ratios = [ratio(n.tg_tok_s, l.tg_tok_s) for n, l in zip(native_rounds, llama_rounds)]
    pp_ratios, tg_ratios = [r for r in pp_ratios if r is not None], [r for r in tg_ratios if r is not None]
    return PairResult(
        pair.spec, merged(list(native_rounds)), merged(list(llama_rounds)), median_of(pp_ratios), median_of(tg_ratios), pp_ratios, tg_ratios
    )


# ---------------------------------------------------------------- report


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else "?"


def ratio_cell(median: float | None, ratios: list[float]) -> str:
    """The median ratio, and the rounds' range when there were several."""
    if median is None:
        return "-"
    return f"{median:.2f}x" + (f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else "")


def table(results: list[PairResult]) -> str:
    headers = ["engine", "weights", "threads", "pp tok/s", "tg tok/s", "pp ratio", "tg ratio"]
    headers += ["read GB/tok", "tg read GB/s"]
    rows = []
    for pair in results:
        for r, is_native in ((pair.native, True), (pair.llama_cpp, False)):
            per_token = None if r.tg_read_bytes_per_token is None else r.tg_read_bytes_per_token / 1e9
            rows.append([
                r.engine if not r.error else f"{r.engine} (failed)",
                r.weights,
                r.threads,
                _num(r.pp_tok_s),
                _num(r.tg_tok_s),
                ratio_cell(pair.pp_ratio, pair.pp_ratios) if is_native else "",
                ratio_cell(pair.tg_ratio, pair.tg_ratios) if is_native else "",
                _num(per_token, "{:.3f}"),
                _num(r.tg_read_gb_s),
            ])  # fmt: skip
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        aligned = (c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # text left
        return "| " + " | ".join(aligned) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    notes = [
        f"{r.engine} {r.weights} failed: {last_line(r.error)}"
        for pair in results
        for r in (pair.native, pair.llama_cpp)
        if r.error
    ]
    return "\n".join([line(headers), rule, *(line(row) for row in rows), *notes])


def slice_summary(source: Path) -> dict:
    config = json.loads((source / "config.json").read_text())
    keys = ("hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
            "v_head_dim", "intermediate_size", "moe_intermediate_size", "num_hidden_layers", "first_k_dense_replace",
            "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "n_shared_experts", "vocab_size",
            "num_nextn_predict_layers", "rope_scaling", "quantization_config")  # fmt: skip
    disk = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    return {
        "path": str(source),
        "config": {k: config.get(k) for k in keys},
        "params": parameter_counts(source),
        "fp8_bytes": disk,
    }


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"cache directory (default {DEFAULT_WORK})")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the slice and every quantised model")
    parser.add_argument("--pairs", default=DEFAULT_PAIRS, help=f"comparisons (default {DEFAULT_PAIRS})")
    parser.add_argument("-p", "--n-prompt", type=int, default=64)
    parser.add_argument("-n", "--n-gen", type=int, default=32)
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="alternating benches of each engine per pair (ratios per round)")
    parser.add_argument("--threads", type=int, default=2, help="passed to `localv3 bench` when it has --threads")
    parser.add_argument("--vocab", type=int, default=SLICE_VOCAB, help="tokenizer / model vocabulary size")
    parser.add_argument("--seed", type=int, default=SLICE_SEED)
    parser.add_argument("--json", action="store_true", help="print only the JSON document")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    pairs = parse_pairs(args.pairs)
    cli = discover_cli()
    check_pairs(pairs, cli)
    if not cli.bench_threads:
        log(f"`localv3 bench` has no --threads: both engines use their default ({default_threads()} threads)")
    args.work.mkdir(parents=True, exist_ok=True)
    source, built, build_s = ensure_slice(args.work, args.vocab, args.seed, args.rebuild)
    config = json.loads((source / "config.json").read_text())
    quantize_s, failures = quantize_all(source, args.work, pairs, fresh=built or args.rebuild)
    options = BenchOptions(args.n_prompt, args.n_gen, args.repetitions, args.threads, cli.bench_threads)
    bench_started = time.perf_counter()
    results = [bench_pair(pair, args.work, options, config, failures, args.rounds) for pair in pairs]
    document = {
        "benchmark": "slice_vs_llamacpp",
        "slice": slice_summary(source),
        "settings": {**asdict(options), "rounds": args.rounds, "pairs": [p.spec for p in pairs]},
        "pairs": [asdict(r) for r in results],
        "failures": [asdict(f) for f in failures],
        "timings_s": {
            "build": round(build_s, 1),
            "quantize": quantize_s,
            "bench": round(time.perf_counter() - bench_started, 1),
            "total": round(time.perf_counter() - started, 1),
        },
    }
    if not args.json:
        print(table(results))
        print()
    print(json.dumps(document, indent=2))
    for failure in failures:
        log(f"FAILED {failure.step} (exit {failure.returncode}): {failure.command}\n{failure.stderr_tail}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
