"""``ggraft check``: is a text GGUF + mmproj GGUF pair compatible?  From headers only.

Findings are typed (code, severity, message, hint); the CLI renders them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf

from . import gguf_file

ERROR, WARNING, INFO = "error", "warning", "info"


@dataclass
class Finding:
    code: str
    severity: str
    message: str
    hint: str | None = None


@dataclass
class CheckReport:
    text: dict[str, Any] = field(default_factory=dict)
    mmproj: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity == ERROR for f in self.findings)

    def add(self, code: str, severity: str, message: str, hint: str | None = None) -> None:
        self.findings.append(Finding(code, severity, message, hint))

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "findings": [asdict(f) for f in self.findings], "text": self.text, "mmproj": self.mmproj}


def check_pair(text: str | Path, mmproj: str | Path) -> CheckReport:
    """Check a pair from its headers; unreadable inputs raise InputError."""
    t = gguf_file.open_gguf(text, "text GGUF")
    m = gguf_file.open_gguf(mmproj, "mmproj GGUF")
    report = CheckReport()
    t_arch = gguf_file.value(t, gguf.Keys.General.ARCHITECTURE, "")
    m_arch = gguf_file.value(m, gguf.Keys.General.ARCHITECTURE, "")
    report.text = {"path": str(text), "architecture": t_arch,
                   "embedding_length": gguf_file.value(t, f"{t_arch}.embedding_length")}
    report.mmproj = {"path": str(mmproj), "architecture": m_arch,
                     "projector_type": gguf_file.value(m, gguf.Keys.Clip.PROJECTOR_TYPE),
                     "projection_dim": gguf_file.value(m, gguf.Keys.ClipVision.PROJECTION_DIM)}
    if t_arch == "clip" and m_arch != "clip":
        report.add("swapped", ERROR, "the files are the wrong way round: the first is an mmproj, the second a text model",
                   "give the text model first, then the mmproj")
        return report
    if m_arch != "clip":
        report.add("not-mmproj", ERROR, f"{mmproj}: general.architecture is {m_arch!r}, not 'clip': not an mmproj")
    if t_arch == "clip":
        report.add("not-text", ERROR, f"{text}: is an mmproj, not a text model")
    if not report.ok:
        return report
    width, proj = report.text["embedding_length"], report.mmproj["projection_dim"]
    if width and proj and int(width) != int(proj):
        report.add("width-mismatch", ERROR,
                   f"mmproj projects to {proj} but the text model's embedding width is {width}",
                   "the mmproj belongs to another model family or size")
    return report
