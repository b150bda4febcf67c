"""Merging Hugging Face checkpoints: VLMs and plain LLMs of one family, language backbone only.

A VLM's language model and the plain LLM it was made from carry the same tensors under
different prefixes, so names are first brought to the plain causal-LM form::

    language_model.model.X   (VLMs saved by transformers 4.x)   -> model.X
    language_model.lm_head.X                                    -> lm_head.X
    model.language_model.X   (VLMs saved by transformers 5)     -> model.X
    model.X, lm_head.X       (plain LLMs, and VLMs whose vision side sits beside, e.g. visual.*)

Only the backbone is merged.  The output is the *vision source* (``vision_source``, by default
the first VLM among the models, then the base) with its backbone replaced: its vision tower and
projector are copied byte for byte, its tensor names, config, tokenizer and preprocessor files
are kept, so ``ggraft convert`` takes the result as it took the vision source.  When no model is
a VLM, the output is the base (or first) model with merged weights.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import yaml

from .. import __version__
from ..checkpoint import PICKLE_SUFFIXES, INDEX_NAME, Checkpoint, read_json
from ..errors import InputError, OutputExistsError
from ..mmproj import OUTTYPES, PROVENANCE_PREFIX, progress_bar
from .. import numeric
from .buffers import Scratch
from .config import MergeConfig, ModelSpec
from .methods import CHUNK_ELEMENTS, Contribution
from .plan import TensorPlan, Workers, encoder, merged_rows, plan_tensors, tensor_merge
from .safetensors_out import DEFAULT_SHARD_BYTES, OutTensor, file_bytes, write_checkpoint

#: (saved prefix, canonical prefix) for a backbone nested in a VLM, and for a plain layout
NESTED = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
          ("model.language_model.", "model."), ("lm_head.", "lm_head."))
PLAIN = (("model.", "model."), ("lm_head.", "lm_head."))
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
#: output type -> (safetensors dtype, config.json dtype name)
HF_TYPES = {"f32": ("F32", "float32"), "f16": ("F16", "float16"), "bf16": ("BF16", "bfloat16")}
CONFIG_COPY_NAME = "ggraft_merge.yaml"
NOT_COPIED = ("README.md", INDEX_NAME)


@dataclass
class HfInput:
    """A checkpoint split into its language backbone (canonical name -> saved name) and the rest."""

    spec: ModelSpec
    ckpt: Checkpoint
    backbone: dict[str, str] = field(default_factory=dict)
    vision: list[str] = field(default_factory=list)
    scratch: Scratch = field(default_factory=Scratch)

    @property
    def label(self) -> str:
        return self.spec.ref

    @property
    def is_vlm(self) -> bool:
        return bool(self.vision)

    @classmethod
    def open(cls, spec: ModelSpec) -> "HfInput":
        if not Path(spec.path).is_dir():
            raise InputError(f"{spec.ref}: is not a Hugging Face folder (all inputs of a merge must be of one kind)")
        model = cls(spec, Checkpoint(spec.path))
        names = list(model.ckpt.names())
        nested = any(n.startswith(("language_model.", "model.language_model.")) for n in names)
        for name in names:
            for saved, canonical in NESTED if nested else PLAIN:
                if name.startswith(saved):
                    key = canonical + name[len(saved):]
                    if key in model.backbone:
                        raise InputError(f"{spec.ref}: both {model.backbone[key]!r} and {name!r} are the "
                                         f"language model's {key!r}")
                    model.backbone[key] = name
                    break
            else:
                model.vision.append(name)
        if not model.backbone:
            raise InputError(f"{spec.ref}: no language-model tensors (model.*, lm_head.*, language_model.*)")
        return model


class CheckpointRows:
    """A checkpoint tensor as rows (first dimension), read a few rows at a time (float16: into
    its model's scratch)."""

    def __init__(self, ckpt: Checkpoint, name: str, scratch: Scratch):
        self.ckpt, self.name, self.scratch = ckpt, name, scratch
        shape = ckpt.shape(name)
        self.n_rows = shape[0] if len(shape) > 1 else 1
        self.row_len = int(np.prod(shape[1:] if len(shape) > 1 else shape, dtype=np.int64))

    def read(self, first: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        if len(self.ckpt.shape(self.name)) < 2:
            rows = np.asarray(self.ckpt.load(self.name)).reshape(1, -1)
        else:
            rows = self.ckpt.load_rows(self.name, first, stop - first).reshape(stop - first, self.row_len)
        if rows.dtype == np.float16:
            out = self.scratch.array(rows.shape, np.float32) if out is None else out
            return numeric.to_float32(rows, out=out)
        if out is None:
            return rows
        out[...] = rows
        return out

    def release(self, first: int, stop: int) -> None:
        pass


def vision_source(config: MergeConfig, inputs: list[HfInput]) -> HfInput:
    """The model whose vision side, names and side files the output keeps."""
    if config.vision_source:
        chosen = next(m for m in inputs if m.spec.ref == config.vision_source)
        if not chosen.is_vlm:
            raise InputError(f"vision_source {chosen.label}: has no vision tower (only language-model tensors)")
        return chosen
    by_ref = {m.spec.ref: m for m in inputs}
    order = [by_ref[m.ref] for m in config.models] + [inputs[0]]
    return next((m for m in order if m.is_vlm), inputs[0])


def default_outtype(source: HfInput) -> str:
    """The vision source's backbone dtype (f32 when it is not f16/bf16)."""
    dtype = source.ckpt.entries[next(iter(source.backbone.values()))].dtype
    return {"F16": "f16", "BF16": "bf16"}.get(dtype, "f32")


def check_folder_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: exists; pass --force to overwrite")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; an HF merge writes a checkpoint folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise InputError(f"{out}: exists and is not a checkpoint folder; refusing to replace it")
    if not out.parent.exists():
        raise InputError(f"{out.parent}: output folder does not exist")


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` that replaces it only if the block completes."""
    tmp = out.with_name(f".{out.name}.ggraft-tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.ggraft-old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_side_files(source: Path, dest: Path, outtype: str) -> None:
    """config, tokenizer, preprocessor and generation files of the vision source; config.json's
    dtype is set to what the backbone is written as."""
    for f in sorted(source.iterdir()):
        if (not f.is_file() or f.name.startswith(".") or f.suffix == ".safetensors" or f.suffix in PICKLE_SUFFIXES
                or f.name in NOT_COPIED):
            continue
        shutil.copy2(f, dest / f.name)
    config = read_json(dest / "config.json", "config.json")
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = HF_TYPES[outtype][1]
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def merge_hf(config: MergeConfig, out: Path, outtype: str | None = None, force: bool = False,
             embed_common: bool = False, chunk_elements: int = CHUNK_ELEMENTS, threads: int | None = None,
             max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> tuple[int, str]:
    """Write the merged checkpoint folder ``out``; returns (merged tensor count, output type)."""
    check_folder_output(out, force)
    inputs = [HfInput.open(spec) for spec in config.inputs]
    source = vision_source(config, inputs)
    shapes = {m.label: {k: tuple(m.ckpt.shape(v)) for k, v in m.backbone.items()} for m in inputs}
    plans = {p.name: p for p in plan_tensors(source.label, shapes, VOCAB_TENSORS, embed_common)}
    for m in inputs:
        odd = next((v for v in m.backbone.values() if m.ckpt.entries[v].dtype not in FLOAT_DTYPES), None)
        if odd:
            raise InputError(f"{m.label}: tensor {odd!r} is {m.ckpt.entries[odd].dtype}; only floating-point "
                             "tensors can be merged")
    outtype = outtype or config.outtype or default_outtype(source)
    if outtype not in HF_TYPES:
        raise InputError(f"an HF merge writes f32, f16 or bf16, not {outtype}",
                         hint="merge the GGUF files instead to get q8_0, or quantize the converted GGUF")

    saved_to_canonical = {v: k for k, v in source.backbone.items()}
    metadata = {"format": "pt", PROVENANCE_PREFIX + "version": __version__,
                PROVENANCE_PREFIX + "merge_method": config.method.name,
                PROVENANCE_PREFIX + "merge_config": json.dumps(config.describe(), sort_keys=True)}
    with atomic_folder(out) as tmp, Workers(threads) as workers:
        tensors = []
        for name in source.ckpt.names():
            entry = source.ckpt.entries[name]
            if name in saved_to_canonical:
                plan = plans[saved_to_canonical[name]]
                tensors.append(OutTensor(name, HF_TYPES[outtype][0], plan.shape,
                                         _merged(config, inputs, source, plan, outtype, chunk_elements, workers)))
            else:  # vision tower and projector: unchanged
                tensors.append(OutTensor(name, entry.dtype, entry.shape,
                                         file_bytes(entry.path, entry.start, entry.nbytes)))
        total = sum(t.nbytes for t in tensors)
        copy_side_files(source.ckpt.path, tmp, outtype)
        (tmp / CONFIG_COPY_NAME).write_text(yaml.safe_dump(config.describe(), sort_keys=False))
        with progress_bar(total, f"merge {out.name}") as bar:
            task = bar.add_task("merge", total=total)
            write_checkpoint(tmp, tensors, metadata, max_shard_bytes, lambda n: bar.advance(task, n))
    return len(plans), outtype


def _merged(config: MergeConfig, inputs: list[HfInput], source: HfInput, plan: TensorPlan, outtype: str,
            chunk_elements: int, workers: Workers):
    """A producer of the merged tensor's bytes, encoded a chunk of rows at a time."""

    def rows(model: HfInput) -> CheckpointRows:
        return CheckpointRows(model.ckpt, model.backbone[plan.name], model.scratch)

    def produce():
        by_ref = {m.spec.ref: m for m in inputs}
        base = rows(by_ref[config.base.ref]) if config.method.needs_base else None
        models = [Contribution(rows(by_ref[m.ref]), m.weight, m.density) for m in config.models]
        merge = tensor_merge(config.method, plan, rows(source), base, models, config.settings, chunk_elements)
        return merged_rows(merge, encoder(OUTTYPES[outtype]), workers)

    return produce
