"""Merging models as mergekit does, on Hugging Face safetensors and directly on GGUF.

``merge(config, out)`` reads a mergekit config (``config.py``, ``forms.py``: models, slices or
modules; parameters as ``parameters.py`` evaluates them), checks that every input is of one
kind - GGUF text models (``gguf_merge.py``) or Hugging Face folders (``hf_merge.py``,
``hf_layout.py``) - plans every output tensor (``plan.py``, ``naming.py``) and streams the
merged model to ``out`` tensor by tensor (``stream.py``) with the methods of ``methods.py``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ggraft.errors import InputError
from .config import MergeConfig, load_config, parse_config
from .methods import METHODS
from .rows import CHUNK_ELEMENTS

__all__ = ["MergeResult", "merge", "load_config", "parse_config", "METHODS"]


@dataclass
class MergeResult:
    output: str
    kind: str  # "gguf" or "hf"
    method: str
    models: list[str]
    tensors: int
    outtype: str
    bytes: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    check: Any = None  # a ggraft.check.CheckReport after --check-with

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["check"] = self.check.to_dict() if self.check is not None else None
        return data


def input_kind(config: MergeConfig) -> str:
    """'gguf' when every input is a file, 'hf' when every input is a folder."""
    kinds = {spec.ref: ("hf" if Path(spec.path).is_dir() else "gguf") for spec in config.inputs}
    if len(set(kinds.values())) > 1:
        folder = next(r for r, k in kinds.items() if k == "hf")
        file = next(r for r, k in kinds.items() if k == "gguf")
        raise InputError(f"inputs must all be GGUF files or all Hugging Face folders; {file} is a file and "
                         f"{folder} a folder")
    return next(iter(kinds.values()))


def merge(config: str | Path | MergeConfig, out: str | Path, outtype: str | None = None, force: bool = False,
          embed_common: bool = False, check_with: str | Path | None = None,
          threads: int | None = None, chunk_elements: int = CHUNK_ELEMENTS, **options: Any) -> MergeResult:
    """Merge the models of ``config`` (a path or a resolved MergeConfig) into ``out``.

    ``outtype`` overrides the config's dtype; ``check_with`` (GGUF merges) runs
    ``ggraft.check.check_pair`` on the result and an mmproj; ``threads`` compute chunks (default:
    all cores).  ``options`` go to the HF writer (``max_shard_bytes``)."""
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    out = Path(out)
    kind = input_kind(cfg)
    if check_with is not None:
        if kind != "gguf":
            raise InputError("--check-with checks a text GGUF with an mmproj; this merge writes an HF folder",
                             hint="convert the merged folder, then run 'ggraft check'")
        from ggraft.pair.check import check_pair
        from .gguf_merge import metadata_reference

        # the output's keys are the metadata source's: an unreadable or wrong mmproj fails here, before writing
        check_pair(cfg.path(metadata_reference(cfg)), check_with)
    started = time.perf_counter()
    if kind == "gguf":
        from .gguf_merge import merge_gguf

        tensors, written_as = merge_gguf(cfg, out, outtype, force, embed_common, chunk_elements, threads)
        size = out.stat().st_size
    else:
        from .hf_merge import merge_hf

        tensors, written_as = merge_hf(cfg, out, outtype, force, embed_common, chunk_elements, threads, **options)
        size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    result = MergeResult(str(out), kind, cfg.method.name, [s.ref for s in cfg.inputs], tensors, written_as,
                         size, time.perf_counter() - started, list(cfg.warnings))
    if check_with is not None:
        from ggraft.pair.check import check_pair

        result.check = check_pair(out, check_with)
    return result
