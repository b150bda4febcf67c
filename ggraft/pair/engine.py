"""llama.cpp through llama-cpp-python: quiet, with its log captured, and its refusals turned
into one-line ``EngineError``s (instead of "Failed to load mtmd context").

``VisionEncoder`` runs an mmproj on RGB pixels through the mtmd bindings
(``mtmd_tokenize_from_parts`` → ``mtmd_encode_chunk`` → ``mtmd_get_output_embd``) and returns
the image embeddings llama.cpp would feed the text model.

Every text model is loaded with ``text_model_params``: llama.cpp's extra buffer types (weight
repacking, AMX) stay on unless the installed llama.cpp reports AMX, whose matrix kernels crash
on every quantized model (ggml-org/llama.cpp#20824); ``GGRAFT_EXTRA_BUFTS=1/0`` (or the
``extra_bufts`` argument, ``run``/``serve --extra-bufts/--no-extra-bufts``) decides instead.
"""
from __future__ import annotations

import ctypes
import os
import re
import sys
from collections import deque
from pathlib import Path

import numpy as np

from ggraft.errors import EngineError, InputError

_LOG: deque[tuple[int, str]] = deque(maxlen=400)
_LEVEL_ERROR, _LEVEL_CONT = 4, 5  # ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_callbacks: list = []  # keep ctypes callbacks alive
_last_level = 2
_ERROR_WORDS = re.compile(r"error|mismatch|unable|failed|invalid|not supported|unknown|missing", re.I)


def _install_log_capture() -> None:
    """Route llama.cpp's and mtmd's log into ``_LOG`` (echoed on stderr with GGRAFT_VERBOSE=1)."""
    if _callbacks:
        return
    import llama_cpp
    from llama_cpp import mtmd_cpp

    verbose = os.environ.get("GGRAFT_VERBOSE") == "1"

    @llama_cpp.llama_log_callback
    def capture(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        global _last_level
        level = _last_level if level == _LEVEL_CONT else level
        _last_level = level
        line = text.decode("utf-8", errors="replace") if text else ""
        _LOG.append((level, line))
        if verbose:
            print(line, end="", file=sys.stderr, flush=True)

    _callbacks.append(capture)
    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_log_set(capture, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(capture, ctypes.c_void_p(0))


def clear_log() -> None:
    _LOG.clear()


def log_reason(default: str) -> str:
    """The most telling line llama.cpp logged since ``clear_log`` (errors first)."""
    lines = [(lvl, " ".join(t.split())) for lvl, t in _LOG if t.strip()]
    errors = [t for lvl, t in lines if lvl == _LEVEL_ERROR]
    for t in reversed(errors):  # prefer the specific cause over the generic "failed to load"
        if not re.search(r"failed to load (clip )?model from|error loading model$", t, re.I):
            return t
    if errors:
        return errors[-1]
    worded = [t for _, t in lines if _ERROR_WORDS.search(t)]
    return worded[-1] if worded else default


#: environment variable that turns llama.cpp's extra buffer types on (1) or off (0) for text models
EXTRA_BUFTS_ENV = "GGRAFT_EXTRA_BUFTS"
_AMX = re.compile(r"\bAMX_INT8 = 1\b")  # ggml-cpu's llama_print_system_info() entry for its AMX kernels
_SWITCH = {"1": True, "on": True, "true": True, "yes": True, "0": False, "off": False, "false": False, "no": False}


def extra_bufts_wanted(system_info: str, option: bool | None = None, env: str | None = None) -> bool:
    """Whether to load text models with llama.cpp's extra buffer types (``use_extra_bufts``).

    ``option`` (a command's flag) wins, then ``env`` (the value of GGRAFT_EXTRA_BUFTS); without
    either they are on unless ``system_info`` (``llama_print_system_info()``) reports AMX_INT8."""
    if option is not None:
        return option
    if env is not None and env.strip():
        try:
            return _SWITCH[env.strip().lower()]
        except KeyError:
            raise InputError(f"{EXTRA_BUFTS_ENV}={env!r}: expected 1 or 0") from None
    return _AMX.search(system_info) is None


def system_info() -> str:
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")


def text_model_params(vocab_only: bool = False, n_gpu_layers: int = 0, extra_bufts: bool | None = None):
    """The ``llama_model_params`` every text model is loaded with (see the module docstring)."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = vocab_only
    params.n_gpu_layers = n_gpu_layers
    params.use_extra_bufts = extra_bufts_wanted(system_info(), extra_bufts, os.environ.get(EXTRA_BUFTS_ENV))
    return params


def open_llama(model_path: str | Path, *, extra_bufts: bool | None = None, n_gpu_layers: int = 0, **kwargs):
    """``llama_cpp.Llama`` for a text GGUF, loaded with ``text_model_params``."""
    from ggraft import compat

    _install_log_capture()
    params = text_model_params(n_gpu_layers=n_gpu_layers, extra_bufts=extra_bufts)
    return compat.llama_with_model_params(params, str(model_path), n_gpu_layers=n_gpu_layers, **kwargs)


def load_text_model(path: str | Path, vocab_only: bool = True, n_gpu_layers: int = 0, extra_bufts: bool | None = None):
    """A ``llama_model *`` for a text GGUF (only the vocab and hyper-parameters by default)."""
    import llama_cpp

    _install_log_capture()
    params = text_model_params(vocab_only, n_gpu_layers, extra_bufts)
    clear_log()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise EngineError(f"{path}: llama.cpp could not load the text model: {log_reason('unknown reason')}")
    return model


def free_text_model(model) -> None:
    import llama_cpp

    if model:
        llama_cpp.llama_model_free(model)


class VisionEncoder:
    """An mmproj loaded in llama.cpp, ready to turn images into embeddings."""

    def __init__(self, mmproj: str | Path, text_model=None, n_threads: int | None = None, use_gpu: bool = False):
        from llama_cpp import mtmd_cpp

        _install_log_capture()
        self._mtmd = mtmd_cpp
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.print_timings = False
        params.warmup = False
        params.n_threads = n_threads or max(1, os.cpu_count() or 1)
        clear_log()
        self.ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), text_model, params)
        if not self.ctx:
            raise EngineError(f"{mmproj}: llama.cpp refused the mmproj: {log_reason('unknown reason')}")

    def encode(self, rgb: np.ndarray, n_embd: int) -> np.ndarray:
        """Embeddings (n_tokens, n_embd) of the first image chunk of an RGB uint8 image (H, W, 3):
        the whole image for families that do not tile."""
        images = [c for kind, c in self.encode_chunks(rgb, n_embd, first_image_only=True) if kind == "image"]
        if not images:
            raise EngineError("llama.cpp produced no image chunk")
        return images[0]

    def encode_chunks(self, rgb: np.ndarray, n_embd: int,
                      first_image_only: bool = False) -> list[tuple[str, np.ndarray]]:
        """Every chunk mtmd makes of one image, in the order it feeds them to the model: ("image",
        embeddings (n_tokens, n_embd)) for tiles, slices and views, ("text", token ids) for the
        markers between them."""
        m = self._mtmd
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        h, w, _ = rgb.shape
        buf = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        bitmap = m.mtmd_bitmap_init(w, h, buf)
        chunks = m.mtmd_input_chunks_init()
        out: list[tuple[str, np.ndarray]] = []
        try:
            part = m.mtmd_input_part(text=None, bitmap=bitmap)
            parts = (ctypes.POINTER(m.mtmd_input_part) * 1)(ctypes.pointer(part))
            clear_log()
            if m.mtmd_tokenize_from_parts(self.ctx, chunks, parts, 1, False) != 0:
                raise EngineError(f"llama.cpp could not prepare the image: {log_reason('tokenize failed')}")
            for i in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                n_tokens = m.mtmd_input_chunk_get_n_tokens(chunk)
                if m.mtmd_input_chunk_get_type(chunk) != m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    size = ctypes.c_size_t()
                    ids = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(size))
                    out.append(("text", np.array(ids[:size.value], dtype=np.int32)))
                    continue
                if m.mtmd_encode_chunk(self.ctx, chunk) != 0:
                    raise EngineError(f"llama.cpp could not encode the image: {log_reason('encode failed')}")
                embd = m.mtmd_get_output_embd(self.ctx)
                out.append(("image", np.ctypeslib.as_array(embd, shape=(n_tokens * n_embd,)).reshape(n_tokens, n_embd).copy()))
                if first_image_only:
                    break
            return out
        finally:
            m.mtmd_input_chunks_free(chunks)
            m.mtmd_bitmap_free(bitmap)

    def close(self) -> None:
        if self.ctx:
            self._mtmd.mtmd_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> "VisionEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
