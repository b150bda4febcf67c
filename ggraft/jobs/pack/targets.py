"""Packaging targets, one class each: where a package goes, what its name may be, and the files
written beside the two GGUFs.  ``TARGETS`` is the registry ``pack`` and the CLI look targets up in."""
from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, ClassVar, Iterator

import gguf

from ggraft import __version__
from ggraft.errors import EngineError, InputError
from ggraft.gguf_io import gguf_file
from ggraft.pair.check import CheckReport

from .card import model_card
from .chat_formats import end_of_turn_tokens, match_chat_format, modelfile, token_text
from .names import validate_name, validate_ollama_name
from .projector import provenance

#: what a target writes: (role, file name, text content)
Written = Iterator[tuple[str, str, str]]


class Target:
    """Base of a packaging target: the package folder is ``DIR/<folder_parts>``."""

    name: ClassVar[str]
    app: ClassVar[str]  # what the user runs the package in
    takes_publisher: ClassVar[bool] = False

    def validate_name(self, value: str) -> str:
        return validate_name(value, "NAME")

    def folder_parts(self, name: str, publisher: str | None) -> list[str]:
        return [name]

    def files(self, result: Any, info: dict, text: gguf_file.GGUFIndex, mmproj: gguf_file.Reader,
              report: CheckReport) -> Written:
        """The target's own files; may set ``result.commands`` (and other result fields)."""
        raise NotImplementedError


TARGETS: dict[str, type[Target]] = {}


def target(cls: type[Target]) -> type[Target]:
    """Class decorator: make a packaging target available by its name."""
    TARGETS[cls.name] = cls
    return cls


def target_named(name: str) -> Target:
    if name not in TARGETS:
        raise InputError(f"unknown layout {name!r}; choose {' or '.join(TARGETS)}")
    return TARGETS[name]()


@target
class LMStudio(Target):
    """``DIR/<publisher>/<name>/``: the GGUFs (LM Studio pairs a model with the mmproj in its
    folder), a model card ``README.md`` and ``SHA256SUMS``."""

    name, app, takes_publisher = "lmstudio", "LM Studio", True
    default_publisher = "ggraft"

    def folder_parts(self, name, publisher):
        return [publisher or self.default_publisher, name]

    def files(self, result, info, text, mmproj, report):
        repo = f"{result.publisher}/{result.name}"
        result.commands = [f"lms import --user-repo {shlex.quote(repo)} --hard-link -y {shlex.quote(f.path)}"
                           for f in result.files]
        card = model_card(info, report, result.files, result.mmproj_fixes, provenance(mmproj), result.commands)
        yield "readme", "README.md", card
        yield "checksums", "SHA256SUMS", "".join(f"{f.sha256}  {Path(f.path).name}\n" for f in result.files)


@target
class Ollama(Target):
    """``DIR/<name>/``: the GGUFs and a ``Modelfile`` with two ``FROM`` lines (text model first,
    then the projector), ``PARAMETER stop`` lines from the GGUF's end-of-turn tokens and a
    ``TEMPLATE`` only where the GGUF's chat template maps faithfully to a known format."""

    name, app = "ollama", "Ollama"

    def validate_name(self, value):
        return validate_ollama_name(value)

    def files(self, result, info, text, mmproj, report):
        v = gguf_file.value
        bos = token_text(text, v(text, gguf.Keys.Tokenizer.BOS_ID)) or ""
        eot = end_of_turn_tokens(text)
        eos = token_text(text, v(text, gguf.Keys.Tokenizer.EOS_ID)) or ""
        fmt = match_chat_format(v(text, gguf.Keys.Tokenizer.CHAT_TEMPLATE), bos, eos,
                                bool(v(text, gguf.Keys.Tokenizer.ADD_BOS, True)))
        result.template = fmt.name if fmt else None
        result.stop = eot + [s for s in (fmt.stops if fmt else ()) if s not in eot]
        header = [f"{result.name}: written by ggraft {__version__} (`ggraft pack --ollama`)",
                  f"text model: {info['recipient']}; vision: {info['donor']}, projector "
                  f"{info['mmproj']['projector_type']}",
                  "Ollama runs a text model + mmproj pair in its llama.cpp-based runner."]
        files = result.files
        result.commands = [f"ollama create {result.name} -f {shlex.quote(str(Path(result.folder) / 'Modelfile'))}"]
        yield "modelfile", "Modelfile", modelfile(Path(files[0].path).name, Path(files[1].path).name, fmt, eos,
                                                  result.stop, header)


def ollama_create(result: Any) -> bool:
    """Run ``ollama create NAME -f Modelfile`` when the ``ollama`` binary is on PATH.

    Returns False when it is not (the caller prints the command); its output goes to stderr.
    """
    exe = shutil.which("ollama")
    if exe is None:
        return False
    folder = Path(result.folder)
    proc = subprocess.run([exe, "create", result.name, "-f", str(folder / "Modelfile")], cwd=folder,
                          stdout=2, stderr=2)  # our stdout stays for data (--json)
    if proc.returncode != 0:
        raise EngineError(f"ollama create {result.name} exited with status {proc.returncode} (its output is above)",
                          f"the package in {folder} is complete; fix the problem and run: {result.commands[0]}")
    return True
