"""Writing GGUF files, whatever they hold: the output types (as GGML and file types; the
vocabulary itself is ``output_types``), tensor encoding, streaming, the one rule for output
paths (exists / --force / symlinks) and atomic replacement."""
from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import gguf
import numpy as np
from gguf.lazy import LazyNumpyTensor

from ggraft import compat
from ggraft.errors import InputError, OutputExistsError
from ggraft.gguf_io import numeric
from ggraft.gguf_io.output_types import NAMES, OUTPUT_TYPES

Q = gguf.GGMLQuantizationType
#: output type name -> GGML tensor type, and GGML type -> general.file_type (``output_types``)
OUTTYPES: dict[str, Q] = {t.name: t.ggml_type for t in OUTPUT_TYPES}
FILE_TYPES: dict[Q, gguf.LlamaFileType] = {t.ggml_type: t.llama_file_type for t in OUTPUT_TYPES}
PROVENANCE_PREFIX = "ggraft."
NAME_MAX = 255  # bytes in one file name, on every common file system


def convert_tensor(tensor: LazyNumpyTensor, qtype: Q) -> LazyNumpyTensor:
    """Lazily cast/quantize to ``qtype`` (``numeric``: ggml or gguf-py, the same bytes)."""
    if tensor.dtype != np.float32:  # (a lazy astype always copies, even to its own dtype)
        tensor = tensor.astype(np.float32)
    if qtype == Q.F16:  # ggml's vectorised rounding, same results as numpy's, ~25x faster
        return compat.lazy_map(numeric.to_float16, meta_noop=np.float16)(tensor)
    if qtype in numeric.GGML_QUANTIZED:  # ggml's quantizer, same bytes as gguf-py's
        layout = (np.uint8, lambda shape: numeric.encoded_layout(shape, qtype)[0])
        return compat.lazy_map(lambda values: numeric.quantize(values, qtype), meta_noop=layout)(tensor)
    return gguf.quants.quantize(tensor, qtype)


def parse_outtype(name: str) -> Q:
    try:
        return OUTTYPES[name.lower()]
    except KeyError:
        raise InputError(f"unknown output type {name!r}; choose one of {', '.join(NAMES)}") from None


def check_output(out: Path, force: bool, folder: bool = False, make_parent: bool = False) -> None:
    """The one rule for every output path, a file or (``folder``) a folder of files:

    - the name is taken when anything is there, a symlink included, even a dangling one: refused
      without ``--force``;
    - with ``--force`` the output replaces what is there under that name: a symlink is replaced
      itself, its target is never written through; a file is never replaced by a folder nor a
      folder by a file;
    - the parent folder must exist, or (``make_parent``) be creatable: ``atomic_path`` and
      ``atomic_folder`` then make it, and remove it again if they fail.
    """
    out = Path(out)
    if len(out.name.encode()) > NAME_MAX:
        raise InputError(f"{out}: the file name is longer than {NAME_MAX} bytes")
    taken, link = os.path.lexists(out), out.is_symlink()
    if taken and not link and out.is_dir() != folder:
        raise InputError(f"{out}: is a folder; the output is a file" if not folder else
                         f"{out}: exists and is not a folder; the output is a folder")
    if taken and not force:
        raise OutputExistsError(f"{out}: exists; pass --force to replace it",
                                "it is a symlink: --force replaces the link, never its target" if link else None)
    parent = out.parent
    if not parent.is_dir():
        existing = next(p for p in parent.parents if p.exists())
        if parent.exists() or not existing.is_dir():
            bad = parent if parent.exists() else existing
            raise InputError(f"{bad}: is not a folder, so {out.name} cannot be written under it")
        if not make_parent:
            raise InputError(f"{parent}: output folder does not exist")
        parent = existing  # the missing folders are made by atomic_path / atomic_folder
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{parent}: output folder is not writable")


@contextmanager
def _parents_made(out: Path) -> Iterator[None]:
    """The missing folders above ``out`` made, and removed again (if still empty) when the block fails."""
    missing = [p for p in reversed(out.parents) if not p.exists()]
    try:
        for folder in missing:
            folder.mkdir()
    except OSError as e:
        raise InputError(f"{out.parent}: cannot create the output folder: {e.strerror or e}") from None
    try:
        yield
    except BaseException:
        for folder in reversed(missing):
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _temporary(out: Path, kind: str) -> Path:
    """A name beside ``out`` for work in progress (short enough whatever ``out``'s name is)."""
    stem = out.name if len(out.name.encode()) <= 160 else out.name[:40]
    return out.with_name(f".{stem}.ggraft-{kind}{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_path(out: Path) -> Iterator[Path]:
    """A temporary path beside ``out`` that replaces it (a symlink itself, never its target)
    only if the block completes; removed otherwise, whatever ends the block.  Missing folders
    above ``out`` (allowed by ``check_output(make_parent=True)``) are made, and removed on failure."""
    out = Path(out)
    tmp = _temporary(out, "tmp")
    with _parents_made(out):
        try:
            yield tmp
            os.replace(tmp, out)
        finally:
            if os.path.lexists(tmp):
                tmp.unlink()


@contextmanager
def atomic_folder(out: Path, force: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``out`` that becomes ``out`` only if the block completes, and is
    removed otherwise.  What was at ``out`` (allowed by ``check_output``) is replaced only at the
    end, and put back if the replacement fails; if something appeared at ``out`` meanwhile, it is
    kept unless ``force``."""
    out = Path(out)
    tmp, old = _temporary(out, "tmp"), _temporary(out, "old")
    with _parents_made(out), _staged(tmp):
        yield tmp
        if not os.path.lexists(out):
            os.replace(tmp, out)
            return
        if not force:  # appeared while we worked
            raise OutputExistsError(f"{out}: exists; pass --force to replace it")
        _remove(old)
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)
            raise
        _remove(old)


@contextmanager
def _staged(folder: Path) -> Iterator[None]:
    _remove(folder)
    folder.mkdir()
    try:
        yield
    finally:
        _remove(folder)


def progress_bar(total: int, label: str):
    """A rich progress bar on a terminal (stderr), nothing otherwise."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    text = TextColumn(label.replace("{", "{{").replace("}", "}}"), markup=False)  # a file name is not markup
    return Progress(text, BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal, transient=True)


def computed_in_background(tensors: Iterable[LazyNumpyTensor]) -> Iterator[np.ndarray]:
    """Each lazy tensor computed, the next one on a worker thread while the caller writes the
    current one (numpy and file writes release the GIL), so reading/converting overlaps writing.
    At most two tensors are held at once."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for tensor in tensors:
            job = pool.submit(LazyNumpyTensor.to_eager, tensor)
            del tensor
            if pending is not None:
                yield pending.result()
            pending = job
        if pending is not None:
            yield pending.result()


def write_gguf(out: Path, w: gguf.GGUFWriter, tensors: Iterable[tuple[str, LazyNumpyTensor, Q]],
               label: str = "writing") -> Path:
    """Register every tensor's info, then stream header, keys and data to ``out`` atomically.

    ``tensors`` yields (name, lazy source, target type); each tensor is computed only when its
    turn to be written comes, and released after.
    """
    plan: list[tuple[str, LazyNumpyTensor]] = []  # lazy: nothing is read yet
    for name, tensor, qtype in tensors:
        converted = convert_tensor(tensor, qtype)
        w.add_tensor_info(name, converted.shape, converted.dtype, converted.nbytes, raw_dtype=qtype)
        plan.append((name, converted))
    total = sum(int(t.nbytes) for _, t in plan)
    with atomic_path(out) as tmp, progress_bar(total, label) as bar:
        task = bar.add_task(label, total=total)
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        plan.reverse()  # popped as written, so each computed tensor is released after its turn
        for data in computed_in_background(plan.pop()[1] for _ in range(len(plan))):
            w.write_tensor_data(data)
            bar.advance(task, data.nbytes)
            del data
        w.close()
    return out
