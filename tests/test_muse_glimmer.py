"""Muse Glimmer (projector muse-glimmer): every saved layout, every output type, through ``ggraft verify``.

The test image is 42 x 70 pixels (patch 7: a 6 x 10 patch grid, 3 x 5 merged tokens): larger than
the fixture's 4 x 4 position table both ways and not square, so the window blocks attend within six
windows of 4 x 4 patches, four of them partial.  llama.cpp's preprocessor leaves it as it is (whole
merged units, under its 4096-token cap); mtmd tokenizes ``<|image_start|>``/``<|image_end|>`` around
it, so verify is given the vocabulary-only text GGUF.  The whole image is compared (no tiling).

llama.cpp's runtime resamples the position table to that grid unlike transformers (named defect,
tools/mtmd/clip.cpp:312-333): the file matches transformers run with llama.cpp's position rows, and
matches transformers strictly on a square grid no larger than the table (28 x 28 pixels here; 448 x 448
for the released model).  On a larger square grid only the table's edges differ (42 x 42).
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from conftest import (BARS, assert_audit_finds, assert_fidelity, assert_refused, assert_same_tensors, changed_config,
                      cli_convert_and_verify, config_variant, family_fixtures, gguf_tensors, window_attention_cosines)
from fixtures import muse_glimmer
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.jobs.verify import verify

Q = gguf.GGMLQuantizationType
CV = gguf.Keys.ClipVision
LAYOUTS = muse_glimmer.LAYOUTS
TOKENS = 15  # 3 x 5 merged tokens
DEFECT = "clip.cpp:312-333"
TOWER = "model.vision_tower."

folder, converted = family_fixtures(lambda: muse_glimmer.build(), "muse_glimmer")


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fidelity(layout, outtype, folder, converted):
    report = verify(folder / layout, converted(layout, outtype), text=folder / "text.gguf")
    assert_fidelity("muse_glimmer", outtype, report, tokens=TOKENS, image_size=(42, 70), defect=DEFECT,
                    context=layout)


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_square_image_within_the_table_passes_strictly(outtype, folder, converted):
    """A 4 x 4 patch grid is the table itself: llama.cpp and transformers read the same position rows."""
    report = verify(folder / "hf", converted("hf", outtype), text=folder / "text.gguf", image_size=(28, 28))
    assert report.passed and report.result.tokens == 4 and report.runtime_note is None, report.result


def test_larger_square_image_differs_at_the_table_edges(folder, converted):
    """A 6 x 6 patch grid: transformers pads beyond the table's edges with zeros, llama.cpp clamps."""
    report = verify(folder / "hf", converted("hf", "f32"), text=folder / "text.gguf", image_size=(42, 42))
    assert not report.passed and 0.9 < report.result.min_cosine < 0.999, report.result
    assert DEFECT in report.runtime_note and report.runtime_result.min_cosine >= BARS["f32"]


def test_keys_and_tensors(folder, converted):
    path = converted("hf", "q8_0")
    r = gguf_file.open_gguf(path, "mmproj")
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    assert v(gguf.Keys.Clip.PROJECTOR_TYPE) == "muse-glimmer"
    assert v(CV.SPATIAL_MERGE_SIZE) == 2 and v(CV.PATCH_SIZE) == 7 and v(CV.IMAGE_SIZE) == 28
    assert v(CV.BLOCK_COUNT) == 5 and v(CV.Attention.HEAD_COUNT) == 2 and v(CV.EMBEDDING_LENGTH) == 64
    assert v(CV.FEED_FORWARD_LENGTH) == 96 and v(CV.PROJECTION_DIM) == 80
    assert v(CV.Attention.LAYERNORM_EPS) == pytest.approx(1e-5)
    assert np.allclose(v(CV.IMAGE_MEAN), muse_glimmer.MEAN) and np.allclose(v(CV.IMAGE_STD), muse_glimmer.STD)
    t = gguf_tensors(path)
    assert tuple(t["v.patch_embd.weight"].shape) == (7, 7, 3, 64) and t["v.patch_embd.weight"].tensor_type == Q.F16
    assert "v.patch_embd.bias" not in t and "v.class_embd" not in t
    assert tuple(t["v.position_embd.weight"].shape) == (64, 16) and t["v.position_embd.weight"].tensor_type == Q.F32
    assert t["v.pre_ln.weight"].tensor_type == Q.F32 and "v.post_ln.bias" in t
    assert tuple(t["v.blk.4.ffn_up.weight"].shape) == (64, 96) and tuple(t["v.blk.4.ffn_down.weight"].shape) == (96, 64)
    assert t["v.blk.0.attn_q.weight"].tensor_type == Q.Q8_0 and t["mm.1.weight"].tensor_type == Q.Q8_0
    assert "v.blk.0.attn_out.bias" in t and "v.blk.0.ln2.weight" in t
    shapes = {n: tuple(t[n].shape) for n in ("mm.0.weight", "mm.1.weight", "mm.2.weight")}
    assert shapes == {"mm.0.weight": (256, 96), "mm.1.weight": (96, 96), "mm.2.weight": (96, 80)}
    assert not any(n.startswith("mm.") and n.endswith(".bias") for n in t)
    # f32 values: the two frames' kernels summed; q/k rows interleaved per head, width axis first
    f32, ckpt = gguf.GGUFReader(converted("hf", "f32")), Checkpoint(folder / "hf")
    patch = ckpt.load(TOWER + "patch_embedder.patch_embedding.weight").reshape(64, 2, 3, 7, 7).sum(1)
    assert np.allclose(gguf_file.tensor_values(f32, "v.patch_embd.weight"), patch)
    q = ckpt.load(TOWER + "layers.3.attn.q_proj.weight").reshape(2, 32, 64)
    assert np.array_equal(gguf_file.tensor_values(f32, "v.blk.3.attn_q.weight").reshape(2, 32, 64)[:, :4],
                          q[:, [0, 16, 1, 17]])


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_layouts_write_identical_files(layout, converted):
    assert_same_tensors(converted("hf", "f32"), converted(layout, "f32"))


def test_test_image_exercises_the_windows(folder):
    """transformers' own features for the test image change when every block attends fully: the
    fidelity tests compare window attention, not its absence."""
    attend_fully = lambda m: setattr(m.model.vision_tower.config, "layer_types", ["full_attention"] * 5)  # noqa: E731
    (cos,) = window_attention_cosines(folder / "hf", attend_fully)
    assert cos.min() < 0.99


@pytest.mark.parametrize("changes,needle", [
    ({"pos_emb_width": 5}, "a 4x5 position table"),
    ({"merge_size": 3}, "merge_size 3"),
    ({"hidden_act": "gelu_pytorch_tanh"}, "vision activation 'gelu_pytorch_tanh'"),
    ({"rope_parameters": {"rope_type": "axial", "rope_theta": 20000.0}}, "base 10000"),
    ({"layer_norm_eps": 1e-6}, "layer_norm_eps 1e-06"),
    ({"hidden_size": 60}, "multiple of 4"),
    ({"layer_types": ["full_attention"] * 5}, "every 4th block and the last"),
])
def test_inexpressible_config_is_refused(changes, needle, folder):
    from ggraft.converters.muse_glimmer import MuseGlimmer

    config = changed_config(folder / "hf", changes)
    assert needle in MuseGlimmer.refuses(config)
    assert "exact GELU" in MuseGlimmer.refuses({**config, "vision_config": {}, "projector_hidden_act": "silu"})


def test_refusal_is_one_line(folder, tmp_path):
    src = config_variant(folder / "hf", tmp_path / "ckpt", vision={"layer_types": ["window_attention"] * 5})
    assert_refused(src, tmp_path, "MuseGlimmerForConditionalGeneration", "every 4th block and the last")


def test_check_finds_boundary_tokens_and_warns_of_the_defects(folder, converted):
    from ggraft.pair.check import check_pair

    report = check_pair(folder / "text.gguf", converted("hf", "f16"))
    assert report.ok, report.findings
    codes: dict[str, list] = {}
    for f in report.findings:
        codes.setdefault(f.code, []).append(f)
    boundary = " ".join(f.message for f in codes["boundary-tokens"])
    assert "<|image_start|>" in boundary and "<|image_end|>" in boundary
    assert codes["width"][0].severity == "info" and codes["chat-template"][0].severity == "info"
    defects = " ".join(f.message for f in codes["runtime-defect"])
    assert DEFECT in defects and "mtmd-image.cpp:1781" in defects


def test_audit_finds_muse_glimmer_tokens(folder):
    assert_audit_finds(folder, "Muse Glimmer", 7, "MuseGlimmerForConditionalGeneration", library=True)


def test_convert_and_verify_cli(folder, tmp_path):
    cli_convert_and_verify(folder / "hf-hub", tmp_path, "bf16", text=folder / "text.gguf",
                           verify_args=("--image-size", "28x28"), projector="muse-glimmer", image_size=(28, 28))
