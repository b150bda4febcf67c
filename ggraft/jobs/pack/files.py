"""Placing files into a package: hard links or copies, and checksums.  The package folder itself
follows the one output rule (``ggraft.gguf_io.output.check_output`` / ``atomic_folder``)."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from ggraft.errors import InputError

LINK_MODES = ("auto", "link", "copy")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def place(src: Path, dst: Path, mode: str) -> str:
    """Hard-link ``src`` to ``dst`` (mode auto/link) or copy it (copy, or auto when linking fails)."""
    if mode != "copy":
        try:
            os.link(src, dst)
            return "link"
        except OSError as e:
            if mode == "link":
                raise InputError(f"cannot hard-link {src} into {dst.parent}: {e.strerror or e}",
                                 "hard links need the same file system; use --copy") from None
    try:
        shutil.copyfile(src, dst)
    except OSError as e:
        raise InputError(f"cannot copy {src} to {dst.parent}: {e.strerror or e}") from None
    return "copy"
