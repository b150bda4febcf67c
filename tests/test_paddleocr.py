"""PaddleOCR-VL (projector paddleocr): every saved layout, every output type, through ``ggraft verify``.

Each file is compared on two images (neither resized by either side): one whose patch grid is the
position table's (8x8, the stored rows are used as they are) and one with fewer patches than the
table on both sides (6x4); one with more (12x10) is compared too.  llama.cpp (llama-cpp-python
0.3.36) resamples the table with antialiased bilinear interpolation (tools/mtmd/models/paddleocr.cpp:20,
clip-graph.h:12) where transformers uses plain bilinear; the two agree when enlarging, not when
shrinking.  So the table's size and the larger image must pass strictly, and the smaller one either
passes (a fixed llama.cpp) or verify names the defect and the file matches transformers run with the
antialiased table at the same bar.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from conftest import (BARS, assert_audit_finds, assert_fidelity, assert_refused, assert_same_tensors,
                      cli_convert_and_verify, config_variant, family_fixtures, gguf_tensors, pair_codes)
from fixtures import paddleocr
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.jobs.verify import verify

Q = gguf.GGMLQuantizationType
CV = gguf.Keys.ClipVision
LAYOUTS = ("hf", "hf-hub", "hf-modules")
DEFECT = "paddleocr.cpp:20"
#: (height, width) -> (image tokens, whether every side has at least the table's 8 patches of 7 pixels)
IMAGES = {(56, 56): (16, True), (42, 28): (6, False)}
LARGER = (84, 70)  # 12x10 patches: the table is enlarged, which both sides do alike


folder, converted = family_fixtures(lambda: paddleocr.build(), "paddleocr")


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fidelity(layout, outtype, folder, converted):
    for size, (tokens, at_least_table) in IMAGES.items():
        report = verify(folder / layout, converted(layout, outtype), text=folder / "text.gguf", image_size=size)
        assert_fidelity("PaddleOCR-VL", outtype, report, tokens=tokens, defect=None if at_least_table else DEFECT,
                        context=size)


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_a_larger_grid_passes_strictly(outtype, folder, converted):
    report = verify(folder / "hf", converted("hf", outtype), text=folder / "text.gguf", image_size=LARGER)
    assert report.passed and report.result.tokens == 30, report.result


def test_the_defect_is_the_antialiased_table(folder, converted):
    """On the smaller image the f32 file matches transformers run with the antialiased table to
    f32 precision, and plain transformers only to about 1e-3: the interpolation is the whole story."""
    report = verify(folder / "hf", converted("hf", "f32"), text=folder / "text.gguf", image_size=(42, 28))
    if report.passed:
        pytest.skip("this llama.cpp resamples the table as transformers does")
    assert report.runtime_result.min_cosine > 0.99999 > report.result.min_cosine


def test_keys_and_tensors(folder, converted):
    path = converted("hf", "q8_0")
    r = gguf.GGUFReader(path)
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    assert v(gguf.Keys.Clip.PROJECTOR_TYPE) == "paddleocr"
    assert v(CV.IMAGE_SIZE) == 56 and v(CV.PATCH_SIZE) == 7  # the 8x8 position table in pixels
    assert v(CV.IMAGE_MIN_PIXELS) == 28 * 28 and v(CV.IMAGE_MAX_PIXELS) == 84 * 84
    assert v(CV.BLOCK_COUNT) == 2 and v(CV.Attention.HEAD_COUNT) == 2 and v(CV.FEED_FORWARD_LENGTH) == 96
    assert v(CV.EMBEDDING_LENGTH) == 64 and v(CV.PROJECTION_DIM) == 80
    assert v(CV.Attention.LAYERNORM_EPS) == pytest.approx(1e-5) and v(CV.USE_GELU) is True
    assert np.allclose(v(CV.IMAGE_MEAN), 0.5) and np.allclose(v(CV.IMAGE_STD), 0.5)  # from preprocessor_config.json
    t = gguf_tensors(path)
    assert {"v.patch_embd.bias", "v.post_ln.weight", "v.blk.1.ln2.bias", "mm.input_norm.bias", "mm.2.bias"} <= set(t)
    assert not any(name.startswith("v.pre_ln") for name in t)
    assert t["v.position_embd.weight"].tensor_type == Q.F32 and tuple(t["v.position_embd.weight"].shape) == (64, 64)
    assert t["v.patch_embd.weight"].tensor_type == Q.F16 and tuple(t["v.patch_embd.weight"].shape) == (7, 7, 3, 64)
    assert tuple(t["mm.input_norm.weight"].shape) == (64,)
    for name, shape in (("mm.1.weight", (256, 256)), ("mm.2.weight", (256, 80))):
        assert t[name].tensor_type == Q.Q8_0 and tuple(t[name].shape) == shape, name
    f32 = gguf.GGUFReader(converted("hf", "f32"))
    ckpt = Checkpoint(folder / "hf")
    assert np.array_equal(gguf_file.tensor_values(f32, "mm.2.weight"), ckpt.load("mlp_AR.linear_2.weight"))


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_layouts_write_identical_files(layout, folder, converted):
    """Including the hub's tensors nobody runs (packing positions, the pooling head): left out."""
    assert Checkpoint(folder / "hf-hub").has("visual.vision_model.embeddings.packing_position_embedding.weight")
    assert_same_tensors(converted("hf", "f32"), converted(layout, "f32"))


@pytest.mark.parametrize("changes,needle", [
    ({"spatial_merge_size": 3}, "spatial_merge_size 3"),
    ({"rope_parameters": {"rope_type": "axial", "rope_theta": 20000.0}}, "rope_theta 20000.0"),
    ({"hidden_act": "silu"}, "vision activation 'silu'"),
    ({"num_attention_heads": 32}, "head size 2"),
])
def test_inexpressible_config_is_refused(changes, needle, folder, tmp_path):
    assert_refused(config_variant(folder / "hf", tmp_path / "ckpt", vision=changes), tmp_path, needle)


def test_unmappable_tensor_is_named(folder, tmp_path):
    extra = {"mlp_AR.linear_3.weight": np.zeros((80, 80), np.float32)}  # transformers' projector has two
    assert_refused(config_variant(folder / "hf", tmp_path / "ckpt", extra=extra), tmp_path, "mlp_AR.linear_3.weight")


def test_check_finds_boundary_tokens_and_warns_of_the_defect(folder, converted):
    codes = pair_codes(folder / "text.gguf", converted("hf-hub", "f16"))
    assert "<|IMAGE_START|>" in codes["boundary-tokens"].message and "<|IMAGE_END|>" in codes["boundary-tokens"].message
    assert codes["width"].severity == "info" and codes["text-architecture"].severity == "info"
    assert codes["runtime-defect"].severity == "warning" and DEFECT in codes["runtime-defect"].message


def test_audit_finds_paddleocr_tokens(folder):
    assert_audit_finds(folder, "PaddleOCR-VL", 3, "PaddleOCRVLForConditionalGeneration")


def test_convert_and_verify_cli(folder, tmp_path):
    cli_convert_and_verify(folder / "hf-hub", tmp_path, "bf16", text=folder / "text.gguf", projector="paddleocr",
                           image_size=(56, 56), tokens=16)
