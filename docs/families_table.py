"""Regenerate the README's supported-families table from the converter registry and the
fidelity figures the tests recorded (.cache/fidelity/*.json, written by conftest.record_fidelity).

Run `make test` first, then `make families-table`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ggraft.converter import discover

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / ".cache" / "fidelity"
START, END = "<!-- families:start -->", "<!-- families:end -->"
TYPES = ("f32", "f16", "bf16", "q8_0")


def load_results() -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for f in sorted(RESULTS.glob("*.json")):
        r = json.loads(f.read_text())
        out.setdefault(r["family"], {})[r["outtype"]] = r
    return out


def figure(r: dict | None) -> str:
    if r is None:
        return "–"
    if r["passed"]:
        return f"{r['min_cosine']:.6f}"
    if r.get("runtime_note") and r.get("runtime_min_cosine") is not None:
        return f"{r['runtime_min_cosine']:.6f}¹"
    return f"**{r['min_cosine']:.4f}** (below bar)"


def keys_for(cls) -> set[str]:
    return {cls.__module__.rsplit(".", 1)[-1], cls.projector_type, cls.__name__.lower(), cls.family}


def table() -> str:
    results = load_results()
    rows = ["| family | HF architectures | projector | image tokens | " + " | ".join(f"min cos {t}" for t in TYPES) + " |",
            "|---|---|---|---|" + "---|" * len(TYPES)]
    seen = set()
    notes = False
    for cls in sorted({c for cs in discover().values() for c in cs}, key=lambda c: c.family):
        if cls in seen:
            continue
        seen.add(cls)
        res = next((results[k] for k in keys_for(cls) if k in results), {})
        cells = [figure(res.get(t)) for t in TYPES]
        notes |= any(c.endswith("¹") for c in cells)
        tokens = ", ".join(f"`{t}`".replace("|", "\\|") for t in cls.image_tokens) or "–"  # | splits cells
        rows.append(f"| {cls.family} | {', '.join(f'`{a}`' for a in cls.architectures)} | `{cls.projector_type}` "
                    f"| {tokens} | " + " | ".join(cells) + " |")
    text = "\n".join(rows) + "\n\nMinimum per-token cosine between llama.cpp's image embeddings and transformers' " \
        "`get_image_features` on the same pixels, measured by the test suite through `ggraft verify` " \
        "(bars: 0.9999 f32, 0.999 f16/bf16, 0.99 q8_0)."
    if notes:
        text += ("\n\n¹ llama.cpp's runtime departs from transformers for this family (see its converter's note and "
                 "*Known llama.cpp deviations* below); the figure is against transformers' own modules run the way "
                 "the runtime runs them, which shows the file itself is exact.")
    return text


def main() -> None:
    readme = README.read_text()
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), f"{START}\n{table()}\n{END}", readme, flags=re.S)
    README.write_text(new)
    print(table())


if __name__ == "__main__":
    main()
