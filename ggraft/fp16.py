"""float16 <-> float32, through llama.cpp's ggml when it can be loaded, else numpy.

numpy converts float16 one value at a time (~2-3 ns a value), which made it most of a merge's
time; ggml's CPU library, which llama-cpp-python ships for ggraft to run models with, converts
with F16C/AVX (~0.1 ns a value).  Both round to nearest even: over every float32 bit pattern the
results are identical except for the payload of NaNs (still NaN), so the choice changes no
result.  The library is found beside llama-cpp-python's package without importing it.
"""
from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np

#: (base library, CPU library) file names by platform
_LIBRARIES = (("libggml-base.so", "libggml-cpu.so"), ("libggml-base.dylib", "libggml-cpu.dylib"),
              ("ggml-base.dll", "ggml-cpu.dll"))


def _load_ggml_cpu() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "lib"
    for base, cpu in _LIBRARIES:
        if not (folder / cpu).is_file():
            continue
        try:
            ctypes.CDLL(str(folder / base), mode=ctypes.RTLD_GLOBAL)
            lib = ctypes.CDLL(str(folder / cpu))
            for name in ("ggml_cpu_fp16_to_fp32", "ggml_cpu_fp32_to_fp16"):
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
            lib.ggml_cpu_init()
            return lib
        except (OSError, AttributeError):
            return None
    return None


_GGML = _load_ggml_cpu()
ACCELERATED = _GGML is not None


def to_float32(half: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A float16 array as float32: a new array, or ``out`` (C-contiguous, of the same shape)."""
    if out is None:
        out = np.empty(np.shape(half), np.float32)
    if _GGML is None:
        out[...] = half
        return out
    half = np.ascontiguousarray(half, np.float16)
    _check_out(out, half.shape, np.float32)
    _GGML.ggml_cpu_fp16_to_fp32(half.ctypes.data, out.ctypes.data, half.size)
    return out


def to_float16(single: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A float32 array as float16, rounding to nearest even: a new array, or ``out``
    (C-contiguous, of the same shape)."""
    if out is None:
        out = np.empty(np.shape(single), np.float16)
    if _GGML is None:
        out[...] = single
        return out
    single = np.ascontiguousarray(single, np.float32)
    _check_out(out, single.shape, np.float16)
    _GGML.ggml_cpu_fp32_to_fp16(single.ctypes.data, out.ctypes.data, single.size)
    return out


def _check_out(out: np.ndarray, shape: tuple[int, ...], dtype) -> None:
    if out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {np.dtype(dtype)} array of shape {shape}")
