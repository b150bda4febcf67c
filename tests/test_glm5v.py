"""GLM-5 Next (projector glm5v).

Every saved layout is converted once per output type and run in llama.cpp through
``ggraft.verify`` against transformers on the same pixels, on images mtmd leaves as they are
(sides multiples of two patches, inside the processor's token budget).  mtmd lays every other
image out itself (``tools/mtmd/mtmd-image.cpp`` 796-857: top-left on a black canvas aligned to two
patches, rescaled only to meet the budget); ``test_whole_image_layout`` compares that with
transformers' own ``Glm5NextImageProcessor`` on the whole image, padded, upscaled and downscaled.
The fixture's ``swiglu_limit`` is small enough that every SwiGLU clamps: a file written with
another limit fails.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from conftest import (BARS, assert_audit_finds, assert_fidelity, assert_refused, assert_same_tensors, cli_check,
                      cli_convert_and_verify, config_variant, family_fixtures, gguf_tensors)
from fixtures import glm5v
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.jobs import verify as verify_job
from ggraft.jobs.verify import as_rows, compare, llama_embeddings, load_reference_model, verify
from ggraft.mmproj import writer as mmproj
from ggraft.mmproj.converter import converter_for

Q = gguf.GGMLQuantizationType
CV = gguf.Keys.ClipVision
FAMILY = "GLM-5 Next"
LAYOUTS = ("hf", "hf-hub", "hf-bare")
#: (height, width) -> image tokens: the family's test image (8x6 patches of 9 pixels), then 6x10 patches
IMAGES = {(72, 54): 12, (54, 90): 15}
AREA = 18 * 18  # pixels per image token: (patch 9 x merge 2) squared


folder, converted = family_fixtures(lambda: glm5v.build(), "glm5v")


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fidelity(layout, outtype, folder, converted):
    out = converted(layout, outtype)
    sizes = IMAGES if layout == "hf" else dict(list(IMAGES.items())[1:])  # the layouts give the same file
    for size, tokens in sizes.items():
        report = verify(folder / layout, out, text=folder / "text.gguf", image_size=size)
        assert_fidelity(FAMILY, outtype, report, tokens=tokens, context=size)  # no runtime defect: strict


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_layouts_give_the_same_file(layout, converted):
    assert_same_tensors(converted("hf", "f32"), converted(layout, "f32"))


def test_bare_model_gives_the_same_file(folder, converted, tmp_path):
    """transformers' bare ``Glm5NextModel`` (saved as ``visual.*``) converts to the same file and
    passes against that class."""
    conv = converter_for(Checkpoint(folder / "hf-model"))
    assert conv.family == FAMILY and conv.projector_type == "glm5v"
    out = mmproj.convert(conv, tmp_path / "m.gguf", "f32")
    assert_same_tensors(converted("hf", "f32"), out)
    report = verify(folder / "hf-model", out, text=folder / "text.gguf")
    assert report.passed and report.result.tokens == 12, report.result


def test_whole_image_layout(folder, converted):
    """mtmd's canvas against transformers' processor, whole image: padded (50x70 on 54x72), upscaled
    to the minimum budget (20x30 -> 36x54) and downscaled into the maximum one (150x200 -> 81x108
    on 90x108).  Pillow picks the order of its two resampling passes by shape and mtmd always runs
    the horizontal one first (mtmd-image.cpp:469), so some other downscales differ by rounding."""
    import torch
    import transformers

    hf = folder / "hf"
    processor = transformers.AutoImageProcessor.from_pretrained(hf)
    model = load_reference_model(Checkpoint(hf))
    for size, tokens in {(50, 70): 12, (20, 30): 6, (150, 200): 30}.items():
        img = verify_job.test_image(*size)
        inputs = processor(images=[img], return_tensors="pt")
        with torch.no_grad():
            ref = as_rows(model.get_image_features(pixel_values=inputs["pixel_values"],
                                                   image_grid_thw=inputs["image_grid_thw"]))
        got = llama_embeddings(converted("hf", "f32"), img, 48, folder / "text.gguf", None)
        result = compare(got, ref)
        assert result.tokens == tokens and result.min_cosine >= BARS["f32"], (size, result)


def test_the_clamp_is_what_makes_it_match(folder, tmp_path):
    """The fixture's SwiGLUs clamp, and a file written with another limit does not match."""
    src = config_variant(folder / "hf", tmp_path / "ckpt", vision={"swiglu_limit": 1000.0})
    out = mmproj.convert(converter_for(Checkpoint(src)), tmp_path / "m.gguf", "f32")
    assert gguf_file.value(gguf_file.open_gguf(out), "clip.vision.swiglu_clamp") == 1000.0
    report = verify(folder / "hf", out, text=folder / "text.gguf")
    assert report.result.tokens == 12 and report.result.min_cosine < 0.99, report.result


def test_tensors_and_keys(converted):
    path = converted("hf", "q8_0")
    r = gguf_file.open_gguf(path)
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    assert v(gguf.Keys.Clip.PROJECTOR_TYPE) == "glm5v"
    assert v(CV.IMAGE_SIZE) == 72 and v(CV.PATCH_SIZE) == 9 and v(CV.SPATIAL_MERGE_SIZE) == 2
    assert v(CV.EMBEDDING_LENGTH) == 64 and v(CV.Attention.HEAD_COUNT) == 4 and v(CV.BLOCK_COUNT) == 2
    assert v(CV.FEED_FORWARD_LENGTH) == 80 and v(CV.PROJECTION_DIM) == 48  # intermediate_size, out_hidden_size
    assert v(CV.Attention.LAYERNORM_EPS) == pytest.approx(3e-6)
    assert v(CV.USE_SILU) is True and v(CV.USE_GELU) is None
    assert v("clip.vision.swiglu_clamp") == pytest.approx(0.25)
    assert v(CV.IMAGE_MIN_PIXELS) == 6 * AREA and v(CV.IMAGE_MAX_PIXELS) == 30 * AREA  # the processor's budget
    assert np.allclose(v(CV.IMAGE_MEAN), [0.42, 0.47, 0.52])
    t = gguf_tensors(path)
    for name in ("v.patch_embd.weight", "v.patch_embd.weight.1"):  # the Conv3d kernel, one Conv2d per frame
        assert tuple(t[name].shape) == (9, 9, 3, 64) and t[name].tensor_type == Q.F16
    assert not {"v.position_embd.weight", "v.norm_embd.weight", "mm.model.fc.bias", "mm.up.bias"} & set(t)
    assert {tuple(t[f"v.blk.1.attn_{x}_norm.weight"].shape) for x in "qk"} == {(16,)}  # per head
    assert tuple(t["v.blk.0.attn_qkv.weight"].shape) == (64, 192) and t["v.blk.0.attn_qkv.weight"].tensor_type == Q.Q8_0
    assert {"v.blk.0.attn_out.bias", "v.blk.0.ffn_up.bias", "v.blk.0.ffn_gate.bias", "v.blk.0.ffn_down.bias"} <= set(t)
    shapes = {"v.blk.0.ffn_up.weight": (64, 80), "mm.patch_merger.weight": (2, 2, 64, 48),
              "mm.model.fc.weight": (48, 48), "mm.gate.weight": (48, 96), "mm.up.weight": (48, 96),
              "mm.down.weight": (96, 48)}
    assert {n: tuple(t[n].shape) for n in shapes} == shapes
    for name in ("v.patch_embd.bias", "v.post_ln.weight", "mm.post_norm.bias", "mm.patch_merger.bias"):
        assert t[name].tensor_type == Q.F32, name


def test_transformers_defaults_are_written(folder, tmp_path):
    """A checkpoint that leaves swiglu_limit and the token budget to transformers' defaults (llama.cpp's
    converter then writes neither, and llama.cpp refuses its file) gets 10.0 and 16..8000 tokens."""
    src = config_variant(folder / "hf", tmp_path / "ckpt", vision={"swiglu_limit": None},
                preprocessor={"min_image_tokens": None, "max_image_tokens": None})
    r = gguf_file.open_gguf(mmproj.convert(converter_for(Checkpoint(src)), tmp_path / "m.gguf", "f16"))
    assert gguf_file.value(r, "clip.vision.swiglu_clamp") == 10.0
    assert gguf_file.value(r, CV.IMAGE_MIN_PIXELS) == 16 * AREA
    assert gguf_file.value(r, CV.IMAGE_MAX_PIXELS) == 8000 * AREA


@pytest.mark.parametrize("vision,preprocessor,needle", [
    ({"hidden_act": "gelu"}, None, "clamps the SwiGLU only"),
    ({"swiglu_limit": 0.0}, None, "swiglu_limit 0.0"),
    ({"spatial_merge_size": 3}, None, "2x2 patches only"),
    ({"num_heads": 32}, None, "vision head size 2"),
    ({"rope_parameters": {"rope_type": "axial", "rope_theta": 5000.0}}, None, "rope_theta 5000"),
    (None, {"patch_expand_factor": 2}, "patch_expand_factor 2"),
    (None, {"min_image_tokens": 40}, "min_image_tokens 40 is over max_image_tokens 30"),
])
def test_inexpressible_config_is_refused(vision, preprocessor, needle, folder, tmp_path):
    assert_refused(config_variant(folder / "hf", tmp_path / "ckpt", vision, preprocessor), tmp_path, needle)


def test_check_and_audit_of_the_fixture_pair(folder, converted):
    _, found = cli_check(folder / "text.gguf", converted("hf", "f16"), 48)
    assert "<|begin_of_image|>" in found["boundary-tokens"]["message"]
    assert "<|end_of_image|>" in found["boundary-tokens"]["message"]
    assert found["width"]["severity"] == "info" and found["chat-template"]["severity"] == "info"
    # GLM-5 Next keeps GLM-V's tokens
    assert_audit_finds(folder, "GLM-4V", 6, "GLM-5 Next (Glm5NextForConditionalGeneration", sources=("text.gguf",))


def test_convert_and_verify_cli(folder, tmp_path):
    cli_convert_and_verify(folder / "hf-bare", tmp_path, "bf16", text=folder / "text.gguf",
                           verify_args=("--image-size", "36x90"), projector="glm5v", tokens=10)
