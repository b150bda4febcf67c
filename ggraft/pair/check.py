"""``ggraft check``: is a text GGUF + mmproj GGUF pair compatible?  From headers, fast.

Both files are read through ``gguf_file.scan_gguf`` (validated memory-mapped headers; at most
one embedding row of tensor data).  Findings are typed (code, severity, message, hint); the CLI
renders them.  Exit semantics: ``ok`` (no error finding) -> 0, errors -> 1; an input that cannot
be read, or is not what its position needs (a text model given as the mmproj, the two swapped,
a missing shard) raises ``InputError`` (2).

The rules mirror what the installed llama.cpp does with the pair: the width it compares in
``mtmd_context`` (``clip_n_mmproj_embd`` vs ``llama_model_n_embd_inp``), the tokens
``init_vision`` puts around images (``boundary_tokens``), the projector names its ``libmtmd``
knows, how llama-cpp-python renders the chat template with an image.

The checks are run in ``CHECKS``'s order; what they read from the headers is in ``headers``
(with ``vocab``), what the installed llama.cpp knows in ``libmtmd`` and ``requirements``
(``ggraft.mmproj``), the vocab checks in ``token_checks`` and ``text_fit``, and the finding types
in ``findings``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import gguf

from ggraft.errors import DependencyError, InputError
from ggraft.gguf_io import gguf_file
from ggraft.gguf_io.gguf_file import GGUFIndex
from ggraft.mmproj.requirements_fit import MmprojHeader, mmproj_problems
from .boundary_tokens import LLAMA_CPP_PYTHON, LLAMA_CPP_SOURCE
from .chat_template import MEDIA_MARKER, TemplateTooCostly, render_with_image
from .findings import ERROR, INFO, WARNING, CheckedPair, CheckReport, Finding
from .headers import (describe_mmproj, describe_text, projection_width, projector_type, refuse_wrong_roles, role,
                      text_shards, text_width)
from .libmtmd import installed_llama_cpp_python, llama_cpp_knows
from .runtime_defects import defects_for
from .text_fit import text_architecture_fit
from .token_checks import boundary_tokens_present, img_break_row_matches
from .vocab import Vocab

__all__ = ["CHECKS", "MMPROJ_CHECKS", "CheckReport", "Finding", "check_mmproj", "check_pair"]
K = gguf.Keys


def _general(p: CheckedPair) -> None:
    r = p.report
    if p.text.value(K.General.TYPE) == gguf.GGUFType.ADAPTER:
        r.add("text-is-adapter", ERROR, f"{p.text.path}: is a LoRA adapter (general.type 'adapter'), not a model",
              "give the base model, and apply the adapter when running it")
    m_type = p.mmproj.value(K.General.TYPE)
    if m_type is None:
        r.add("mmproj-type", INFO, "the mmproj has no general.type (older converters did not write it)")
    elif m_type != gguf.GGUFType.MMPROJ:
        r.add("mmproj-type", WARNING, f"the mmproj's general.type is {m_type!r}, not 'mmproj'")
    if len(p.shards) > 1:
        r.add("split-text", INFO, f"the text model is split into {len(p.shards)} shards; all are present")
    if int(p.mmproj.value(K.Split.LLM_KV_SPLIT_COUNT, 0) or 0) > 1:
        r.add("split-mmproj", ERROR, "the mmproj is split into shards; llama.cpp's mmproj loader reads one file",
              "merge it: llama-gguf-split --merge FIRST-SHARD.gguf mmproj.gguf")


def _vision(p: CheckedPair) -> None:
    r, m = p.report, p.mmproj
    if not m.value(K.Clip.HAS_VISION_ENCODER, False):
        audio = m.value(K.Clip.HAS_AUDIO_ENCODER, False)
        r.add("no-vision-encoder", ERROR,
              "the mmproj has an audio encoder but no vision encoder: it cannot take images" if audio
              else "the mmproj has no vision encoder (clip.has_vision_encoder is not true)",
              "use the vision mmproj of this model")
    if p.projector is None:
        stored = m.value(K.Clip.PROJECTOR_TYPE)
        r.add("projector-missing", ERROR, "the mmproj has no clip.projector_type; llama.cpp cannot load it"
              if stored is None else f"the mmproj's clip.projector_type is {stored!r}, not a string; "
              "llama.cpp cannot load it")
        return
    known = llama_cpp_knows(p.projector)
    if known is None:
        r.add("projector-unchecked", WARNING,
              f"could not find llama-cpp-python's libmtmd to check projector type {p.projector!r}")
    elif known:
        r.add("projector", INFO, f"projector type {p.projector!r} is known to the installed llama.cpp "
              f"(llama-cpp-python {installed_llama_cpp_python()})")
    else:
        r.add("projector-unknown", ERROR,
              f"projector type {p.projector!r} is unknown to the installed llama.cpp "
              f"(llama-cpp-python {installed_llama_cpp_python()})",
              "upgrade llama-cpp-python, or use an mmproj converted for this llama.cpp")


def _llama_cpp_requirements(p: CheckedPair) -> None:
    """What the installed llama.cpp refuses, aborts or crashes on (``requirements``)."""
    for problem in mmproj_problems(MmprojHeader.from_index(p.mmproj), p.projector):
        p.report.add("llama-cpp-requirement", problem.severity, f"{p.mmproj.path}: {problem.message}",
                     "the mmproj is damaged or not made for its projector type; convert it again with ggraft convert"
                     if problem.severity == ERROR else None)


def _width(p: CheckedPair) -> None:
    r = p.report
    text, (proj, source) = text_width(p.text), projection_width(p.mmproj, p.projector)
    arch = p.text.value(K.General.ARCHITECTURE, "")
    if text is None:
        r.add("text-width-missing", ERROR, f"the text model has no {arch}.embedding_length; llama.cpp cannot load it")
        return
    if proj is None:
        severity = ERROR if source.startswith("missing tensor") else WARNING
        r.add("projection-width-unknown", severity, f"cannot tell the mmproj's output width ({source})")
        return
    dim = p.mmproj.value(K.ClipVision.PROJECTION_DIM)
    if isinstance(dim, int) and source != K.ClipVision.PROJECTION_DIM and dim != proj and p.projector != "qwen3vl_merger":
        r.add("projection-dim-key", WARNING,
              f"clip.vision.projection_dim says {dim} but llama.cpp uses {proj} (from {source})")
    if proj != text:
        r.add("width-mismatch", ERROR,
              f"the mmproj projects to {proj} but the text model's embedding width is {text}",
              "this mmproj belongs to another model family or size")
    else:
        r.add("width", INFO, f"the mmproj projects to {proj}, the text model's embedding width")


def _chat_template(p: CheckedPair) -> None:
    r, t = p.report, p.text
    template = t.value(K.Tokenizer.CHAT_TEMPLATE)
    if not isinstance(template, str) or not template.strip():
        r.add("chat-template-missing", WARNING, "the text model has no tokenizer.chat_template: ggraft run sends a "
              "plain prompt, and LM Studio / Ollama need a template to place images",
              "add the model's template (tokenizer_config.json chat_template) when converting the text model")
        return
    bos_eos, f = [], t.fields.get(K.Tokenizer.LIST)
    for key in (K.Tokenizer.BOS_ID, K.Tokenizer.EOS_ID):
        i = t.value(key)
        bos_eos.append(t.string_at(f, i) if isinstance(i, int) and f is not None and 0 <= i < f.count else "")
    try:
        prompt = render_with_image(template, *bos_eos)
    except (ImportError, DependencyError) as e:
        r.add("chat-template-unchecked", WARNING, f"cannot render the chat template here ({e})")
        return
    except TemplateTooCostly as e:  # llama-cpp-python would spin on it for every request
        r.add("chat-template-too-costly", ERROR, f"{e}: it loops far more than a chat template needs",
              "replace tokenizer.chat_template, or use ggraft run --raw")
        return
    except Exception as e:  # a template is arbitrary code: any failure is a finding, not a crash
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        r.add("chat-template-error", WARNING, f"the chat template fails on a user message with an image: {first}",
              "fix or replace tokenizer.chat_template, or use ggraft run --raw")
        return
    if MEDIA_MARKER not in prompt:
        r.add("chat-template-no-image", WARNING, "the chat template drops images: a user message with an image "
              "renders without a place for it", "use a template that renders list content parts (image and text)")
    else:
        r.add("chat-template", INFO, "the chat template places images")


def _runtime_defects(p: CheckedPair) -> None:
    installed = installed_llama_cpp_python()
    for d in defects_for(p.projector, lambda name: p.mmproj.tensor(name) is not None, installed, p.mmproj.value):
        if d.boundary_tokens:
            continue  # boundary_tokens_present reports it, where the text vocab lacks those tokens
        p.report.add("runtime-defect", WARNING, f"known llama.cpp defect for {d.projector!r} in llama-cpp-python "
                     f"{installed}: {d.summary} ({d.reference})",
                     "the pair runs, but its image embeddings differ from transformers'; see `ggraft verify`"
                     if d.affects == "embeddings" else
                     "the pair runs, but the prompt around its images differs from what the model was trained on")


CHECKS: tuple[Callable[[CheckedPair], None], ...] = (
    _general, _vision, _llama_cpp_requirements, _width, text_architecture_fit, boundary_tokens_present,
    img_break_row_matches, _chat_template, _runtime_defects)
#: the checks that need no text model (``check_mmproj``)
MMPROJ_CHECKS: tuple[Callable[[CheckedPair], None], ...] = (_vision, _llama_cpp_requirements)


def check_mmproj(mmproj: str | Path) -> CheckReport:
    """The mmproj half of ``check_pair``, for loading an mmproj without a text model (verify)."""
    m = gguf_file.scan_gguf(mmproj, "mmproj GGUF")
    if role(m) == "text":
        arch = m.value(K.General.ARCHITECTURE)
        raise InputError(f"{m.path}: is not an mmproj (general.architecture {arch!r}; an mmproj has 'clip')")
    projector = projector_type(m)
    report = CheckReport(mmproj=describe_mmproj(m, projector))
    pair = CheckedPair(None, [], m, None, projector, report)  # type: ignore[arg-type]  # no text side
    for check in MMPROJ_CHECKS:
        check(pair)
    return report


def check_pair(text: str | Path | GGUFIndex, mmproj: str | Path | GGUFIndex) -> CheckReport:
    """Check a pair from its headers (paths, or indexes a caller has already scanned);
    unreadable or misplaced inputs raise InputError."""
    t = text if isinstance(text, GGUFIndex) else gguf_file.scan_gguf(text, "text GGUF")
    m = mmproj if isinstance(mmproj, GGUFIndex) else gguf_file.scan_gguf(mmproj, "mmproj GGUF")
    refuse_wrong_roles(t, m)
    shards = text_shards(t)
    vocab = Vocab(t, t.value(K.Tokenizer.MODEL))
    projector = projector_type(m)
    report = CheckReport(text=describe_text(t, shards, vocab), mmproj=describe_mmproj(m, projector))
    pair = CheckedPair(t, shards, m, vocab, projector, report)
    for check in CHECKS:
        check(pair)
    installed = installed_llama_cpp_python()
    if installed not in (LLAMA_CPP_PYTHON, "not found"):
        report.add("table-version", INFO, f"boundary-token table read from {LLAMA_CPP_SOURCE} (llama-cpp-python "
                   f"{LLAMA_CPP_PYTHON}); installed llama-cpp-python is {installed}")
    return report
