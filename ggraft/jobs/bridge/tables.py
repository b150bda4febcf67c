"""The token embedding rows of a text GGUF, as llama.cpp feeds them to the model.

Rows are read through the validated header index, a chunk of the table at a time: only the
wanted rows of a chunk are dequantized, and the file's pages are handed back after each chunk,
so reading costs the float32 rows asked for plus one chunk.

Some text architectures scale the token embeddings in their graph but not the raw embeddings an
mmproj feeds (``TOKEN_ONLY_SQRT_WIDTH``, ``embedding_scale`` with DeepStack): there the space an
image embedding must land in is the *scaled* rows, and ``input_scale`` says by how much.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import gguf
import numpy as np

from ggraft.errors import InputError
from ggraft.gguf_io import numeric
from ggraft.gguf_io.gguf_file import GGUFIndex
from ggraft.pair.headers import text_shards

K = gguf.Keys
TOKEN_EMBD = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
#: text architectures whose graph multiplies token embeddings, and not raw (image) embeddings, by
#: sqrt(n_embd): src/models/gemma3.cpp:91, gemma3n.cpp:102, gemma4.cpp:165, gemma-embedding.cpp:83
#: (gemma and gemma2 scale both, so their image embeddings live among the stored rows)
TOKEN_ONLY_SQRT_WIDTH = ("gemma3", "gemma3n", "gemma4", "gemma-embedding")
CHUNK_BYTES = 16 << 20  # float32 bytes of table rows dequantized at a time


@dataclass
class TextModel:
    """A text GGUF as the bridge needs it: its vocab (the first shard's header) and embedding table."""

    index: GGUFIndex
    table: GGUFIndex  # the shard holding token_embd.weight
    architecture: str
    width: int
    input_scale: float

    @property
    def name(self) -> str:
        return self.index.path.name


def input_scale(index: GGUFIndex, arch: str, width: int) -> float:
    """What llama.cpp multiplies this architecture's token embeddings by, relative to raw embeddings."""
    if arch in TOKEN_ONLY_SQRT_WIDTH:
        return math.sqrt(width)
    deepstack = int(index.value(K.LLM.NUM_DEEPSTACK_LAYERS.format(arch=arch), 0) or 0)
    scale = index.value(K.LLM.EMBEDDING_SCALE.format(arch=arch))
    if deepstack and isinstance(scale, (int, float)) and scale:  # llama-graph.cpp 2447: tokens only
        return float(scale)
    return 1.0


def open_text_model(index: GGUFIndex, role: str) -> TextModel:
    """``index`` (a text GGUF's first shard) as a TextModel, or an InputError naming ``role``."""
    arch = index.value(K.General.ARCHITECTURE, "")
    if arch == "clip":
        raise InputError(f"{index.path}: is an mmproj; {role} is a text GGUF")
    width = index.value(K.LLM.EMBEDDING_LENGTH.format(arch=arch))
    if not isinstance(width, int) or width <= 0:
        raise InputError(f"{index.path}: has no {K.LLM.EMBEDDING_LENGTH.format(arch=arch)}: not a text GGUF?")
    table = next((s for s in text_shards(index) if s.tensor(TOKEN_EMBD) is not None), None)
    if table is None:
        raise InputError(f"{index.path}: has no {TOKEN_EMBD} to read token embeddings from")
    t = table.tensor(TOKEN_EMBD)
    if len(t.shape) != 2 or int(t.shape[0]) != width:
        raise InputError(f"{index.path}: {TOKEN_EMBD} is {tuple(t.shape)}, not {width} wide")
    return TextModel(index, table, arch, width, input_scale(index, arch, width))


def _dequantized(model: TextModel, raw: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F16:  # ggml's vectorised conversion
        return numeric.to_float32(raw.view(np.float16))
    try:
        return gguf.quants.dequantize(raw, qtype).astype(np.float32, copy=False)
    except NotImplementedError:
        raise InputError(f"{model.table.path}: {TOKEN_EMBD} is {qtype.name}, which gguf-py cannot dequantize") from None


def embedding_rows(model: TextModel, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` (any order, each < vocab) of the token embedding table, times ``input_scale``,
    as float32 (len(ids), width)."""
    t = model.table.tensor(TOKEN_EMBD)
    width, n_rows = int(t.shape[0]), int(t.shape[1])
    if len(ids) and (ids.min() < 0 or ids.max() >= n_rows):
        raise InputError(f"{model.table.path}: {TOKEN_EMBD} has {n_rows} rows, fewer than the vocab's tokens")
    out = np.empty((len(ids), width), np.float32)
    order = np.argsort(ids, kind="stable")
    wanted = ids[order]
    row_bytes = t.n_bytes // max(n_rows, 1)
    per_chunk = max(1, CHUNK_BYTES // (4 * width))
    for start in range(0, n_rows, per_chunk):
        stop = min(n_rows, start + per_chunk)
        lo, hi = np.searchsorted(wanted, [start, stop])
        if lo == hi:
            continue
        raw = model.table.raw(t, start, stop - start)[wanted[lo:hi] - start]  # copies the wanted rows only
        out[order[lo:hi]] = _dequantized(model, raw, t.tensor_type).reshape(hi - lo, width)
        model.table.drop_pages(t.offset + start * row_bytes, t.offset + stop * row_bytes)
    if model.input_scale != 1.0:
        out *= np.float32(model.input_scale)
    return out
