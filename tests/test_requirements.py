"""What llama.cpp requires of an mmproj (``ggraft.mmproj.requirements``), proven on every family
ggraft converts: each converted fixture passes; a copy with a key or tensor that llama.cpp's
graph needs removed or damaged is refused by ``check`` (llama.cpp would refuse it, abort or
segfault), ``ggraft run`` exits 1 without reaching llama.cpp, and ``convert`` refuses a checkpoint
that would produce such a file.

The families come from the converter registry; a family joins automatically once a module of
``fixtures/`` builds a checkpoint its converter takes.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import json
import pkgutil
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import ROOT, run_cli
from ggraft.errors import GgraftError, IncompatibleError, UnsupportedModelError
from ggraft.hf.checkpoint import Checkpoint
from ggraft.mmproj import writer
from ggraft.mmproj.converter import converter_for, discover
from ggraft.pair import engine
from ggraft.pair.check import check_mmproj, check_pair
from ggraft.mmproj.requirement_parts import REQUIRED, VISION_KEYS, OneOf
from ggraft.mmproj.requirements import PROJECTORS
from ggraft.mmproj.requirements_fit import MmprojHeader, mmproj_problems, needed_tensors
from ggraft.pair.runtime import Pair

VT = gguf.GGUFValueType
CV = gguf.Keys.ClipVision
SAMPLE = ROOT / "fixtures" / "sample.png"
HEAD_DIM = "clip.vision.attention.head_dim"
CONVERTERS = sorted({cls for classes in discover().values() for cls in classes}, key=lambda c: c.__name__)


# -- finding a fixture checkpoint for a converter --------------------------------------------
def _builders():
    """Every ``build*()`` of a fixtures module that takes no arguments (a family's converter module
    name first: its fixture is the likely one)."""
    package = importlib.import_module("fixtures")
    for mod in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"fixtures.{mod.name}")
        for name, fn in vars(module).items():
            if name.startswith("build") and inspect.isfunction(fn) and fn.__module__ == module.__name__ and \
                    all(p.default is not p.empty for p in inspect.signature(fn).parameters.values()):
                yield mod.name, fn


@functools.cache
def checkpoint_for(cls) -> Path | None:
    family = cls.__module__.rsplit(".", 1)[-1]
    builders = sorted(_builders(), key=lambda b: not (b[0].startswith(family) or family.startswith(b[0])))
    for _, build in builders:
        try:
            folder = build()
        except ImportError:  # a fixture whose builder needs an optional dependency (Gemma 3n: timm)
            continue
        for config in sorted(folder.glob("*/config.json")):
            try:
                if type(converter_for(Checkpoint(config.parent))) is cls:
                    return config.parent
            except GgraftError:
                continue
    return None


def text_for(checkpoint: Path) -> Path | None:
    """A text GGUF beside the checkpoint (``text.gguf`` or the vocabulary-only ``vocab.gguf``)."""
    return next((p for p in (checkpoint.parent / "text.gguf", checkpoint.parent / "vocab.gguf") if p.exists()), None)


@pytest.fixture(scope="module", params=CONVERTERS, ids=lambda c: c.__name__)
def family(request, tmp_path_factory):
    """(converter class, converted f32 mmproj, text GGUF or None, checkpoint folder)."""
    cls = request.param
    checkpoint = checkpoint_for(cls)
    if checkpoint is None:
        pytest.skip(f"no module of fixtures/ builds a checkpoint for {cls.__name__}")
    out = tmp_path_factory.mktemp(cls.__name__) / "mmproj-f32.gguf"
    return cls, writer.convert(converter_for(Checkpoint(checkpoint)), out, "f32"), text_for(checkpoint), checkpoint


# -- damaged copies, written with gguf-py ------------------------------------------------------
def damaged(src: Path, out: Path, *, keys: dict[str, tuple[VT, object] | None] | None = None,
            drop: tuple[str, ...] = (), transpose: tuple[str, ...] = ()) -> Path:
    """A copy of ``src`` with keys set ((type, value)) or removed (None) and tensors dropped or transposed."""
    keys = keys or {}
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(out), reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF.") or f.name in keys:
            continue
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if f.types[0] == VT.ARRAY else None)
    for name, typed in keys.items():
        if typed is not None:
            w.add_key_value(name, typed[1], typed[0])
    for t in reader.tensors:
        if t.name not in drop:
            data = np.array(t.data)
            w.add_tensor(t.name, np.ascontiguousarray(data.T) if t.name in transpose else data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def hparams(mmproj: Path) -> dict[str, int]:
    r = gguf.GGUFReader(mmproj)
    return {k: int(r.get_field(key).contents()) for k, key in
            (("E", CV.EMBEDDING_LENGTH), ("H", CV.Attention.HEAD_COUNT), ("S", CV.IMAGE_SIZE), ("P", CV.PATCH_SIZE))}


def damages(mmproj: Path) -> dict[str, tuple[dict, str]]:
    """The issue's damages that apply to this file: name -> (damaged() arguments, what the error names)."""
    h, names = hparams(mmproj), {t.name: t for t in gguf.GGUFReader(mmproj).tensors}
    u32 = lambda key, v: {key: (VT.UINT32, v)}  # noqa: E731
    not_dividing = next(n for n in range(3, 64) if h["E"] % n)
    head_dim = gguf.GGUFReader(mmproj).get_field(HEAD_DIM) is not None  # then the heads' width is that key's
    cases = {
        "head count 0": (dict(keys=u32(CV.Attention.HEAD_COUNT, 0)), "head_count is 0"),
        "head count not dividing": (dict(keys=u32(CV.Attention.HEAD_COUNT, not_dividing)),
                                    "has shape" if head_dim else "not a multiple"),
        "width 97, 4 heads": (dict(keys={**u32(CV.EMBEDDING_LENGTH, 97), **u32(CV.Attention.HEAD_COUNT, 4)}), "97"),
        "image size 0": (dict(keys=u32(CV.IMAGE_SIZE, 0)), "image_size 0"),
        "image size 1": (dict(keys=u32(CV.IMAGE_SIZE, 1)), "image_size 1"),
        "patch larger than image": (dict(keys=u32(CV.PATCH_SIZE, h["S"] + 1)), "smaller than"),
        "width key as a string": (dict(keys={CV.EMBEDDING_LENGTH: (VT.STRING, str(h["E"]))}), "stored as STRING"),
    }
    for name in ("v.patch_embd.weight", "v.conv_stem.conv.weight"):
        if name in names:
            cases[f"no {name}"] = (dict(drop=(name,)), f"{name} is missing")
    last = max(int(n.split(".")[2]) for n in names if n.startswith("v.blk.")) if any(
        n.startswith("v.blk.") for n in names) else None
    for attn in ("attn_q", "attn_qkv"):
        if last is not None and f"v.blk.{last}.{attn}.weight" in names:
            cases[f"no block {last} {attn}"] = (dict(drop=(f"v.blk.{last}.{attn}.weight",)),
                                                f"v.blk.{last}.{attn}.weight is missing")
    projection = next((n for n, t in names.items() if n.startswith("mm.") and len(t.shape) == 2
                       and t.shape[0] != t.shape[1]), None)
    if projection:
        cases[f"transposed {projection}"] = (dict(transpose=(projection,)), f"tensor {projection} has shape")
    return cases


def required_names(projector: str, present: set[str], n_blocks: int) -> list[str]:
    """The tensors of the file that the tables mark required: of a choice, those of the layout present
    except its first tensor, which only selects the layout (without it another layout is read)."""
    spec, out = PROJECTORS[projector], []
    for items, bids in ((spec.tensors, [None]), (spec.blocks, range(n_blocks))):
        for bid in bids:
            for item in items:
                layouts = item.layouts if isinstance(item, OneOf) else ((item,),)
                for layout in layouts:
                    names = [(t.name.format(bid=bid) if bid is not None else t.name, t.need) for t in layout]
                    if names and names[0][0] in present:
                        out += [n for n, need in names[len(layouts) > 1:] if need == REQUIRED and n in present]
                        break
    return out


def refused(report, needle: str) -> bool:
    return any(f.severity == "error" and f.code == "llama-cpp-requirement" and needle in f.message
               for f in report.findings)


# -- the tests ---------------------------------------------------------------------------------
def test_converted_fixture_fits(family):
    cls, mmproj, _, _ = family
    report = check_mmproj(mmproj)
    assert report.ok and not [f for f in report.findings if f.code == "llama-cpp-requirement"], report.findings
    assert cls.projector_type in PROJECTORS


def test_each_damage_is_refused_before_llama_cpp(family, tmp_path, monkeypatch):
    cls, mmproj, text, _ = family

    def reached(*args, **kw):
        raise AssertionError("llama.cpp was handed a pair check refuses")

    monkeypatch.setattr(engine, "open_llama", reached)
    for name, (change, needle) in damages(mmproj).items():
        bad = damaged(mmproj, tmp_path / f"{name.replace(' ', '-')}.gguf", **change)
        assert refused(check_mmproj(bad), needle), (name, check_mmproj(bad).findings)
        if text is not None:
            assert refused(check_pair(text, bad), needle), name
            with pytest.raises(IncompatibleError, match=re.escape(str(bad))):  # check's first error
                Pair(text, bad)
            with pytest.raises(IncompatibleError):
                Pair(text, bad, check=False)  # the mmproj half is never skipped


def test_every_required_tensor_and_key_is_needed(family, tmp_path):
    """Removing any tensor or key the tables mark required (checked on the header: fast)."""
    cls, mmproj, _, _ = family
    m = gguf.GGUFReader(mmproj)
    header = MmprojHeader({f.name: (f.types[0], f.types[-1] if f.types[0] == VT.ARRAY else None)
                           for f in m.fields.values()}, lambda k: m.get_field(k).contents() if m.get_field(k) else None,
                          {t.name: tuple(int(d) for d in t.shape) for t in m.tensors})
    assert mmproj_problems(header, cls.projector_type) == []
    n_blocks = int(m.get_field(CV.BLOCK_COUNT).contents())
    for name in required_names(cls.projector_type, set(header.shapes), n_blocks):
        shapes = {k: v for k, v in header.shapes.items() if k != name}
        problems = mmproj_problems(MmprojHeader(header.types, header.value, shapes), cls.projector_type)
        assert any(p.severity == "error" and name in p.message for p in problems), name
    for key in (k for k in VISION_KEYS + PROJECTORS[cls.projector_type].keys if k.need == REQUIRED):
        types = {k: v for k, v in header.types.items() if k != key.name}
        problems = mmproj_problems(MmprojHeader(types, header.value, header.shapes), cls.projector_type)
        assert any(key.name in p.message for p in problems), key.name


def test_run_exits_1_without_reaching_llama_cpp(family, tmp_path):
    """The CLI on two damages per family (one key, one tensor): one error line, exit 1, no signal."""
    cls, mmproj, text, _ = family
    if text is None:
        pytest.skip("the fixture has no text GGUF")
    cases = damages(mmproj)
    for name in ("width 97, 4 heads", next(n for n in cases if n.startswith("no "))):
        change, needle = cases[name]
        bad = damaged(mmproj, tmp_path / f"{name.replace(' ', '-')}.gguf", **change)
        result = run_cli("run", text, bad, "--image", SAMPLE, "-p", "hi", timeout=120)
        errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error: ")]
        assert result.code == 1 and len(errors) == 1 and needle in errors[0], (name, result)
        assert "Traceback" not in result.stderr


def head_count_not_dividing(checkpoint: Path, out: Path) -> Path:
    """A copy of the checkpoint whose vision head count does not divide its width."""
    shutil.copytree(checkpoint, out)
    config = json.loads((out / "config.json").read_text())
    vision = (config.get("thinker_config") or config).get("vision_config") or config  # an omni model's thinker
    key = next((k for k in ("num_attention_heads", "num_heads", "heads") if k in vision), None)
    width = next((vision[k] for k in ("hidden_size", "embed_dim", "width") if k in vision), None)
    if key is None or not isinstance(width, int):
        pytest.skip("the vision config has no head count")
    vision[key] = next(n for n in range(3, 64) if width % n)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_convert_refuses_a_checkpoint_llama_cpp_could_not_load(family, tmp_path):
    """A config whose head count does not divide the width converts to nothing: exit 2, no file."""
    cls, _, _, checkpoint = family
    copy = head_count_not_dividing(checkpoint, tmp_path / "ckpt")
    out = tmp_path / "mmproj.gguf"
    with pytest.raises(GgraftError):  # the converter itself may refuse it first; else the requirements do
        writer.convert(converter_for(Checkpoint(copy)), out, "f16")
    assert not out.exists() and not list(tmp_path.glob(".mmproj.gguf*"))
    result = run_cli("convert", copy, "-o", out)
    assert result.code == 2 and result.stderr.startswith("Error: ") and not out.exists(), result


def test_convert_names_what_llama_cpp_would_refuse(llava_fixture, tmp_path):
    copy = head_count_not_dividing(llava_fixture / "hf", tmp_path / "ckpt")
    with pytest.raises(UnsupportedModelError, match="would not load in llama.cpp: .*head_count 3"):
        writer.convert(converter_for(Checkpoint(copy)), tmp_path / "mmproj.gguf", "f16")
    assert not (tmp_path / "mmproj.gguf").exists()


@pytest.mark.parametrize("projector", sorted(PROJECTORS))
def test_tables_are_consistent(projector):
    """For every projector type in the tables, the minimal file they describe fits, and each
    tensor they require is needed: the tables are whole for families with no fixture yet."""
    symbols = dict(E=32, H=4, F=64, N=2, S=32, P=8, X=40, Y=24, Q=4, T=48)
    shapes = needed_tensors(projector, symbols)
    types = {k.name: (k.type, k.item_type) for k in VISION_KEYS + PROJECTORS[projector].keys if k.need == REQUIRED}
    types[gguf.Keys.Clip.HAS_VISION_ENCODER] = (VT.BOOL, None)
    values = {CV.EMBEDDING_LENGTH: 32, CV.Attention.HEAD_COUNT: 4, CV.BLOCK_COUNT: 2, CV.IMAGE_SIZE: 32,
              CV.PATCH_SIZE: 8, CV.IMAGE_MEAN: [0.5] * 3, CV.IMAGE_STD: [0.5] * 3, CV.FEED_FORWARD_LENGTH: 64,
              CV.PROJECTION_DIM: 48, gguf.Keys.Clip.HAS_VISION_ENCODER: True, CV.Projector.SCALE_FACTOR: 2}
    if projector in ("idefics3", "lfm2", "nemotron_v2_vl"):
        types[CV.Projector.SCALE_FACTOR] = (VT.UINT32, None)
        shapes = needed_tensors(projector, {**symbols, "M": 2})
    if projector == "dots3note_v":  # spatial_merge_size is required (clip.cpp:1568): 2 in the minimal header
        values[CV.SPATIAL_MERGE_SIZE] = 2
        shapes = needed_tensors(projector, {**symbols, "M": 2})
    if projector == "minimax_m3":  # a per-patch MLP to T, then the 2x2 merger MLP to Z
        shapes = needed_tensors(projector, {**symbols, "M": 2, "Z": 48})
    if projector == "kimik25":  # its position grid is (E, Wp, Hp), resized to the image
        types[CV.Projector.SCALE_FACTOR] = (VT.UINT32, None)
        shapes = needed_tensors(projector, {**symbols, "M": 2, "Wp": 4, "Hp": 4})
    if projector == "granite4_vision":  # 64-wide Q-Former heads; 2x2 windows on the 4x4 grid, 1 query each
        values.update({CV.EMBEDDING_LENGTH: 64, "clip.vision.feature_layer": [1], "clip.vision.image_grid_pinpoints":
                       [32, 32], "clip.vision.projector.spatial_offsets": [-1], "clip.vision.projector.window_side": 2})
        shapes = needed_tensors(projector, {**symbols, "E": 64, "Qs": 1, "Ws": 2, "Xq": 40, "features": [1]})
    if projector.startswith("deepseekocr"):  # the SAM width and heads (and deepseekocr2's KV heads) read as 1 here
        shapes = needed_tensors(projector, {**symbols, "Es": 1, "Hs": 1, "Fs": 24, "R": 4, "C": 8, "C2": 16,
                                            **({"Hkv": 1} if projector == "deepseekocr2" else {})})
    header = MmprojHeader(types, lambda k: values.get(k, 1), shapes)
    assert [p for p in mmproj_problems(header, projector) if p.severity == "error"] == []
    for name in required_names(projector, set(shapes), symbols["N"]):
        short = MmprojHeader(types, header.value, {k: v for k, v in shapes.items() if k != name})
        assert any(name in p.message for p in mmproj_problems(short, projector)), name
