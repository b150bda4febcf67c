"""A Hugging Face checkpoint folder with one thing damaged: a JSON value, a JSON file's text, a
safetensors header or an index.  The copy links every file it does not change."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Callable

WEIGHTS = "model.safetensors"
_DELETE = object()


def linked_copy(src: Path, dst: Path, changed: tuple[str, ...] = ()) -> Path:
    """``dst`` with a symlink to each file of ``src`` (those in ``changed`` copied instead)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name in changed:
            (dst / f.name).write_bytes(f.read_bytes())
        else:
            os.symlink(f, dst / f.name)
    return dst


def set_json(src: Path, dst: Path, file: str, path: tuple[str, ...], value: Any = _DELETE) -> Path:
    """``file``'s key at ``path`` (nested keys) set to ``value`` (or removed)."""
    linked_copy(src, dst, (file,))
    data = json.loads((dst / file).read_text())
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    (dst / file).write_text(json.dumps(data))
    return dst


def raw_file(src: Path, dst: Path, file: str, content: bytes) -> Path:
    """``file`` replaced by ``content`` as is."""
    linked_copy(src, dst, (file,))
    (dst / file).write_bytes(content)
    return dst


def fifo_file(src: Path, dst: Path, file: str) -> Path:
    """``file`` replaced by a FIFO (opening it for reading would block forever)."""
    linked_copy(src, dst)
    (dst / file).unlink()
    os.mkfifo(dst / file)
    return dst


def header(src: Path) -> tuple[dict, bytes]:
    data = (src / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def safetensors_header(src: Path, dst: Path, change: Callable[[dict], Any]) -> Path:
    """The weights' header replaced by ``change(header)`` (an object, or bytes written as is)."""
    linked_copy(src, dst)
    head, body = header(src)
    new = change(head)
    raw = new if isinstance(new, bytes) else json.dumps(new).encode()
    (dst / WEIGHTS).unlink()
    (dst / WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return dst


def first_tensor(head: dict) -> str:
    return next(k for k in head if k != "__metadata__")


def entry_field(field: str, value: Any) -> Callable[[dict], dict]:
    """A header change: the first tensor's ``field`` (dtype, shape, data_offsets) set to ``value``."""
    def change(head: dict) -> dict:
        head[first_tensor(head)][field] = value
        return head
    return change
