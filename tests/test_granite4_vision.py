"""Granite 4 Vision (projector granite4_vision): every saved layout, every output type, through ``ggraft verify``.

llama.cpp always encodes the overview and the tiles of the best pinpoint (mtmd-image.cpp
``mtmd_image_preprocessor_granite``), deterministically: the comparisons cover the whole image,
overview, tiles and the ``image_newline`` rows, at 84x84 (one tile) and at 168x168 (2x2 tiles,
the overview resized with Pillow's bicubic filter on both sides).  Every image token carries four
projector slices (two deepstack, two spatial), compared as one embedding.

Two edits of the ggraft core are needed to run this family (tools/tasks/granite4_vision.shared.md):
``v.proj_blk.N.query``/``.img_pos`` must stay f32 (ggml's CPU add aborts on an f16 operand), and
the projected width is ``projection_dim`` times the projectors (clip.cpp ``clip_n_mmproj_embd``).
Until the core has them, the tests that would hand llama.cpp such a file xfail, naming the edit.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from conftest import (BARS, assert_audit_finds, assert_fidelity, assert_refused, assert_same_tensors,
                      cli_convert_and_verify, config_variant, family_fixtures, gguf_tensors, pair_codes)
from fixtures import granite4_vision
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.jobs.verify import verify
from ggraft.mmproj import writer as mmproj

Q = gguf.GGMLQuantizationType
LAYOUTS = ("hf", "hf-hub")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
TEXT_WIDTH, PROJECTORS = 80, 4
TOKENS = 36 + 6 * (6 + 1)  # overview 6x6, one tile of 6x6 with a newline per row


folder, converted = family_fixtures(lambda: granite4_vision.build(), "granite4_vision")


def core_gaps(folder, path) -> list[str]:
    """The core edits (granite4_vision.shared.md) the installed ggraft lacks for this file."""
    from ggraft.pair.check import check_pair

    gaps = []
    if gguf_tensors(path)["v.proj_blk.0.query"].tensor_type != Q.F32:
        gaps.append("writer: keep v.proj_blk.N.query/.img_pos f32 (ggml's add aborts on an f16 operand)")
    if check_pair(folder / "text.gguf", path).mmproj.get("projection_width") != PROJECTORS * TEXT_WIDTH:
        gaps.append("headers.projection_width: projection_dim x len(clip.vision.feature_layer)")
    return gaps


def needs_core(folder, path) -> None:
    if gaps := core_gaps(folder, path):
        pytest.xfail("needs the core edits of tools/tasks/granite4_vision.shared.md: " + "; ".join(gaps))


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fidelity(layout, outtype, folder, converted):
    path = converted(layout, outtype)
    needs_core(folder, path)
    report = verify(folder / layout, path, text=folder / "text.gguf")
    assert_fidelity("granite4_vision", outtype, report, tokens=TOKENS, image_size=(84, 84))
    assert report.runtime_note is None, report


def test_whole_tiled_image(folder, converted):
    """A 168x168 image: the overview (resized) and a 2x2 grid of tiles, each row ended by a newline."""
    path = converted("hf", "f16")
    needs_core(folder, path)
    report = verify(folder / "hf", path, text=folder / "text.gguf", image_size=(168, 168))
    assert report.result is not None, report.problem
    assert report.result.tokens == 36 + 12 * (12 + 1) and report.passed, report


def test_hidden_state_index_is_not_a_block_index(folder, converted, tmp_path):
    """transformers' hidden state k is block k-1's output: llama.cpp's converter writes a
    non-negative deepstack index as is (conversion/granite.py 677-680), which reads the next block."""
    from ggraft.converters.granite4_vision import FEATURE_LAYER, Granite4Vision

    needs_core(folder, converted("hf", "f32"))

    class AsLlamaCpp(Granite4Vision):
        def params(self):
            p = super().params()
            p.extra = {**p.extra, FEATURE_LAYER: [2, 1, 1, 1]}  # hidden state 1 written as 1, not block 0
            return p

    out = mmproj.convert(AsLlamaCpp(Checkpoint(folder / "hf")), tmp_path / "as-llama-cpp.gguf", "f32")
    report = verify(folder / "hf", out, text=folder / "text.gguf")
    assert not report.passed and report.result.min_cosine < 0.99, report


def test_keys_and_tensors(folder, converted):
    path = converted("hf", "q8_0")
    r = gguf.GGUFReader(path)
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    assert v(gguf.Keys.Clip.PROJECTOR_TYPE) == "granite4_vision"
    assert v(gguf.Keys.ClipVision.IMAGE_SIZE) == 84 and v(gguf.Keys.ClipVision.PATCH_SIZE) == 7
    assert v(gguf.Keys.ClipVision.BLOCK_COUNT) == 3 and v(gguf.Keys.ClipVision.Attention.HEAD_COUNT) == 2
    assert v(gguf.Keys.ClipVision.PROJECTION_DIM) == TEXT_WIDTH and v(gguf.Keys.ClipVision.USE_GELU) is True
    assert np.allclose(v(gguf.Keys.ClipVision.IMAGE_MEAN), CLIP_MEAN)  # from preprocessor_config.json
    # by LLM layer 0..3: deepstack hidden state -1 (block 2), spatial TL and TR from hidden state -2
    # (block 1), deepstack hidden state 1 (block 0)
    assert list(v("clip.vision.feature_layer")) == [2, 1, 0, 1]
    assert list(v("clip.vision.projector.spatial_offsets")) == [-1, 0, -1, 1]
    assert v("clip.vision.projector.query_side") == 2 and v("clip.vision.projector.window_side") == 4
    assert list(v("clip.vision.image_grid_pinpoints")) == [84, 84, 168, 84, 84, 168, 168, 168]  # (w, h)
    t = gguf_tensors(path)
    assert not any(n.startswith(("v.post_ln", "v.proj_blk.4.")) for n in t)  # unused: post-norm, spatial 2 and 3
    assert tuple(t["v.image_newline"].shape) == (TEXT_WIDTH,) and t["v.image_newline"].tensor_type == Q.F32
    assert t["v.patch_embd.weight"].tensor_type == Q.F16 and tuple(t["v.patch_embd.weight"].shape) == (7, 7, 3, 128)
    assert tuple(t["v.position_embd.weight"].shape) == (128, 144)
    for b in range(PROJECTORS):
        assert tuple(t[f"v.proj_blk.{b}.query"].shape) == (128, 4)
        assert tuple(t[f"v.proj_blk.{b}.img_pos"].shape) == (128, 16)
        for name, shape in (("linear", (128, TEXT_WIDTH)), ("ffn_up", (128, 160)), ("ffn_down", (160, 128)),
                            ("cross_attn_k", (128, 128)), ("self_attn_out", (128, 128))):
            w = t[f"v.proj_blk.{b}.{name}.weight"]
            assert w.tensor_type == Q.Q8_0 and tuple(w.shape) == shape, name
    f32 = gguf.GGUFReader(converted("hf", "f32"))
    ckpt = Checkpoint(folder / "hf")
    assert np.array_equal(gguf_file.tensor_values(f32, "v.proj_blk.1.ffn_norm.weight"),
                          ckpt.load("model.spatial_projectors.0.qformer.encoder.layer.0.output_query.LayerNorm.weight"))
    assert np.array_equal(gguf_file.tensor_values(f32, "v.proj_blk.2.post_norm.bias"),
                          ckpt.load("model.layerwise_projectors.1.qformer.layernorm.bias"))


def test_layouts_write_identical_files(converted):
    assert_same_tensors(converted("hf", "f32"), converted("hf-hub", "f32"), ordered=True)


@pytest.mark.parametrize("changes,needle", [
    ({"downsample_rate": "3/4"}, "downsample_rate '3/4'"),
    ({"deepstack_layer_map": [[-1, 1], [1, 2]]}, "target LLM layers [1, 1, 2, 3]"),
    ({"qformer_config.num_hidden_layers": 2}, "a Q-Former of 2 layers"),
])
def test_inexpressible_config_is_refused(changes, needle, folder, tmp_path):
    assert_refused(config_variant(folder / "hf", tmp_path / "ckpt", **changes), tmp_path, needle)


def test_check_finds_the_newline_boundary(folder, converted):
    path = converted("hf", "f16")
    codes = pair_codes(folder / "text.gguf", path)
    assert "'\\n'" in codes["boundary-tokens"].message and codes["boundary-tokens"].severity == "info"
    assert codes["width"].severity == "info" and "runtime-defect" not in codes
    needs_core(folder, path)
    assert str(PROJECTORS * TEXT_WIDTH) in codes["width"].message  # the text model reads 3 DeepStack slices


def test_audit_finds_the_image_token(folder):
    assert_audit_finds(folder, "LLaVA", 1, "Granite4VisionForConditionalGeneration")


def test_convert_and_verify_cli(folder, tmp_path):
    cli_convert_and_verify(folder / "hf-hub", tmp_path, "bf16", text=folder / "text.gguf", projector="granite4_vision",
                           tokens=TOKENS, before_verify=lambda out: needs_core(folder, out))
