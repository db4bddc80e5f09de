"""`localv3 quantize`: a Hugging Face checkpoint (FP8 block-scaled or BF16) -> a localv3 checkpoint.

Streaming: input shards are read one at a time and each tensor in chunks of rows (FP8 blocks
are row-aligned, quantisation groups run along rows), every chunk is dequantised, requantised
and written into place in an output shard whose header was written first
(localv3.stream_writer). Peak memory is the pages of the one input shard being read (mapped
files count towards RSS) plus one chunk's working set, whatever the model size.

Roles (localv3.formats.roles): routed experts -> `experts` (q4|q8); attention projections but
kv_b_proj, shared experts, dense FFN -> `dense` (bf16|q8|q4); the formats and which block type
each row length takes are localv3.formats.table's; the router is stored in fp32; everything
else (norms, embeddings, lm_head, eh_proj, kv_b_proj: held in the compute dtype) keeps its
stored precision, FP8 as bf16. The
MTP layer's copies of embed_tokens and lm_head are not written (the model uses the main ones).

Output is atomic: written to `.NAME.partial-PID` beside the target and renamed when complete;
any failure or Ctrl-C removes it. One quantize at a time writes a target: `.NAME.lock` beside it
is held (flock) from the check that the target is free to the rename.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from localv3.checkpoint import (
    FLOAT_DTYPES,
    INDEX_FILE,
    SCALE_SUFFIX,
    CheckpointReader,
    TensorInfo,
    dequantize_fp8_blocks,
)
from localv3.config import ModelConfig
from localv3.errors import CheckpointError, LocalV3Error
from localv3.files import free_disk_bytes
from localv3.formats import ggml
from localv3.formats.blocks import quantize_to
from localv3.formats.roles import weight_role
from localv3.formats.table import ABSORBED_SCHEME, BLOCK_TYPES, DENSE_SCHEMES, EXPERT_SCHEMES, FORMATS, QUANTIZED
from localv3.quantized import MANIFEST_NAME, Manifest, qweight_name
from localv3.render import format_bytes
from localv3.stream_writer import StreamedSafetensors, OutputTensor

EXPERT_CHOICES = EXPERT_SCHEMES
DENSE_CHOICES = DENSE_SCHEMES
CHUNK_ELEMENTS = 8 * 1024 * 1024  # rows per chunk: ~32 MiB of fp32 working set
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
DISK_MARGIN = 64 * 1024 * 1024
COPIED_FILES = ("*.json", "*.jinja", "*.model", "*.tiktoken", "*.txt", "*.py")

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_MTP_COPIES = (".embed_tokens.weight", ".shared_head.head.weight")


class QuantizeError(LocalV3Error):
    """The conversion cannot start or could not finish."""


class NotEnoughDiskError(QuantizeError):
    pass


class OutputError(QuantizeError):
    """The output location exists already or cannot be written."""


@dataclass(frozen=True)
class QuantizeSettings:
    experts: str = "q4"
    dense: str = "q8"

    def __post_init__(self):
        if self.experts not in EXPERT_CHOICES:
            raise QuantizeError(f"--experts must be one of {', '.join(EXPERT_CHOICES)}, not {self.experts!r}")
        if self.dense not in DENSE_CHOICES:
            raise QuantizeError(f"--dense must be one of {', '.join(DENSE_CHOICES)}, not {self.dense!r}")


@dataclass(frozen=True)
class TensorJob:
    """One source tensor: how it is stored in the output."""

    source: TensorInfo
    scheme: str  # a block type (q4_k, q4_0, q8_0: quantised) or a dtype name: bf16 | fp32 | same
    outputs: tuple[OutputTensor, ...]
    scale: TensorInfo | None = None  # FP8 block scales

    @property
    def source_bytes(self) -> int:
        return self.source.nbytes + (self.scale.nbytes if self.scale else 0)


@dataclass
class ConversionSummary:
    path: Path
    source_bytes: int  # tensor data read
    output_bytes: int  # tensor data written
    seconds: float


@dataclass
class Progress:
    """Callbacks for a progress display: start(total_tensors, total_bytes), advance(tensors, bytes)."""

    start: Callable[[int, int], None] = lambda tensors, nbytes: None
    advance: Callable[[int, int], None] = lambda tensors, nbytes: None


@dataclass
class _Plan:
    shards: dict[Path, list[TensorJob]]  # input shard -> its jobs, in file order
    dropped: list[str] = field(default_factory=list)

    @property
    def jobs(self) -> list[TensorJob]:
        return [job for jobs in self.shards.values() for job in jobs]


def tensor_scheme(name: str, info: TensorInfo, config: ModelConfig, settings: QuantizeSettings) -> str | None:
    """How the tensor `name` is stored, by its role (localv3.formats.roles): q4/q8 (where its
    rows take a block type), bf16, fp32, `same` (as stored), or None (dropped)."""
    layer = _LAYER.match(name)
    if layer and int(layer.group(1)) >= config.num_hidden_layers and name.endswith(_MTP_COPIES):
        return None
    role = weight_role(name, len(info.shape))
    if role == "experts":
        return settings.experts
    if role == "router":
        return "fp32"
    if role == "dense":
        return settings.dense
    if role == "absorbed" and FORMATS[settings.dense].quantized:
        return ABSORBED_SCHEME
    return "bf16" if info.dtype in FP8_DTYPES else "same"


def plan(reader: CheckpointReader, config: ModelConfig, settings: QuantizeSettings) -> _Plan:
    """Every output tensor with its dtype and shape, checked before anything is written."""
    result = _Plan(shards={})
    for name, info in reader.tensors.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if info.dtype not in FLOAT_DTYPES or not info.shape:
            raise CheckpointError(
                f"{info.file}: tensor {name} is a {info.dtype} of shape {list(info.shape)}; "
                "expected float (F32, F16, BF16, F8) weights"
            )
        scheme = tensor_scheme(name, info, config, settings)
        if scheme is None:
            result.dropped.append(name)
            continue
        scale = None
        if info.dtype in FP8_DTYPES:
            if name + SCALE_SUFFIX not in reader:
                raise CheckpointError(f"{info.file}: FP8 tensor {name} has no {name + SCALE_SUFFIX}")
            scale = reader.info(name + SCALE_SUFFIX)
        stored = FORMATS[scheme].block_type(info.shape[-1]) if scheme in QUANTIZED and len(info.shape) == 2 else None
        if stored is not None:
            scheme = stored.name
            out_features, in_features = info.shape
            outputs = (OutputTensor(qweight_name(name), torch.uint8, (out_features, stored.row_bytes(in_features))),)
        else:  # float, or rows no block type of the scheme divides: bf16, as the planner sizes them
            dtype = {"fp32": torch.float32, "same": info.dtype}.get(scheme, torch.bfloat16)
            outputs = (OutputTensor(name, dtype, info.shape),)
        result.shards.setdefault(info.file, []).append(TensorJob(info, scheme, outputs, scale))
    return result


def iter_rows(handle, info: TensorInfo, reader: CheckpointReader) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, rows) chunks of tensor `info` from its open safetensors file: FP8 weights in
    whole blocks of rows, dequantised to fp32; other dtypes as stored. Chunks hold about
    CHUNK_ELEMENTS values, so no tensor is ever read whole."""
    rows = info.shape[0]
    columns = max(info.nbytes // max(rows, 1) // info.dtype.itemsize, 1)
    step = max(CHUNK_ELEMENTS // columns, 1)
    scale_inv = None
    if info.dtype in FP8_DTYPES:
        block_rows = reader.fp8_block[0]
        step = max(step // block_rows, 1) * block_rows
        scale_inv = reader.raw(info.name + SCALE_SUFFIX)  # [ceil(out / bo), ceil(in / bi)], small
    source = handle.get_slice(info.name)
    for first in range(0, rows, step):
        last = min(first + step, rows)
        chunk = source[first:last]
        if scale_inv is not None:
            blocks = scale_inv[first // block_rows : -(-last // block_rows)]
            chunk = dequantize_fp8_blocks(chunk, blocks, reader.fp8_block)
        yield first, chunk


def _convert_tensor(job: TensorJob, handle, reader: CheckpointReader, writer: StreamedSafetensors, advance) -> None:
    row_bytes = job.source.nbytes // max(job.source.shape[0], 1)
    for first, chunk in iter_rows(handle, job.source, reader):
        if job.scheme in BLOCK_TYPES:
            writer.write_rows(job.outputs[0].name, first, quantize_to(chunk, BLOCK_TYPES[job.scheme]).data)
        else:
            writer.write_rows(job.outputs[0].name, first, chunk.to(job.outputs[0].dtype))
        advance(0, chunk.shape[0] * row_bytes)
    advance(1, job.scale.nbytes if job.scale else 0)


def _shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def _write_shards(reader: CheckpointReader, work: _Plan, out: Path, progress: Progress) -> dict[str, str]:
    """All output shards (one per input shard that has output) -> the index's weight_map."""
    shards = [(source, jobs) for source, jobs in work.shards.items() if jobs]
    weight_map = {}
    for index, (source, jobs) in enumerate(shards, start=1):
        file = _shard_name(index, len(shards))
        writer = StreamedSafetensors(out / file, [spec for job in jobs for spec in job.outputs])
        try:
            with safe_open(str(source), framework="pt") as handle:
                for job in jobs:
                    _convert_tensor(job, handle, reader, writer, progress.advance)
            writer.finish()
        finally:
            writer.close()
            reader.close()  # drop mapped shards (scales may live in other files)
        weight_map.update({spec.name: file for job in jobs for spec in job.outputs})
    return weight_map


def _copy_side_files(source: Path, out: Path) -> None:
    """Tokenizer and generation files; config.json without the FP8 quantization_config."""
    for pattern in COPIED_FILES:
        for path in source.glob(pattern):
            if path.name not in ("config.json", INDEX_FILE, MANIFEST_NAME) and path.is_file():
                shutil.copy2(path, out / path.name)
    raw = json.loads((source / "config.json").read_text(encoding="utf-8"))
    raw.pop("quantization_config", None)
    raw["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")


def partial_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.partial-{os.getpid()}"


def remove_stale_partials(target: Path) -> None:
    """Work directories of earlier runs for the same target whose process is gone (killed)."""
    for path in target.parent.glob(f".{target.name}.partial-*"):
        pid = path.name.rpartition("-")[2]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_output(target: Path, needed_bytes: int) -> Path:
    """Check the target is free and its disk large enough; create and return the work directory."""
    if target.exists():
        raise OutputError(f"{target} already exists; remove it (`localv3 rm`) or choose another --out")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(target)
        free = free_disk_bytes(target.parent)
    except OSError as exc:
        raise OutputError(f"cannot write to {target.parent}: {exc.strerror or exc}") from None
    if free < needed_bytes + DISK_MARGIN:
        raise NotEnoughDiskError(
            f"not enough disk space in {target.parent}: the output needs {format_bytes(needed_bytes)}, "
            f"{format_bytes(free)} free"
        )
    work = partial_dir(target)
    try:
        work.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot write to {target.parent}: {exc.strerror or exc}") from None
    return work


@contextlib.contextmanager
def exclusive_target(target: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside `target` for the block; a second writer of the same target is
    refused at once rather than losing the race at the final rename."""
    lock_path = target.parent / f".{target.name}.lock"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(
                    f"another quantize is writing {target}; wait for it to finish or choose another --out"
                ) from None
            if lock_path.exists() and lock_path.stat().st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the holder before us removed this file as we opened it: take the new one
    except OSError as exc:
        raise OutputError(f"cannot write to {target.parent}: {exc.strerror or exc}") from None
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # still held: nobody else can be past the flock on this inode
        os.close(fd)


def atomic_output(target: Path, needed_bytes: int, build: Callable[[Path], Path]) -> None:
    """build(work_dir) writes the output in a fresh work directory beside `target` and returns
    what becomes `target` (the directory itself, or a file in it), renamed into place; any
    failure or Ctrl-C removes the work directory, so nothing half-written ever looks finished."""
    with exclusive_target(target):
        work = prepare_output(target, needed_bytes)
        try:
            result = build(work)
            _rename_unless_taken(result, target)
        except BaseException as exc:
            shutil.rmtree(work, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise NotEnoughDiskError(f"disk full while writing {target}: the partial output was removed") from None
            raise
        if result != work:
            shutil.rmtree(work, ignore_errors=True)


def _rename_unless_taken(result: Path, target: Path) -> None:
    """Move the finished output into place; something created at `target` meanwhile (not by a
    quantize: those wait on the lock) is left alone and this output dropped."""
    taken = OutputError(f"{target} was created by something else while this quantize ran; the new output was dropped")
    if target.exists():
        raise taken
    try:
        result.rename(target)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
            raise taken from None
        raise


def open_source(source_dir: Path) -> tuple[ModelConfig, CheckpointReader]:
    """The config and (header-checked) weights of a Hugging Face checkpoint to convert."""
    if (Path(source_dir) / MANIFEST_NAME).is_file():
        raise QuantizeError(f"{source_dir} is already a localv3 quantized checkpoint; convert the original model")
    config = ModelConfig.from_file(source_dir)
    return config, CheckpointReader(source_dir, config.fp8_block_size or (128, 128))


def quantize_checkpoint(
    source_dir: Path,
    target: Path,
    settings: QuantizeSettings,
    source_info: dict,
    progress: Progress = Progress(),
) -> ConversionSummary:
    """Convert the HF checkpoint in `source_dir` into a localv3 checkpoint at `target`."""
    started = time.perf_counter()
    config, reader = open_source(source_dir)
    work = plan(reader, config, settings)
    jobs = work.jobs
    if any(job.scheme in BLOCK_TYPES for job in jobs) and not ggml.available():
        raise QuantizeError("quantising to q4/q8 uses ggml's quantiser: pip install 'localv3[llama]' (llama-cpp-python)")
    output_bytes = sum(spec.nbytes for job in jobs for spec in job.outputs)
    source_bytes = sum(job.source_bytes for job in jobs)
    manifest = Manifest(
        experts=settings.experts,
        dense=settings.dense,
        source={**source_info, "dtype": "fp8" if config.fp8_block_size else str(config.torch_dtype or "bf16")},
        tensors={job.source.name: job.scheme for job in jobs if job.scheme in BLOCK_TYPES},
        dropped=work.dropped,
    )

    def build(out: Path) -> Path:
        progress.start(len(jobs), source_bytes)
        weight_map = _write_shards(reader, work, out, progress)
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1) + "\n")
        _copy_side_files(source_dir, out)
        manifest.write(out)
        return out

    atomic_output(target, output_bytes, build)
    return ConversionSummary(target, source_bytes, output_bytes, time.perf_counter() - started)
