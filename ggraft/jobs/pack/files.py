"""Placing files into a package: hard links or copies, checksums, and the staged folder that
becomes the package only when complete."""
from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ggraft.errors import InputError, OutputExistsError

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


@contextmanager
def staged_folder(target: Path, force: bool) -> Iterator[Path]:
    """A temporary folder beside ``target`` that becomes ``target`` (replacing it only with
    ``force``) if the block completes, and is removed otherwise."""
    stage = target.with_name(f".{target.name}.ggraft-tmp{os.getpid()}")
    old = target.with_name(f".{target.name}.ggraft-old{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        if target.exists() and not force:  # appeared while we worked
            raise OutputExistsError(f"{target}: exists; pass --force to replace it")
        if target.exists():
            os.replace(target, old)
            try:
                os.replace(stage, target)
            except OSError:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextmanager
def package_folder(out_dir: Path, parts: list[str], force: bool) -> Iterator[Path]:
    """The package folder ``out_dir/<parts>``: refused if it exists (any entry, a symlink too)
    unless ``force`` and it is a real folder; the folders above it are created if missing and
    removed again if packing fails.  An OSError while packing becomes one InputError line."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: not a folder")
    target = out_dir.joinpath(*parts)
    if target.exists() or target.is_symlink():
        if not force:
            raise OutputExistsError(f"{target}: exists; pass --force to replace it")
        if not target.is_dir() or target.is_symlink():
            raise InputError(f"{target}: exists and is not a folder; not replacing it")
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield target
    except BaseException as e:
        for folder in created:  # innermost first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        if isinstance(e, OSError):  # e.g. a full disk while rewriting or writing
            raise InputError(f"{target}: cannot write the package: {e.strerror or e}") from None
        raise
