"""Merging Hugging Face checkpoints: VLMs and plain LLMs of one family.

With ``models`` or ``slices`` only the language backbone is merged.  The output is the
*metadata source* (``metadata_source``, or its older name ``vision_source``; by default the
first VLM among the models, then the base) with its backbone replaced: its vision tower and
projector are copied byte for byte, its tensor names, config, tokenizer and preprocessor files
are kept, so ``ggraft convert`` takes the result as it took the metadata source.  When no model
is a VLM, the output is the base (or first) model with merged weights.

With ``modules`` (mergekit's modular form) each module listed is merged on its own, with its
own models, parameters and, as ggraft allows, method and base; the modules not listed are
copied from the metadata source (as mergekit's ``fill_missing_params`` does after a merge).
Which module a tensor belongs to is read from the family's converter (``hf_layout``); every
tensor of every input belongs to one, or the merge is refused.

Slices that stack layers renumber the backbone's layers and rewrite ``num_hidden_layers`` and
every per-layer list of the text config (``layer_types`` ...).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import yaml

from ggraft import __version__
from ggraft.hf.checkpoint import PICKLE_SUFFIXES, INDEX_NAME, read_json
from ggraft.errors import InputError
from ggraft.gguf_io import output_types
from ggraft.gguf_io.output import OUTTYPES, PROVENANCE_PREFIX, atomic_folder, check_output, progress_bar
from .config import MergeConfig
from .forms import MODULES, PROJECTOR, TEXT, VISION, ModuleSpec
from .hf_layout import CheckpointRows, HfInput
from .methods import Contribution
from .naming import HF_TEXT, VisionNaming
from .plan import Layers, Planner, Tensor, TensorPlan
from .rows import CHUNK_ELEMENTS
from .safetensors_out import DEFAULT_SHARD_BYTES, OutTensor, file_bytes, write_checkpoint
from .stream import Workers, encoder, merged_rows, tensor_merge

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
#: the output types an HF merge writes (those with a safetensors dtype), and those only a GGUF merge writes
HF_OUTTYPES = tuple(t.name for t in output_types.HF_TYPES)
GGUF_ONLY = tuple(n for n in output_types.NAMES if n not in HF_OUTTYPES)
CONFIG_COPY_NAME = "ggraft_merge.yaml"
NOT_COPIED = ("README.md", INDEX_NAME)


def names_of(config: MergeConfig, model: HfInput, module: str) -> dict[str, str]:
    """A model's tensors of ``module``: canonical name -> saved name (``slices`` merge the text
    decoder only)."""
    if config.form == "modules":
        return model.modules[module]  # (every tensor of the model in one module, or refused)
    if module == TEXT:
        return model.backbone
    return {} if config.form == "slices" else model.modules[module]


def merged_modules(config: MergeConfig, inputs: dict[str, HfInput], source: HfInput) -> dict[str, ModuleSpec]:
    """The modules a config merges.  ``models`` merge every module with the same models and
    parameters, as mergekit's ``normalize_config`` makes ``models`` the models of each module:
    the vision tower and projector too, when every model has them and ggraft knows their family
    (else they are copied from the metadata source, and a warning says so)."""
    if config.form != "models" or not source.is_vlm:
        return dict(config.modules)
    text = config.modules[TEXT]
    refs = list(dict.fromkeys(text.refs + [source.label]))
    lacking = [r for r in refs if not inputs[r].is_vlm]
    unknown = [r for r in refs if inputs[r].is_vlm and inputs[r].converter is None]
    if lacking or unknown:
        why = (f"{', '.join(lacking)} has no vision tower" if lacking
               else f"no converter of ggraft knows the vision side of {', '.join(unknown)}")
        config.warnings.append(f"the vision tower and projector are copied from {source.label}, not merged: {why}")
        return {TEXT: text}
    return {TEXT: text, **{m: replace(text, name=m) for m in (VISION, PROJECTOR) if source.modules[m]}}


def metadata_source(config: MergeConfig, inputs: dict[str, HfInput]) -> HfInput:
    """The model whose layout, side files and unmerged tensors the output keeps."""
    if config.metadata_source:
        return inputs[config.metadata_source]
    if config.vision_source:
        chosen = inputs[config.vision_source]
        if not chosen.is_vlm:
            raise InputError(f"vision_source {chosen.label}: has no vision tower (only language-model tensors)")
        return chosen
    first = config.inputs[0].ref
    order = [m.ref for m in config.models] + [first]
    return next((inputs[r] for r in order if inputs[r].is_vlm), inputs[first])


def plan_hf(config: MergeConfig, inputs: dict[str, HfInput], source: HfInput,
            embed_common: bool) -> tuple[dict[str, list[TensorPlan]], Layers | None]:
    """Each merged module's plans (under canonical names), and the output's layers if restacked."""
    merged, layers = {}, None
    modules = merged_modules(config, inputs, source)
    for name in (m for m in MODULES if m in modules):
        module = modules[name]
        tables = {ref: {c: tuple(inputs[ref].ckpt.shape(saved)) for c, saved in names_of(config, inputs[ref], name).items()}
                  for ref in dict.fromkeys(module.refs + [source.label])}
        empty = next((ref for ref in module.refs if not tables[ref]), None)
        if empty is not None:
            raise InputError(f"modules.{name}: {empty} has no {name} tensors (it is not a VLM of a family ggraft "
                             "converts)" if name != TEXT else f"{empty}: has no language-model tensors")
        planner = Planner(config, module, tables, source.label,
                          HF_TEXT if name == TEXT else VisionNaming(source.mmproj_names),
                          VOCAB_TENSORS if name == TEXT else (), embed_common)
        if module.whole_models:
            merged[name] = planner.whole()
        else:
            merged[name], layers = planner.sliced()
    if config.form == "modules":
        filled = [m for m in MODULES if m not in config.modules and names_of(config, source, m)]
        if filled and not (config.metadata_source or config.vision_source):
            config.warnings.append(f"modules {', '.join(filled)} are not listed: copied from {source.label} "
                                   "(name it with metadata_source)")
    return merged, layers


def default_outtype(source: HfInput) -> str:
    """The vision source's backbone dtype (f32 when it is not one an HF merge writes)."""
    dtype = source.ckpt.entries[next(iter(source.backbone.values()))].dtype
    stored = output_types.by_safetensors(dtype)
    return stored.name if stored else "f32"


def check_folder_output(out: Path, force: bool) -> None:
    """The output rule of every command (``check_output``), and: a folder with files that is not a
    checkpoint is never replaced, even with --force."""
    check_output(out, force, folder=True)
    if out.is_dir() and not out.is_symlink() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise InputError(f"{out}: exists and is not a checkpoint folder; refusing to replace it")


def copy_side_files(source: Path, dest: Path, outtype: str, restacked: dict | None = None) -> None:
    """config, tokenizer, preprocessor and generation files of the metadata source; config.json's
    dtype is set to what the backbone is written as (and its layers to a restack's)."""
    for f in sorted(source.iterdir()):
        if (not f.is_file() or f.name.startswith(".") or f.suffix == ".safetensors" or f.suffix in PICKLE_SUFFIXES
                or f.name in NOT_COPIED):
            continue
        shutil.copy2(f, dest / f.name)
    config = read_json(dest / "config.json", "config.json")
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = output_types.by_name(outtype).dtype
    for section, values in (restacked or {}).items():
        (config if section is None else config[section]).update(values)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def restacked_config(source: HfInput, inputs: dict[str, HfInput], layers: Layers) -> dict:
    """The text config's changes for restacked layers: ``num_hidden_layers`` and every list with
    one value per layer, rebuilt from the models the layers come from."""
    def section(model: HfInput, key: str | None) -> dict:
        config = read_json(model.ckpt.path / "config.json", "config.json")
        return config if key is None else config.get(key) or {}

    out = {}
    for key in (None, "text_config"):
        text = section(source, key)
        count = text.get("num_hidden_layers") if isinstance(text, dict) else None
        if not isinstance(count, int):
            continue
        changes: dict = {"num_hidden_layers": len(layers.origin)}
        for name, value in text.items():
            if isinstance(value, list) and len(value) == count:
                changes[name] = [_per_layer(section(inputs[m], key), name, i, m) for m, i in layers.origin]
        out[key] = changes
    return out


def _per_layer(config: dict, name: str, layer: int, model: str):
    values = config.get(name)
    if not isinstance(values, list) or layer >= len(values):
        raise InputError(f"{model}: config.json has no per-layer {name!r} for its layer {layer}")
    return values[layer]


def merge_hf(config: MergeConfig, out: Path, outtype: str | None = None, force: bool = False,
             embed_common: bool = False, chunk_elements: int = CHUNK_ELEMENTS, threads: int | None = None,
             max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> tuple[int, str]:
    """Write the merged checkpoint folder ``out``; returns (merged tensor count, output type)."""
    check_folder_output(out, force)
    inputs = {spec.ref: HfInput.open(spec) for spec in config.inputs}
    source = metadata_source(config, inputs)
    merged, layers = plan_hf(config, inputs, source, embed_common)
    _check_floats(config, inputs, merged)
    outtype = outtype or config.outtype or default_outtype(source)
    if outtype not in HF_OUTTYPES:
        raise InputError(f"an HF merge writes {output_types.listed(HF_OUTTYPES)}, not {outtype}",
                         hint=f"merge the GGUF files instead to get {output_types.listed(GGUF_ONLY)}, or quantize "
                              "the converted GGUF")
    metadata = {"format": "pt", PROVENANCE_PREFIX + "version": __version__,
                PROVENANCE_PREFIX + "merge_method": config.method.name,
                PROVENANCE_PREFIX + "merge_config": json.dumps(config.describe(), sort_keys=True)}
    with atomic_folder(out, force) as tmp, Workers(threads) as workers:
        def produce(module: str, plan: TensorPlan):
            return _producer(config, inputs, module, plan, outtype, chunk_elements, workers)

        tensors = out_tensors(config, source, merged, layers, produce, outtype)
        total = sum(t.nbytes for t in tensors)
        copy_side_files(source.ckpt.path, tmp, outtype, restacked_config(source, inputs, layers) if layers else None)
        (tmp / CONFIG_COPY_NAME).write_text(yaml.safe_dump(config.describe(), sort_keys=False))
        with progress_bar(total, f"merge {out.name}") as bar:
            task = bar.add_task("merge", total=total)
            write_checkpoint(tmp, tensors, metadata, max_shard_bytes, lambda n: bar.advance(task, n))
    return sum(len(plans) for plans in merged.values()), outtype


def out_tensors(config: MergeConfig, source: HfInput, merged: dict[str, list[TensorPlan]], layers: Layers | None,
                produce, outtype: str) -> list[OutTensor]:
    """The output's tensors in the metadata source's order: merged ones computed, the rest copied
    byte for byte; restacked layers (all of them) where the source's backbone was."""
    dtype = output_types.by_name(outtype).safetensors
    by_saved = {}
    for module, plans in merged.items():
        if module == TEXT and layers is not None:
            continue
        names = names_of(config, source, module)
        by_saved.update({names[p.name]: (module, p) for p in plans})
    restacked = set(source.backbone.values()) if layers is not None else set()
    placed = False
    tensors: list[OutTensor] = []
    for name in source.ckpt.names():
        if name in by_saved:
            module, plan = by_saved[name]
            tensors.append(OutTensor(name, dtype, plan.shape, produce(module, plan)))
        elif name in restacked:
            if not placed:
                tensors += [OutTensor(source.saved_name(p.name), dtype, p.shape, produce(TEXT, p)) for p in merged[TEXT]]
                placed = True
        else:  # a module not merged (the vision side, with models or slices): unchanged
            entry = source.ckpt.entries[name]
            tensors.append(OutTensor(name, entry.dtype, entry.shape, file_bytes(entry.path, entry.start, entry.nbytes)))
    return tensors


def _check_floats(config: MergeConfig, inputs: dict[str, HfInput], merged: dict[str, list[TensorPlan]]) -> None:
    for module, plans in merged.items():
        for plan in plans:
            for t in {plan.reference, plan.base, *(p.tensor for p in plan.models)} - {None}:
                model = inputs[t.model]
                saved = names_of(config, model, module)[t.name]
                if model.ckpt.entries[saved].dtype not in FLOAT_DTYPES:
                    raise InputError(f"{model.label}: tensor {saved!r} is {model.ckpt.entries[saved].dtype}; only "
                                     "floating-point tensors can be merged")


def _producer(config: MergeConfig, inputs: dict[str, HfInput], module: str, plan: TensorPlan, outtype: str,
              chunk_elements: int, workers: Workers):
    """A producer of the merged tensor's bytes, encoded a chunk of rows at a time."""

    def rows(t: Tensor) -> CheckpointRows:
        model = inputs[t.model]
        return CheckpointRows(model.ckpt, names_of(config, model, module)[t.name], model.scratch)

    def produce():
        models = [Contribution(rows(p.tensor), p.weight, p.density) for p in plan.models]
        merge = tensor_merge(plan.method, plan, rows(plan.reference), rows(plan.base) if plan.base else None, models,
                             plan.settings, chunk_elements)
        return merged_rows(merge, encoder(OUTTYPES[outtype]), workers)

    return produce
