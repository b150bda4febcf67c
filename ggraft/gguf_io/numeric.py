"""Float conversion and quantization of tensor data, through llama.cpp's ggml when it can be
loaded, else numpy and gguf-py.

numpy converts float16 one value at a time (~2-3 ns a value), which made it most of a merge's
time; ggml's CPU library, which llama-cpp-python ships for ggraft to run models with, converts
with F16C/AVX (~0.1 ns a value).  Both round to nearest even: over every float32 bit pattern the
results are identical except for the payload of NaNs (still NaN).  For the block types in
``GGML_QUANTIZED``, ggml's quantizer (the one llama-quantize uses) writes the bytes gguf-py's
numpy quantizer writes for every finite input, 2x (Q8_0) to 9x (BF16) faster and with no
temporaries.  So the choice changes no result.  The libraries are found beside
llama-cpp-python's package without importing it.
"""
from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
#: (base library, CPU library) file names by platform
_LIBRARIES = (("libggml-base.so", "libggml-cpu.so"), ("libggml-base.dylib", "libggml-cpu.dylib"),
              ("ggml-base.dll", "ggml-cpu.dll"))
#: block types quantized by ggml (byte-identical to gguf-py's, tested); others go to gguf-py
GGML_QUANTIZED = (Q.Q8_0, Q.BF16)


@dataclass(frozen=True)
class _Ggml:
    base: ctypes.CDLL  # ggml_quantize_chunk
    cpu: ctypes.CDLL  # the vectorised float16 conversions


def _load_ggml() -> _Ggml | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "lib"
    for base_name, cpu_name in _LIBRARIES:
        if not (folder / cpu_name).is_file():
            continue
        try:
            base = ctypes.CDLL(str(folder / base_name), mode=ctypes.RTLD_GLOBAL)
            cpu = ctypes.CDLL(str(folder / cpu_name))
            for name in ("ggml_cpu_fp16_to_fp32", "ggml_cpu_fp32_to_fp16"):
                fn = getattr(cpu, name)
                fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
            quantize = base.ggml_quantize_chunk
            quantize.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                 ctypes.c_int64, ctypes.c_void_p]
            quantize.restype = ctypes.c_size_t
            cpu.ggml_cpu_init()
            return _Ggml(base, cpu)
        except (OSError, AttributeError):
            return None
    return None


_GGML = _load_ggml()
ACCELERATED = _GGML is not None


def encoded_layout(shape: tuple[int, ...], qtype: Q) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the array ``quantize`` makes of float32 values of ``shape``."""
    if qtype in (Q.F32, Q.F16):
        return tuple(shape), np.dtype(np.float32 if qtype == Q.F32 else np.float16)
    return gguf.quants.quant_shape_to_byte_shape(shape, qtype), np.dtype(np.uint8)


def quantize(values: np.ndarray, qtype: Q, out: np.ndarray | None = None) -> np.ndarray:
    """float32 values encoded as ``qtype``, rows along the last axis (gguf-py's layout): a new
    array, or ``out`` (C-contiguous, of ``encoded_layout``)."""
    if qtype == Q.F16:
        return to_float16(values, out)
    if qtype != Q.F32 and (_GGML is None or qtype not in GGML_QUANTIZED):
        encoded = gguf.quants.quantize(np.asarray(values, np.float32), qtype)
        if out is not None:
            out[...] = encoded
        return encoded if out is None else out
    values = np.ascontiguousarray(values, np.float32)
    shape, dtype = encoded_layout(values.shape, qtype)  # (raises for a row that is not whole blocks)
    out = np.empty(shape, dtype) if out is None else out
    _check_out(out, shape, dtype)
    if qtype == Q.F32:
        out[...] = values
    else:
        row_len = values.shape[-1] if values.ndim else 1
        _GGML.base.ggml_quantize_chunk(int(qtype), values.ctypes.data, out.ctypes.data, 0,
                                       values.size // row_len, row_len, None)
    return out


def to_float32(half: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A float16 array as float32: a new array, or ``out`` (C-contiguous, of the same shape)."""
    return _convert(half, np.float16, np.float32, "ggml_cpu_fp16_to_fp32", out)


def to_float16(single: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A float32 array as float16, rounding to nearest even: a new array, or ``out``
    (C-contiguous, of the same shape)."""
    return _convert(single, np.float32, np.float16, "ggml_cpu_fp32_to_fp16", out)


def _convert(values: np.ndarray, source, target, ggml_function: str, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        out = np.empty(np.shape(values), target)
    if _GGML is None:
        out[...] = values
        return out
    values = np.ascontiguousarray(values, source)
    _check_out(out, values.shape, target)
    getattr(_GGML.cpu, ggml_function)(values.ctypes.data, out.ctypes.data, values.size)
    return out


def _check_out(out: np.ndarray, shape: tuple[int, ...], dtype) -> None:
    if out.shape != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {np.dtype(dtype)} array of shape {tuple(shape)}")
