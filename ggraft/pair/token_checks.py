"""The checks of the text vocab against the mmproj: the tokens llama.cpp's mtmd puts around
images (``boundary_tokens``), and the [IMG_BREAK] row a Pixtral mmproj carries, which must be the
text model's own embedding of that token."""
from __future__ import annotations

import gguf
import numpy as np

from ggraft.errors import InputError
from ggraft.gguf_io import gguf_file
from .boundary_tokens import BOUNDARY_TOKENS, LLAMA_CPP_SOURCE
from .findings import ERROR, INFO, WARNING, CheckedPair
from .libmtmd import installed_llama_cpp_python
from .runtime_defects import defects_for

IMG_BREAK_TENSOR = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_TOK_EMBD_IMG_BREAK]
TOKEN_EMBD = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"


def boundary_tokens_present(p: CheckedPair) -> None:
    r = p.report
    if not p.vocab.size:
        r.add("vocab-missing", ERROR, "the text model has no tokenizer.ggml.tokens; llama.cpp cannot tokenize prompts")
        return
    alternatives = BOUNDARY_TOKENS.get(p.projector or "")
    if alternatives is None:
        if p.projector:
            r.add("boundary-unknown", WARNING, f"no boundary-token data for projector type {p.projector!r} "
                  f"(table read from {LLAMA_CPP_SOURCE})")
        return
    heads = p.vocab.find([alt[0].text for alt in alternatives if alt])
    chosen = next((alt for alt in alternatives if alt and alt[0].text in heads), alternatives[-1])
    if not chosen:
        r.add("boundary-tokens", INFO, f"projector {p.projector!r} inserts no boundary tokens")
        return
    ids = p.vocab.find([b.text for b in chosen])
    missing = [b for b in chosen if b.text not in ids]
    installed = installed_llama_cpp_python()
    known = [d for d in defects_for(p.projector, lambda name: p.mmproj.tensor(name) is not None, installed,
                                    p.mmproj.value) if {b.text for b in missing} & set(d.boundary_tokens)]
    for d in known:  # the family's own vocab spells them otherwise: a known runtime defect, and the pair runs
        r.add("boundary-token-missing", WARNING, f"known llama.cpp defect for {p.projector!r} in llama-cpp-python "
              f"{installed}: {d.summary} ({d.reference})",
              "the pair runs, but the model reads plain text where it was trained with one marker token")
    for b in (b for b in missing if not any(b.text in d.boundary_tokens for d in known)):
        effect = ("llama.cpp would put token id -1 into the batch" if b.looked_up
                  else "llama.cpp would split it into pieces the model never saw as an image marker")
        r.add("boundary-token-missing", ERROR,
              f"projector {p.projector!r} marks images with {b.text!r} ({b.role}) but the text vocab has no such "
              f"token: {effect}", f"this text model is not of the mmproj's family; see ggraft audit {p.text.path}")
    plain = [b for b in chosen if b.text in ids and not b.looked_up and b.text.strip()
             and p.vocab.token_type(ids[b.text]) == gguf.TokenType.NORMAL]
    for b in plain:
        r.add("boundary-token-normal", WARNING, f"{b.text!r} (token {ids[b.text]}) is a normal token, not a "
              "special one; llama.cpp may not keep it whole when parsing the prompt")
    if not missing:
        found = ", ".join(f"{b.text!r}={ids[b.text]}" for b in chosen)
        r.add("boundary-tokens", INFO, f"image boundary tokens present: {found}")


def _rel_tolerance(qtype: gguf.GGMLQuantizationType) -> float:
    """Allowed relative L2 difference of an embedding row stored as ``qtype``: ~2 bits' worth of
    quantization noise (bits per weight from gguf-py's GGML_QUANT_SIZES), at least 1%."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return max(0.01, 2.0 ** (2 - 8 * size / block))


def img_break_row_matches(p: CheckedPair) -> None:
    r, m = p.report, p.mmproj
    stored = m.tensor(IMG_BREAK_TENSOR)
    if stored is None:
        return
    ids = p.vocab.find(["[IMG_BREAK]"]) if p.vocab.size else {}
    if "[IMG_BREAK]" not in ids:
        r.add("img-break-missing", ERROR, f"the mmproj carries {IMG_BREAK_TENSOR} but the text vocab has no [IMG_BREAK]",
              "this mmproj belongs to a Pixtral/Mistral model; pair it with one")
        return
    token = ids["[IMG_BREAK]"]
    shard = next((s for s in p.shards if s.tensor(TOKEN_EMBD) is not None), None)
    if shard is None:
        r.add("img-break-unchecked", WARNING, f"the text model has no {TOKEN_EMBD} to compare [IMG_BREAK] with")
        return
    embd = shard.tensor(TOKEN_EMBD)
    try:
        ours = gguf_file.tensor_values(m, IMG_BREAK_TENSOR).reshape(-1)
        theirs = gguf_file.tensor_row(shard, TOKEN_EMBD, token)
    except InputError as e:
        r.add("img-break-unchecked", WARNING, f"could not compare the [IMG_BREAK] rows: {e.message}")
        return
    if ours.shape != theirs.shape:
        r.add("img-break-mismatch", ERROR, f"the mmproj's [IMG_BREAK] row has {ours.size} values, the text model's "
              f"{theirs.size}", "ggraft graft: rebuild the mmproj against this text model")
        return
    rel = float(np.linalg.norm(ours - theirs) / max(float(np.linalg.norm(theirs)), 1e-12))
    tol = _rel_tolerance(embd.tensor_type)
    if not np.isfinite(rel) or rel > tol:
        r.add("img-break-mismatch", ERROR,
              f"the mmproj's [IMG_BREAK] embedding differs from the text model's row for token {token} "
              f"(relative difference {rel:.3g}, allowed {tol:.3g} for {embd.tensor_type.name}): "
              "a donor mmproj reused on another model or fine-tune",
              "ggraft graft: rebuild the mmproj's [IMG_BREAK] row from this text model")
    else:
        r.add("img-break", INFO, f"[IMG_BREAK] row matches the text model's token {token} (relative difference {rel:.2g})")
