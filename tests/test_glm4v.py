"""GLM-4.1V, GLM-4.5V, GLM-4.6V and GLM-OCR (projector glm4v).

Every saved layout of both fixtures (GLM-4.1V's tower, and GLM-OCR's: no learned positions,
per-head q/k norms) is converted once per output type and run in llama.cpp through
``ggraft.verify`` against transformers on the same pixels: the whole image, since llama.cpp's
glm4v preprocessing (dynamic resolution, tools/mtmd/mtmd-image.cpp:772) leaves an image whose
sides are multiples of two patches and that makes 8..4096 tokens as it is.  GLM-4.1V is compared
on an image of its position grid's size (8x8 patches) and on one the grid is resampled for.
GLM-4.5V and GLM-4.6V have GLM-4.1V's tower under the same names: the same checkpoint under their
architectures must give the same file and pass against transformers' class for each.
"""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from conftest import (BARS, assert_audit_finds, assert_fidelity, assert_refused, assert_same_tensors, cli_check,
                      cli_convert_and_verify, config_variant, families_fixtures, gguf_tensors)
from fixtures import glm4v
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.jobs.verify import verify
from ggraft.mmproj import writer as mmproj
from ggraft.mmproj.converter import converter_for

Q = gguf.GGMLQuantizationType
FAMILIES = {"glm4v": "GLM-4V", "glmocr": "GLM-OCR"}  # fixture -> converter family (the figures' label)
LAYOUTS = [(f, layout) for f in FAMILIES for layout in ("hf", "hf-hub", "hf-bare")]
#: (height, width) -> tokens: GLM-4.1V's 8x8 position grid of 10-pixel patches, then a resampled grid
IMAGES = {"glm4v": {(80, 80): 16, (100, 60): 15}, "glmocr": {(64, 48): 12, (48, 96): 18}}
#: the other architectures with GLM-4.1V's tower: (architecture, config model_type)
SIBLINGS = (("Glm4vMoeForConditionalGeneration", "glm4v_moe"), ("Glm46VForConditionalGeneration", "glm46v"))


fixture_dirs, converted = families_fixtures({"glm4v": lambda: glm4v.build(), "glmocr": lambda: glm4v.build_ocr()},
                                            "glm4v")


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("family,layout", LAYOUTS)
def test_fidelity(family, layout, outtype, fixture_dirs, converted):
    out = converted(family, layout, outtype)
    sizes = IMAGES[family] if layout == "hf" else dict(list(IMAGES[family].items())[1:])  # layouts: same file
    for size, tokens in sizes.items():
        report = verify(fixture_dirs[family] / layout, out, text=fixture_dirs[family] / "text.gguf", image_size=size)
        assert_fidelity(FAMILIES[family], outtype, report, tokens=tokens, context=size)  # no runtime defect: strict


@pytest.mark.parametrize("family,layout", [x for x in LAYOUTS if x[1] != "hf"])
def test_layouts_give_the_same_file(family, layout, converted):
    assert_same_tensors(converted(family, "hf", "f32"), converted(family, layout, "f32"))


@pytest.mark.parametrize("arch,model_type", SIBLINGS)
def test_sibling_architecture_gives_the_same_file(arch, model_type, fixture_dirs, converted, tmp_path):
    folder = fixture_dirs["glm4v"]
    src = config_variant(folder / "hf", tmp_path / "ckpt", architectures=[arch], model_type=model_type)
    conv = converter_for(Checkpoint(src))
    assert conv.family == "GLM-4V" and conv.projector_type == "glm4v"
    out = mmproj.convert(conv, tmp_path / "m.gguf", "f32")
    assert_same_tensors(converted("glm4v", "hf", "f32"), out)
    report = verify(src, out, text=folder / "text.gguf")  # transformers' own class for ``arch``
    assert report.passed and report.result.tokens == 12, report.result


def test_tensors_and_keys(converted):
    path = converted("glm4v", "hf", "q8_0")
    r = gguf_file.open_gguf(path)
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    assert v(gguf.Keys.Clip.PROJECTOR_TYPE) == "glm4v"
    assert v(gguf.Keys.ClipVision.IMAGE_SIZE) == 80 and v(gguf.Keys.ClipVision.PATCH_SIZE) == 10
    assert v(gguf.Keys.ClipVision.EMBEDDING_LENGTH) == 64 and v(gguf.Keys.ClipVision.Attention.HEAD_COUNT) == 2
    assert v(gguf.Keys.ClipVision.FEED_FORWARD_LENGTH) == 48  # the blocks' MLP is out_hidden_size wide, not 96
    assert v(gguf.Keys.ClipVision.PROJECTION_DIM) == 48 and v(gguf.Keys.ClipVision.SPATIAL_MERGE_SIZE) == 2
    assert v(gguf.Keys.ClipVision.Attention.LAYERNORM_EPS) == pytest.approx(2e-6)
    assert v(gguf.Keys.ClipVision.USE_SILU) is True and v(gguf.Keys.ClipVision.USE_GELU) is None
    assert np.allclose(v(gguf.Keys.ClipVision.IMAGE_MEAN), [0.45, 0.5, 0.55])  # from preprocessor_config.json
    t = gguf_tensors(path)
    for name in ("v.patch_embd.weight", "v.patch_embd.weight.1"):  # the Conv3d kernel, one Conv2d per frame
        assert tuple(t[name].shape) == (10, 10, 3, 64) and t[name].tensor_type == Q.F16
    assert tuple(t["v.position_embd.weight"].shape) == (64, 64) and t["v.position_embd.weight"].tensor_type == Q.F32
    for name in ("v.patch_embd.bias", "v.norm_embd.weight", "v.post_ln.weight", "mm.post_norm.bias"):
        assert t[name].tensor_type == Q.F32, name
    assert tuple(t["v.blk.0.attn_qkv.weight"].shape) == (64, 192) and not any("attn_q." in n for n in t)
    assert t["v.blk.0.attn_qkv.weight"].tensor_type == Q.Q8_0
    assert tuple(t["mm.patch_merger.weight"].shape) == (2, 2, 64, 48) and t["mm.patch_merger.weight"].tensor_type == Q.F16
    shapes = {"mm.model.fc.weight": (48, 48), "mm.gate.weight": (48, 96), "mm.up.weight": (48, 96),
              "mm.down.weight": (96, 48)}
    assert {n: tuple(t[n].shape) for n in shapes} == shapes and t["mm.down.weight"].tensor_type == Q.Q8_0
    assert not any(n.startswith("v.blk.") and n.endswith(("attn_q_norm.weight", "ffn_up.bias")) for n in t)

    ocr = gguf_file.open_gguf(converted("glmocr", "hf", "f32"))
    assert gguf_file.value(ocr, gguf.Keys.ClipVision.FEED_FORWARD_LENGTH) == 80  # GLM-OCR's own intermediate_size
    t = gguf_tensors(converted("glmocr", "hf", "f32"))
    assert "v.position_embd.weight" not in t and "v.norm_embd.weight" not in t
    assert tuple(t["v.blk.1.attn_q_norm.weight"].shape) == (16,) and tuple(t["v.blk.1.attn_k_norm.weight"].shape) == (16,)
    assert {"v.blk.0.attn_out.bias", "v.blk.0.ffn_up.bias", "v.blk.0.ffn_gate.bias", "v.blk.0.ffn_down.bias"} <= set(t)
    assert tuple(t["mm.up.weight"].shape) == (32, 96)  # the merger MLP is 3 x out_hidden_size wide


@pytest.mark.parametrize("family,changes,needle", [
    ("glm4v", {"spatial_merge_size": 3}, "2x2 patches only"),
    ("glm4v", {"temporal_patch_size": 1}, "temporal_patch_size 2"),
    ("glm4v", {"rope_parameters": {"rope_type": "axial", "rope_theta": 5000.0}}, "rope_theta 5000"),
    ("glm4v", {"num_heads": 32}, "vision head size 2"),
    ("glmocr", {"hidden_act": "relu"}, "'relu'"),
])
def test_inexpressible_config_is_refused(family, changes, needle, fixture_dirs, tmp_path):
    assert_refused(config_variant(fixture_dirs[family] / "hf", tmp_path / "ckpt", vision=changes), tmp_path, needle)


def test_unmappable_tensor_is_named(fixture_dirs, tmp_path):
    name = "model.visual.blocks.0.attn.rel_pos.weight"
    src = config_variant(fixture_dirs["glmocr"] / "hf", tmp_path / "ckpt", extra={name: np.zeros((4, 4), np.float32)})
    assert_refused(src, tmp_path, name)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_check_and_audit_of_the_fixture_pair(family, fixture_dirs, converted):
    _, found = cli_check(fixture_dirs[family] / "text.gguf", converted(family, "hf", "f16"),
                         {"glm4v": 48, "glmocr": 32}[family])
    boundary = found["boundary-tokens"]["message"]
    assert "<|begin_of_image|>" in boundary and "<|end_of_image|>" in boundary
    assert found["width"]["severity"] == "info" and found["chat-template"]["severity"] == "info"
    assert found.get("text-architecture", {"severity": "info"})["severity"] == "info"
    audit = assert_audit_finds(fixture_dirs[family], "GLM-4V", 6, "GLM-OCR (GlmOcrForConditionalGeneration",
                               sources=("text.gguf",))
    assert any(d.startswith("GLM-4V (") and "Glm46VForConditionalGeneration" in d for d in audit["donors"]["GLM-4V"])


def test_glm4_text_without_rope_sections_is_flagged(fixture_dirs, converted, tmp_path):
    """GLM-V text models read image tokens at (t, h, w) positions: llama.cpp runs ``glm4`` with
    M-RoPE only when the file has rope sections (llama-model.cpp 3198-3199).  Needs the
    ``text_fit.NEEDS_MROPE`` row proposed in /work/tools/tasks/glm4v.shared.md."""
    from fixtures import glm4v as fx
    from fixtures.tokenizer import train
    from ggraft.pair import text_fit
    from ggraft.pair.check import check_pair

    if "glm4v" not in text_fit.NEEDS_MROPE:
        pytest.skip("text_fit.NEEDS_MROPE has no glm4v row yet (proposed in glm4v.shared.md)")
    folder, mmproj_f16 = fixture_dirs["glm4v"], converted("glm4v", "hf", "f16")
    good = {f.code: f for f in check_pair(folder / "text.gguf", mmproj_f16).findings}
    assert good["text-architecture"].severity == "info" and "M-RoPE" in good["text-architecture"].message
    cfg = json.loads((folder / "hf" / "config.json").read_text())["text_config"]
    cfg["rope_parameters"]["mrope_section"] = [0, 0, 0]  # no sections: llama.cpp runs 1-D RoPE
    text = fx.write_text_gguf(tmp_path / "text-1d.gguf", cfg, train(special=fx.SPECIAL))
    bad = {f.code: f for f in check_pair(text, mmproj_f16).findings}
    assert bad["text-architecture"].severity == "error", bad


def test_convert_and_verify_cli(fixture_dirs, tmp_path):
    folder = fixture_dirs["glm4v"]
    cli_convert_and_verify(folder / "hf-hub", tmp_path, "bf16", text=folder / "text.gguf", projector="glm4v",
                           image_size=(80, 60))  # 4x3 tokens, resampled
