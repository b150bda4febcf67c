"""The model card (README.md) of an LM Studio package."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from ggraft import __version__
from ggraft.pair.check import CheckReport

def model_card(info: dict[str, Any], report: CheckReport, files: list, fixes: list[str],
               prov: dict[str, Any], lms_commands: list[str]) -> str:
    found, text, mm = report.findings, info["text"], info["mmproj"]
    width = report.text.get("embedding_length") or text["embedding_length"]
    projected = report.mmproj.get("projection_width") or mm["projection_dim"]
    checks = [f"- {f.severity} `{f.code}`: {f.message}" for f in found] or ["- no findings"]
    rows = [f"| `{Path(f.path).name}` | {f.bytes:,} | `{f.sha256}` |" for f in files]
    lines = [
        "---", "tags: [gguf, llama.cpp, vision, image-text-to-text, ggraft]", "pipeline_tag: image-text-to-text", "---",
        f"# {info['name']}", "",
        "A text model and its vision projector (mmproj) for llama.cpp, LM Studio and other llama.cpp",
        f"runtimes, packed by ggraft {__version__}.", "",
        "| | |", "| --- | --- |",
        f"| Recipient (text model) | {info['recipient']} (`{text['architecture']}`) |",
        f"| Donor (vision encoder) | {info['donor']} |",
        f"| Projector type | `{mm['projector_type']}` |",
        f"| Widths | text embedding {width}; projector output {projected}; "
        f"vision encoder {mm['vision_width']} ({mm['vision_blocks']} blocks, image {mm['image_size']} px, "
        f"patch {mm['patch_size']}) |",
        f"| Check | {'passed' if report.ok else 'failed'} ({sum(f.severity == 'error' for f in found)} errors, "
        f"{sum(f.severity == 'warning' for f in found)} warnings) |",
        f"| ggraft | {__version__} |", "",
        "## Files", "", "| file | bytes | sha256 |", "| --- | ---: | --- |", *rows, "",
        "`sha256sum -c SHA256SUMS` verifies them.", "",
        "## Check (`ggraft check`)", "", *checks, "",
    ]
    if prov:
        lines += ["## Provenance (`ggraft.*` keys of the mmproj)", "",
                  *[f"- `ggraft.{k}`: {v}" for k, v in sorted(prov.items())], ""]
    if fixes:
        lines += ["## Metadata set in this copy of the mmproj", "", *[f"- {fix}" for fix in fixes], ""]
    t, m = (shlex.quote(Path(f.path).name) for f in files[:2])
    lines += [
        "## How to load", "",
        f"- **LM Studio**: this folder belongs at `<models folder>/{info['publisher']}/{info['name']}/` "
        "(by default `~/.lmstudio/models`); LM Studio pairs the model with the mmproj file beside it and",
        "  offers image input. Or import the files with LM Studio's CLI:", "", "  ```sh",
        *[f"  {c}" for c in lms_commands], "  ```", "",
        f"- **llama.cpp**: `llama-mtmd-cli -m {t} --mmproj {m} --image photo.jpg -p \"Describe the image.\"`,",
        f"  or serve it: `llama-server -m {t} --mmproj {m}`.",
        f"- **ggraft**: `ggraft run {t} {m} --image photo.jpg -p \"Describe the image.\"`", "",
    ]
    return "\n".join(lines)
