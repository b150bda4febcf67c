"""What a check takes and gives: the pair's two headers as read (``CheckedPair``) and the typed
findings (``Finding``, collected in a ``CheckReport``) the CLI renders."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ggraft.gguf_io.gguf_file import GGUFIndex

    from .vocab import Vocab

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


@dataclass
class CheckedPair:
    """What every check reads (the text side is None when only the mmproj is checked) and the
    report it adds its findings to."""

    text: GGUFIndex
    shards: list[GGUFIndex]
    mmproj: GGUFIndex
    vocab: Vocab
    projector: str | None
    report: CheckReport
