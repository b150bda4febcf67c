"""Nemotron 3 Nano Omni vision (projector nemotron_v2_vl): every saved layout, every output type, through
``ggraft verify``.

llama.cpp does not tile for this type: every image is resized to one ``image_size`` square (mtmd.cpp:843-845,
the fixed-size preprocessor), so the whole test image (70x70, the processor's smallest grid on the tiny model:
10x10 patches, 25 tokens) is compared; both sides take it as it is.  The position table is resampled by the
converter to that grid as RADIO resamples it; the tests show the table equals transformers' own, and that
llama.cpp's converter's ``align_corners=True`` resample and its dropping of the final LayerNorm fail.  Other
image shapes get other tokens in llama.cpp than in transformers' processor (a named runtime defect, shown on a
70x140 image).  mtmd puts no text around the image, so verify needs no vocabulary; it is given one anyway.
"""
from __future__ import annotations

import ast
import math

import gguf
import numpy as np
import pytest

from conftest import (BARS, assert_audit_finds, assert_fidelity, assert_refused, assert_same_tensors, changed_config,
                      cli_convert_and_verify, config_variant, family_fixtures, gguf_tensors, pair_codes)
from fixtures import nemotron_omni
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.jobs.verify import verify
from ggraft.mmproj import writer as mmproj
from ggraft.mmproj.converter import converter_for

Q = gguf.GGMLQuantizationType
K = gguf.Keys.ClipVision
LAYOUTS = nemotron_omni.LAYOUTS
TOKENS = 25  # 70 / 7 = 10 patches a side, 2x2 pixel shuffle
DEFECT = "mtmd.cpp:843-845"


folder, converted = family_fixtures(lambda: nemotron_omni.build(), "nemotron_omni")


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fidelity(layout, outtype, folder, converted):
    report = verify(folder / layout, converted(layout, outtype), text=folder / "text.gguf")
    # an image_size square: the preprocessing defect does not apply, the file passes strictly
    assert_fidelity("nemotron_omni", outtype, report, tokens=TOKENS, image_size=(70, 70))


def test_keys_and_tensors(folder, converted):
    path = converted("hf", "q8_0")
    r = gguf.GGUFReader(path)
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    assert v(gguf.Keys.Clip.PROJECTOR_TYPE) == "nemotron_v2_vl" and v(K.Projector.SCALE_FACTOR) == 2
    assert v(K.IMAGE_SIZE) == 70 and v(K.PATCH_SIZE) == 7 and v(K.EMBEDDING_LENGTH) == 64
    assert v(K.FEED_FORWARD_LENGTH) == 192 and v(K.BLOCK_COUNT) == 2 and v(K.Attention.HEAD_COUNT) == 2
    assert v(K.PROJECTION_DIM) == 80 and v(K.Attention.LAYERNORM_EPS) == pytest.approx(1e-5)
    assert v(K.USE_GELU) is True and v(K.USE_SILU) is None
    assert np.allclose(v(K.IMAGE_MEAN), nemotron_omni.MEAN) and np.allclose(v(K.IMAGE_STD), nemotron_omni.STD)
    t = gguf_tensors(path)
    assert len(t) == 5 + 2 * 18 + 3  # patch, CLS/registers, positions, final norm (2); blocks; projector
    assert not any("video" in n or "attn_qkv" in n or n.endswith("mlp.3.bias") for n in t)
    assert t["v.patch_embd.weight"].tensor_type == Q.F16 and tuple(t["v.patch_embd.weight"].shape) == (7, 7, 3, 64)
    assert t["v.class_embd"].tensor_type == Q.F32 and tuple(t["v.class_embd"].shape) == (64, 5)  # 2 CLS + 3 registers
    assert t["v.position_embd.weight"].tensor_type == Q.F32 and tuple(t["v.position_embd.weight"].shape) == (64, 100)
    assert tuple(t["v.post_ln.weight"].shape) == (64,) and t["v.blk.1.ls2.weight"].tensor_type == Q.F32
    assert t["v.blk.1.attn_q.weight"].tensor_type == Q.Q8_0 and tuple(t["v.blk.1.attn_q.weight"].shape) == (64, 64)
    for name, shape, qtype in (("mm.model.mlp.0.weight", (256,), Q.F32), ("mm.model.mlp.1.weight", (256, 96), Q.Q8_0),
                               ("mm.model.mlp.3.weight", (96, 80), Q.Q8_0)):
        assert tuple(t[name].shape) == shape and t[name].tensor_type == qtype, name
    f32, ckpt = gguf.GGUFReader(converted("hf", "f32")), Checkpoint(folder / "hf")
    qkv = ckpt.load("vision_model.radio_model.model.blocks.1.attn.qkv.weight")
    assert np.array_equal(gguf_file.tensor_values(f32, "v.blk.1.attn_k.weight"), qkv[64:128])


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_layouts_write_identical_files(layout, converted):
    assert_same_tensors(converted("hf", "f32"), converted(layout, "f32"), ordered=True)


def test_positions_are_radios_resample_and_llama_cpp_converters_are_not(folder, converted, tmp_path):
    """The stored table is what RADIO adds for a 10x10 grid (its 14x14 table, bilinear, align_corners=False).
    llama.cpp's converter resamples with align_corners=True (conversion/nemotron.py:122): below the f32 bar."""
    import torch

    from ggraft.converters.nemotron_omni import POSITIONS, NemotronOmni
    from ggraft.jobs.verify import load_reference_model

    model = load_reference_model(Checkpoint(folder / "hf"))
    with torch.no_grad():
        expected = model.vision_model.embeddings._interpolate_position_embedding((10, 10), torch.float32)[0].numpy()
    stored = gguf_file.tensor_values(gguf.GGUFReader(converted("hf", "f32")), POSITIONS)
    assert np.allclose(stored, expected, rtol=0, atol=1e-6)

    def align_corners(table):
        grid = torch.from_numpy(np.asarray(table, np.float32).reshape(1, 14, 14, -1)).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(grid, size=(10, 10), mode="bilinear", align_corners=True)
        return grid.permute(0, 2, 3, 1).reshape(100, -1).numpy()

    class AlignCorners(NemotronOmni):  # llama.cpp's converter's resample
        def modify(self, name, tensor):
            if name == POSITIONS:
                shape = (np.float32, lambda s: (100, s[-1]))
                yield name, type(tensor)._wrap_fn(align_corners, meta_noop=shape)(tensor)
            else:
                yield from super().modify(name, tensor)

    out = mmproj.convert(AlignCorners(Checkpoint(folder / "hf")), tmp_path / "corners.gguf", "f32")
    report = verify(folder / "hf", out)
    assert not report.passed and report.result.min_cosine < BARS["f32"], report.result


def test_final_layernorm(folder, tmp_path):
    """The tower's final LayerNorm (built when the text model has MTP layers) is v.post_ln: left out, as
    llama.cpp's converter leaves it out, the file fails; with no MTP layers transformers ignores the saved
    norm, and so does the converter."""
    from ggraft.converters.nemotron_omni import FINAL_NORM, NemotronOmni

    class WithoutFinalNorm(NemotronOmni):
        def skip(self, canonical):
            return canonical.startswith(FINAL_NORM) or super().skip(canonical)

    out = mmproj.convert(WithoutFinalNorm(Checkpoint(folder / "hf")), tmp_path / "no-norm.gguf", "f32")
    assert verify(folder / "hf", out).result.min_cosine < 0.99
    src = config_variant(folder / "hf", tmp_path / "no-mtp", **{"text_config.num_nextn_predict_layers": 0})
    out = mmproj.convert(converter_for(Checkpoint(src)), tmp_path / "no-mtp.gguf", "f32")
    assert "v.post_ln.weight" not in gguf_tensors(out)
    report = verify(src, out)
    assert report.passed, report.result


def test_swiglu_tower(folder, tmp_path):
    """A RADIO tower with a SwiGLU FFN (``use_swiglu_ffn``: gate/up/down, 2/3 of the MLP width rounded up to
    8) is written with ffn_gate and SiLU, and matches."""
    import shutil

    from transformers import NemotronH_Omni_Reasoning_V3, NemotronH_Omni_Reasoning_V3_Config

    from fixtures import common

    config = NemotronH_Omni_Reasoning_V3_Config.from_pretrained(folder / "hf")
    config.vision_config.use_swiglu_ffn = True
    common.seeded(0)
    model = NemotronH_Omni_Reasoning_V3(config).eval()
    common.perturb(model)
    model.save_pretrained(tmp_path / "hf")
    shutil.copy(folder / "hf" / "preprocessor_config.json", tmp_path / "hf")
    out = mmproj.convert(converter_for(Checkpoint(tmp_path / "hf")), tmp_path / "swiglu.gguf", "f32")
    r = gguf.GGUFReader(out)
    assert gguf_file.value(r, K.USE_SILU) is True and gguf_file.value(r, K.FEED_FORWARD_LENGTH) == 128
    assert tuple(gguf_tensors(out)["v.blk.1.ffn_gate.weight"].shape) == (64, 128)
    report = verify(tmp_path / "hf", out)
    assert report.passed, report.result


def test_image_size_is_the_processors_smallest_grid():
    """The converter's port of the processor's grid (its module needs torchvision, so its function is run
    from source), on many shapes; the release's defaults give 32 patches, 512 pixels."""
    from importlib.util import find_spec
    from pathlib import Path

    from ggraft.converters.nemotron_omni import patch_grid

    source = find_spec("transformers.models.nemotron_h_omni.image_processing_nemotron_h_omni").origin
    tree = ast.parse(Path(source).read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_patch_grid_size")
    scope = {"math": math}
    exec(compile(ast.Module([fn], []), "get_patch_grid_size", "exec"), scope)
    for h, w, p, low, high in ((7, 7, 7, 100, 400), (16, 16, 16, 1024, 13312), (70, 140, 7, 100, 400),
                               (333, 77, 7, 100, 400), (1000, 1000, 16, 1024, 13312), (15, 900, 14, 256, 1024)):
        assert patch_grid(h, w, p, 2, low, high) == scope["get_patch_grid_size"](h, w, p, 2, low, high)
    assert patch_grid(16, 16, 16, 2, 1024, 13312) == (32, 32)


def test_other_shapes_are_the_named_runtime_defect(folder, converted):
    """A 70x140 image: transformers' processor keeps it at 10x20 patches (50 tokens), llama.cpp letterboxes it
    into the 70x70 square (25 tokens).  check warns of it."""
    from ggraft.converters.nemotron_omni import patch_grid
    from ggraft.jobs.verify import test_image
    from ggraft.pair import engine
    from ggraft.pair.check import check_pair

    gh, gw = patch_grid(70, 140, 7, 2, nemotron_omni.MIN_PATCHES, nemotron_omni.MAX_PATCHES)
    with engine.VisionEncoder(converted("hf", "f32")) as enc:
        rows = enc.encode(test_image(70, 140), 80)
    assert (gh * gw // 4, len(rows)) == (50, TOKENS)
    codes = {f.code: f for f in check_pair(folder / "text.gguf", converted("hf", "f32")).findings}
    assert codes["runtime-defect"].severity == "warning" and DEFECT in codes["runtime-defect"].message


@pytest.mark.parametrize("changes,top,needle", [
    ({"hidden_act": "relu"}, {}, "vision activation 'relu'"),
    ({"num_cls_tokens": 0, "num_registers": 0}, {}, "no CLS or register tokens"),
    ({"num_attention_heads": 3}, {}, "not a multiple of 3 heads"),
    ({}, {"downsample_ratio": 0.25}, "downsample_ratio 0.25"),
])
def test_inexpressible_config_is_refused(changes, top, needle, folder):
    from ggraft.converters.nemotron_omni import NemotronOmni

    assert needle in NemotronOmni.refuses(changed_config(folder / "hf", changes, **top))


def test_refusal_is_one_line(folder, tmp_path):
    src = config_variant(folder / "hf", tmp_path / "ckpt", vision={"hidden_act": "relu"})
    assert_refused(src, tmp_path, "NemotronH_Omni_Reasoning_V3", "vision activation 'relu'")


def test_check_finds_no_boundary_tokens(folder, converted):
    codes = pair_codes(folder / "text.gguf", converted("hf", "f16"))
    assert "inserts no boundary tokens" in codes["boundary-tokens"].message  # mtmd.cpp:843: none for this type
    assert codes["width"].severity == "info" and "80" in codes["width"].message
    assert codes["chat-template"].severity == "info"
    assert "llama-cpp-requirement" not in codes


def test_audit_finds_nemotron_tokens(folder):
    assert_audit_finds(folder, "Nemotron VL", 3, "NemotronH_Omni_Reasoning_V3", library=True)


def test_convert_and_verify_cli(folder, tmp_path):
    cli_convert_and_verify(folder / "hf-hub", tmp_path, "bf16", text=folder / "text.gguf", projector="nemotron_v2_vl",
                           tokens=TOKENS)
