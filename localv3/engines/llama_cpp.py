"""The llama.cpp engine: GGUF models through llama-cpp-python's low-level API.

Same interface as the native engine (sessions with prefill/decode returning logits), so
stream_generate, chat, run and bench work unchanged. Placement follows the design: routed
expert tensors (`ffn_*_exps`) are pinned to the CPU buffer type through
`tensor_buft_overrides` in the model params (`Llama()` has no parameter for it), the rest is
offloaded with n_gpu_layers; threads default to the physical cores.

The engine owns one llama.cpp context of max_context tokens; a new session clears it, so one
session is live at a time (using an older one raises).
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
import torch

from localv3.config import ModelConfig
from localv3.engines import DEFAULT_MAX_CONTEXT
from localv3.engines.base import Engine
from localv3.engines.llama_backend import (
    CPU_MOE_PATTERN,
    LOG,
    LlamaCppError,
    cpu_buffer_type,
    cpu_has_amx,
    init_backend,
    override_array,
    physical_cores,
)
from localv3.errors import ContextFullError
from localv3.gguf_config import config_from_gguf, token_or_none
from localv3.tokenizer import Tokenizer

MAX_BATCH = 512
KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}
_OVERRIDDEN = re.compile(r"tensor (\S+) .*buffer type overridden to (\S+)")


@dataclass(frozen=True)
class LlamaCppSettings:
    max_context: int
    n_threads: int
    n_gpu_layers: int
    flash_attn: bool
    kv_type: str


def load_gguf(
    path: str | Path,
    n_gpu_layers: int | None = None,
    n_threads: int | None = None,
    cpu_moe: bool = True,
    max_context: int | None = None,
    flash_attn: bool | None = None,
    kv_type: str = "f16",
    extra_buffers: bool | None = None,
) -> LlamaCppEngine:
    """Load a GGUF file.

    n_gpu_layers: layers offloaded to the GPU (default: all when llama.cpp was built with GPU
    support, else 0). cpu_moe: keep the routed experts in CPU memory. flash_attn: default on
    only with GPU support: llama.cpp's CPU flash attention (f16 dot products) moved the logits
    of a tiny random model by up to 1.7, 4e-6 without it. kv_type: f16 (llama.cpp's default)
    or f32. extra_buffers: llama.cpp's CPU extra buffer types (AMX, repacked weights); by
    default off where llama.cpp was built with AMX: on the AMX development machine its AMX
    kernels crash (F16/Q8_0 models abort in the graph scheduler, Q4_K dies of SIGILL in
    `tilezero`); on elsewhere.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise LlamaCppError(f"{path}: GGUF file not found")
    if kv_type not in KV_TYPES:
        raise LlamaCppError(f"kv_type must be one of {', '.join(KV_TYPES)}, not {kv_type!r}")
    init_backend()
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = (999 if gpu else 0) if n_gpu_layers is None else n_gpu_layers
    params.use_extra_bufts = not cpu_has_amx() if extra_buffers is None else extra_buffers
    overrides = override_array({CPU_MOE_PATTERN: cpu_buffer_type()}) if cpu_moe else None
    if overrides is not None:
        params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
    with LOG.capture() as lines:
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise LlamaCppError(f"llama.cpp could not load {path}: {LOG.last_error() or 'see its log'}")
    metadata = _metadata(model)
    config = config_from_gguf(metadata, str(path))
    tokenizer = Tokenizer(path.parent) if (path.parent / "tokenizer.json").is_file() else LlamaCppTokenizer(model, metadata)
    settings = LlamaCppSettings(
        max_context=min(max_context or DEFAULT_MAX_CONTEXT, config.max_position_embeddings),
        n_threads=n_threads or physical_cores(),
        n_gpu_layers=params.n_gpu_layers,
        flash_attn=gpu if flash_attn is None else flash_attn,
        kv_type=kv_type,
    )
    engine = LlamaCppEngine(path, model, config, tokenizer, settings)
    engine.cpu_tensors = [m.group(1) for m in map(_OVERRIDDEN.search, lines) if m and m.group(2) == "CPU"]
    return engine


def _metadata(model) -> dict[str, str]:
    """GGUF key -> value as llama.cpp prints it (numbers as text; arrays are not listed)."""
    buffer = ctypes.create_string_buffer(4096)
    metadata = {}
    for i in range(llama_cpp.llama_model_meta_count(model)):
        llama_cpp.llama_model_meta_key_by_index(model, i, buffer, len(buffer))
        key = buffer.value.decode()
        length = llama_cpp.llama_model_meta_val_str_by_index(model, i, buffer, len(buffer))
        if length >= len(buffer):  # long values (the chat template): ask again with room for them
            big = ctypes.create_string_buffer(length + 1)
            llama_cpp.llama_model_meta_val_str_by_index(model, i, big, len(big))
            metadata[key] = big.value.decode("utf-8", errors="replace")
        else:
            metadata[key] = buffer.value.decode("utf-8", errors="replace")
    return metadata


class LlamaCppTokenizer(Tokenizer):
    """llama.cpp's tokenizer (the GGUF's vocabulary) behind localv3's Tokenizer interface, for
    GGUF files without tokenizer files beside them. Chat rendering is the base class's, on
    the GGUF's `tokenizer.chat_template`; the tokenizer files are not read (no super().__init__)."""

    def __init__(self, model, metadata: dict[str, str]):
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.chat_template = metadata.get("tokenizer.chat_template")
        self.chat_templates = {"default": self.chat_template} if self.chat_template else {}
        self.template_source = "the GGUF's tokenizer.chat_template"
        self.bos_token_id = token_or_none(llama_cpp.llama_vocab_bos(self.vocab))
        self.eos_token_id = token_or_none(llama_cpp.llama_vocab_eos(self.vocab))
        self.bos_token = self._text(self.bos_token_id)
        self.eos_token = self._text(self.eos_token_id)
        self.add_bos_token = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self._template = None

    def _text(self, token_id: int | None) -> str | None:
        if token_id is None:
            return None
        return llama_cpp.llama_vocab_get_text(self.vocab, token_id).decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return llama_cpp.llama_vocab_n_tokens(self.vocab)

    def token_to_id(self, token: str) -> int | None:
        ids = self.encode(token, add_bos=False)
        return ids[0] if len(ids) == 1 else None

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        return self._tokenize(text, self.add_bos_token if add_bos is None else add_bos, parse_special=True)

    def _spells_special(self, text: str) -> bool:
        return self._tokenize(text, False, parse_special=True) != self._encode_as_text(text)

    def _encode_as_text(self, text: str) -> list[int]:
        return self._tokenize(text, False, parse_special=False)

    def _tokenize(self, text: str, add_bos: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 2
        tokens = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_bos, parse_special)
        if n < 0:  # never more tokens than bytes + BOS, but follow the API's contract
            tokens = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, -n, add_bos, parse_special)
        return list(tokens[:n])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if not ids:
            return ""
        array = (llama_cpp.llama_token * len(ids))(*ids)
        size = 16 * len(ids) + 16
        buffer = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(self.vocab, array, len(ids), buffer, size, False, not skip_special_tokens)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_detokenize(self.vocab, array, len(ids), buffer, -n, False, not skip_special_tokens)
        return buffer.raw[:n].decode("utf-8", errors="replace")


class LlamaCppSession:
    """One sequence in the engine's context: prefill/decode return the last token's logits [V]."""

    def __init__(self, engine: LlamaCppEngine, capacity: int):
        self.engine = engine
        self.capacity = min(capacity, engine.max_context)
        self.position = 0
        engine._begin(self)

    def forward(self, token_ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """Run tokens at the current position -> logits [S, V] (all_logits) or [V] (last token)."""
        engine = self.engine
        if engine._live is not self:
            raise LlamaCppError("this llama.cpp session was replaced by a newer one (one session at a time)")
        if self.position + len(token_ids) > self.capacity:
            raise ContextFullError(f"the context is full ({self.capacity} tokens)")
        batch, rows = engine._batch, []
        for start in range(0, len(token_ids), engine.n_batch):
            part = token_ids[start : start + engine.n_batch]
            batch.n_tokens = len(part)
            for i, token in enumerate(part):
                batch.token[i] = token
                batch.pos[i] = self.position + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = all_logits or start + i == len(token_ids) - 1
            status = llama_cpp.llama_decode(engine._ctx, batch)
            if status != 0:
                raise LlamaCppError(f"llama_decode failed (status {status}): {LOG.last_error() or 'see its log'}")
            self.position += len(part)
            if all_logits:
                rows += [engine._logits(i) for i in range(len(part))]
        return torch.stack(rows) if all_logits else engine._logits(-1)

    def prefill(self, token_ids: list[int]) -> torch.Tensor:
        return self.forward(list(token_ids))

    def decode(self, token_id: int) -> torch.Tensor:
        return self.forward([token_id])


class LlamaCppEngine(Engine):
    name = "llama.cpp"

    def __init__(self, path: Path, model, config: ModelConfig, tokenizer, settings: LlamaCppSettings):
        self.path = path
        self.config = config
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_context = settings.max_context
        self.n_batch = min(MAX_BATCH, settings.max_context)
        self.cpu_tensors: list[str] = []  # tensors placed in CPU memory by the overrides
        self._model = model
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = settings.max_context
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = settings.n_threads
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.type_k = params.type_v = KV_TYPES[settings.kv_type]
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(model, params)
        if not self._ctx:
            llama_cpp.llama_model_free(model)
            raise LlamaCppError(f"llama.cpp could not create a {settings.max_context}-token context: {LOG.last_error()}")
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._live: LlamaCppSession | None = None

    @property
    def placement(self) -> str:
        layers = min(self.settings.n_gpu_layers, self.config.num_hidden_layers + 1)  # + the output layer
        return f"llama.cpp: {layers} layers on GPU, {len(self.cpu_tensors)} expert tensors on CPU, {self.settings.n_threads} threads"

    @property
    def kv_bytes_per_token(self) -> int:
        """llama.cpp caches the MLA latent and the rope key, in kv_type."""
        return self.config.kv_bytes_per_token(2 if self.settings.kv_type == "f16" else 4)

    def new_session(self, capacity: int) -> LlamaCppSession:
        return LlamaCppSession(self, capacity)

    def _begin(self, session: LlamaCppSession) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        self._live = session

    def _logits(self, index: int) -> torch.Tensor:
        pointer = llama_cpp.llama_get_logits_ith(self._ctx, index)
        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(self._n_vocab,)).copy())

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """[len(token_ids), vocab] fp32 from one prefill."""
        return self.new_session(len(token_ids)).forward(list(token_ids), all_logits=True)

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = self._model = None

    def __del__(self):
        self.close()
