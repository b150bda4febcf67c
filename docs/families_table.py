"""Regenerate the README's coverage table: every vision projector type of the installed llama.cpp
(``docs/coverage.py``), ggraft's converters for it (the registry, ``discover()``) and the fidelity
figures the tests recorded (.cache/fidelity/*.json, written by conftest.record_fidelity).

Run `make test` first, then `make families-table`.  ``families_block()`` returns the text
without touching the README.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: docs.coverage sits beside this file
    sys.path.insert(0, str(ROOT))

from docs.coverage import AUDIO_PROJECTOR_TYPES, NOT_IN_LLAMA_CPP, ROWS, TRANSFORMERS_READ, ProjectorRow  # noqa: E402
from ggraft.mmproj.converter import Converter, discover  # noqa: E402
from ggraft.pair.boundary_tokens import LLAMA_CPP_PYTHON, LLAMA_CPP_SOURCE  # noqa: E402

README = ROOT / "README.md"
RESULTS = ROOT / ".cache" / "fidelity"
START, END = "<!-- families:start -->", "<!-- families:end -->"
TYPES = ("f32", "f16", "bf16", "q8_0")
HEADER = ("projector type", "HF architectures", "llama.cpp converter", "transformers", "ggraft converter",
          *(f"min cos {t}" for t in TYPES))
NONE = "–"


def load_results(folder: Path = RESULTS) -> dict[str, dict[str, dict]]:
    """{label: {outtype: record}} of the fidelity records the tests wrote."""
    out: dict[str, dict[str, dict]] = {}
    for f in sorted(folder.glob("*.json")):
        r = json.loads(f.read_text())
        out.setdefault(r["family"], {})[r["outtype"]] = r
    return out


def figure(r: dict | None) -> str:
    if r is None:
        return NONE
    if r["passed"]:
        return f"{r['min_cosine']:.6f}"
    if r.get("runtime_note") and r.get("runtime_min_cosine") is not None:
        return f"{r['runtime_min_cosine']:.6f}¹"
    return f"**{r['min_cosine']:.4f}** (below bar)"


def converters_by_projector() -> dict[str, list[type[Converter]]]:
    """Registered converters by the projector type they write, each family once, by family name."""
    out: dict[str, list[type[Converter]]] = {}
    for cls in sorted({c for cs in discover().values() for c in cs}, key=lambda c: c.family):
        out.setdefault(cls.projector_type, []).append(cls)
    return out


def results_for(cls: type[Converter], results: dict[str, dict[str, dict]],
                converters: list[type[Converter]]) -> dict[str, dict]:
    """The figures a test recorded for ``cls``: under its family or class name, else under its
    projector type or module name when no other converter shares that."""
    module = cls.__module__.rsplit(".", 1)[-1]
    keys = [cls.family, cls.__name__.lower()]
    if sum(c.projector_type == cls.projector_type for c in converters) == 1:
        keys.append(cls.projector_type)
    if sum(c.__module__ == cls.__module__ for c in converters) == 1:
        keys.append(module)
    return next((results[k] for k in keys if k in results), {})


def code(name: str) -> str:
    return f"`{name}`".replace("|", "\\|")  # a bare | would split the cell


def architectures(row: ProjectorRow, converters: list[type[Converter]]) -> list[str]:
    """The row's architectures, then any a registered converter of its type adds."""
    names = list(row.architectures)
    names += [a for cls in converters for a in cls.architectures if a not in names]
    return names


def transformers_cell(row: ProjectorRow, archs: list[str]) -> str:
    note = f"; {row.transformers_note}" if row.transformers_note else ""
    if not row.transformers:
        return f"no: {row.transformers_note}" if row.transformers_note else "no"
    if set(row.transformers) == set(archs):
        return "yes" + note
    return ", ".join(map(code, row.transformers)) + note


def row_lines(row: ProjectorRow, by_type: dict[str, list[type[Converter]]], results: dict) -> list[str]:
    """One line per ggraft family of the row's projector type (one 'not yet' line when none)."""
    converters = by_type.get(row.projector_type, [])
    archs = architectures(row, converters)
    shared = [f"{code(row.projector_type)} — {row.models}", ", ".join(map(code, archs)) or NONE,
              row.llama_cpp, transformers_cell(row, archs)]
    if not converters:
        return ["| " + " | ".join([*shared, f"not yet: {row.pending}", *[NONE] * len(TYPES)]) + " |"]
    taken = {a for cls in converters for a in cls.architectures}
    left_out = [a for a in archs if a not in taken]
    all_converters = [c for cs in by_type.values() for c in cs]
    lines = []
    for i, cls in enumerate(converters):
        ggraft = cls.family
        if left_out and i == len(converters) - 1:
            ggraft += "<br>not yet: " + (row.pending or ", ".join(map(code, left_out)))
        res = results_for(cls, results, all_converters)
        cells = [*(shared if i == 0 else [code(row.projector_type), "", "", ""]), ggraft,
                 *(figure(res.get(t)) for t in TYPES)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def notes(runtime_figures: bool) -> str:
    text = ("Minimum per-token cosine between llama.cpp's image embeddings and transformers' `get_image_features` on "
            "the same pixels, measured by the test suite through `ggraft verify` (bars: 0.9999 f32, 0.999 f16/bf16, "
            "0.99 q8_0).")
    if runtime_figures:
        text += ("\n\n¹ llama.cpp's runtime departs from transformers for this family (see its converter's note and "
                 "*Known llama.cpp deviations* below); the figure is against transformers' own modules run the way "
                 "the runtime runs them, which shows the file itself is exact.")
    text += (f"\n\n*llama.cpp converter*: whether `convert_hf_to_gguf.py --mmproj` of that llama.cpp takes the model "
             f"(or only the legacy scripts in `tools/mtmd/legacy-models/`). *transformers*: the classes of "
             f"transformers {TRANSFORMERS_READ} that build it; ggraft proves every conversion against one, so a model "
             f"without one cannot be covered yet. The other {len(AUDIO_PROJECTOR_TYPES)} projector types of "
             f"`clip-impl.h` encode audio or generate speech ({', '.join(map(code, AUDIO_PROJECTOR_TYPES))}) and are "
             f"not listed. transformers also builds {', '.join(NOT_IN_LLAMA_CPP[:-1])} and {NOT_IN_LLAMA_CPP[-1]}, "
             f"which no converter or projector type of that llama.cpp takes.")
    return text


def families_block(results: dict[str, dict[str, dict]] | None = None) -> str:
    """The README's coverage table with its heading line and notes (the text between the markers)."""
    results = load_results() if results is None else results
    by_type = converters_by_projector()
    unknown = sorted(set(by_type) - {row.projector_type for row in ROWS})
    if unknown:
        raise ValueError(f"registered projector types without a row in docs/coverage.py: {', '.join(unknown)}")
    covered = [row for row in ROWS if row.projector_type in by_type]
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in covered + [row for row in ROWS if row.projector_type not in by_type]:
        lines += row_lines(row, by_type, results)
    heading = (f"**{len(covered)} of {len(ROWS)}** vision projector types of the installed llama.cpp "
               f"({LLAMA_CPP_SOURCE}, vendored by llama-cpp-python {LLAMA_CPP_PYTHON}) have a ggraft converter.")
    runtime_figures = any("¹ |" in line for line in lines)
    return heading + "\n\n" + "\n".join(lines) + "\n\n" + notes(runtime_figures)


def main() -> None:
    block = families_block()
    readme = README.read_text()
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{block}\n{END}", readme, flags=re.S)
    README.write_text(new)
    print(block)


if __name__ == "__main__":
    main()
