"""Qwen2-VL, Qwen2.5-VL (projectors qwen2vl_merger / qwen2.5vl_merger) and LFM2-VL (lfm2).

Every saved layout is converted once per output type and run in llama.cpp through
``ggraft.verify`` against transformers' ``get_image_features`` on the same pixels, at sizes
llama.cpp takes without resizing (sides multiple of patch x 2, at least 8 tokens for Qwen and
64 for LFM2).  These projectors make mtmd tokenize text around the image, so verify is given
each fixture's vocabulary-only GGUF.

Qwen2.5-VL attends within 112-pixel windows except in its full-attention blocks: it is
compared on a one-window image and on a four-window image with partial windows.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from conftest import (BARS, assert_fidelity, assert_refused, assert_same_tensors, cli_convert_and_verify,
                      config_variant, families_fixtures, gguf_tensors, window_attention_cosines)
from fixtures import lfm2vl, qwen2vl
from ggraft.gguf_io import gguf_file
from ggraft.mmproj import writer as mmproj
from ggraft.hf.checkpoint import Checkpoint
from ggraft.mmproj.converter import converter_for
from ggraft.jobs.verify import verify

Q = gguf.GGMLQuantizationType
LAYOUTS = [("qwen2vl", "hf"), ("qwen2vl", "hf-modules"), ("qwen2vl", "hf-bare"), ("qwen25vl", "hf"), ("qwen25vl", "hf-modules"),
           ("lfm2vl", "hf"), ("lfm2vl", "hf-hub")]
ONE_WINDOW, FOUR_WINDOWS = (112, 112), (168, 224)  # Qwen2.5-VL, patch 14: 4x4 / 6x8 merged tokens
#: (height, width) -> tokens, per family; LFM2-VL also on grids its 16x16 positions are resized to
IMAGES = {"qwen2vl": {(112, 84): 12},
          "qwen25vl": {ONE_WINDOW: 16, FOUR_WINDOWS: 48},
          "lfm2vl": {(256, 256): 64, (384, 192): 72}}


fixture_dirs, converted = families_fixtures(
    {"qwen2vl": qwen2vl.build_qwen2, "qwen25vl": qwen2vl.build_qwen25, "lfm2vl": lfm2vl.build}, "qwen-lfm2")


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("family,layout", LAYOUTS)
def test_fidelity(family, layout, outtype, fixture_dirs, converted):
    out = converted(family, layout, outtype)
    for size, tokens in IMAGES[family].items():
        report = verify(fixture_dirs[family] / layout, out, text=fixture_dirs[family] / "vocab.gguf", image_size=size)
        assert_fidelity(family, outtype, report, tokens=tokens, context=size)


@pytest.mark.parametrize("family,other", [("qwen2vl", "hf-modules"), ("qwen2vl", "hf-bare"), ("qwen25vl", "hf-modules"),
                                          ("lfm2vl", "hf-hub")])
def test_layouts_give_the_same_file(family, other, converted):
    assert_same_tensors(converted(family, "hf", "f32"), converted(family, other, "f32"))


def test_qwen_tensors_and_keys(converted):
    for family, projector in (("qwen2vl", "qwen2vl_merger"), ("qwen25vl", "qwen2.5vl_merger")):
        path = converted(family, "hf", "q8_0")
        reader = gguf_file.open_gguf(path, "mmproj")
        assert gguf_file.value(reader, gguf.Keys.Clip.PROJECTOR_TYPE) == projector
        assert gguf_file.value(reader, gguf.Keys.ClipVision.SPATIAL_MERGE_SIZE) == 2
        t = gguf_tensors(path)
        # the Conv3d kernel (64, 3, 2, 14, 14) as one Conv2d per frame, at most f16
        for name in ("v.patch_embd.weight", "v.patch_embd.weight.1"):
            assert tuple(t[name].shape) == (14, 14, 3, 64) and t[name].tensor_type == Q.F16
        assert "v.blk.0.attn_q.weight" in t and not any("attn_qkv" in n for n in t)
        assert t["mm.0.weight"].tensor_type == Q.Q8_0 and t["v.post_ln.weight"].tensor_type == Q.F32
    reader = gguf_file.open_gguf(converted("qwen25vl", "hf", "f32"), "mmproj")
    assert gguf_file.value(reader, gguf.Keys.ClipVision.N_WA_PATTERN) == 2  # full attention in blocks 1 and 3
    assert gguf_file.value(reader, gguf.Keys.ClipVision.WINDOW_SIZE) == 112
    assert gguf_file.value(reader, gguf.Keys.ClipVision.USE_SILU) is True
    assert gguf_file.value(reader, gguf.Keys.ClipVision.Attention.LAYERNORM_EPS) == pytest.approx(1e-6)


def test_lfm2_tensors_and_keys(converted):
    path = converted("lfm2vl", "hf", "q8_0")
    reader = gguf_file.open_gguf(path, "mmproj")
    assert gguf_file.value(reader, gguf.Keys.Clip.PROJECTOR_TYPE) == "lfm2"
    assert gguf_file.value(reader, gguf.Keys.ClipVision.Projector.SCALE_FACTOR) == 2
    assert gguf_file.value(reader, gguf.Keys.ClipVision.IMAGE_SIZE) == 256  # the 16x16 position grid
    t = gguf_tensors(path)
    assert tuple(t["v.patch_embd.weight"].shape) == (16, 16, 3, 64) and t["v.patch_embd.weight"].tensor_type == Q.F16
    assert t["v.position_embd.weight"].tensor_type == Q.F32
    assert {"mm.input_norm.weight", "mm.1.weight", "mm.2.weight", "v.post_ln.weight"} <= set(t)
    assert not any(".head." in n for n in t)


def test_multi_window_image_exercises_the_windows(fixture_dirs):
    """transformers' own output on the four-window image changes when every block attends fully,
    and does not on the one-window image: the two images test window attention and its absence."""
    def attend_fully(model):
        model.model.visual.fullatt_block_indexes = list(range(len(model.model.visual.blocks)))

    one, four = window_attention_cosines(fixture_dirs["qwen25vl"] / "hf", attend_fully, [ONE_WINDOW, FOUR_WINDOWS])
    assert one.min() > 0.999999
    assert four.min() < 0.99


@pytest.mark.parametrize("depth,full,pattern", [
    (32, [7, 15, 23, 31], 8),  # the released Qwen2.5-VL
    (12, [7, 15, 23, 31], 8),  # indexes past the last block do nothing in transformers either
    (4, [], 5),                # no full-attention block: a period longer than the tower
    (4, [0, 1, 2, 3], 1),
    (4, [1], None),            # llama.cpp's converter writes 2 here, making block 3 full too
    (32, [7, 15], None),       # ... and 8 here, making blocks 23 and 31 full too
])
def test_full_attention_blocks_as_n_wa_pattern(depth, full, pattern):
    from ggraft.converters.qwen2vl import Qwen25VL

    assert Qwen25VL.wa_pattern({"depth": depth, "fullatt_block_indexes": full}) == pattern


def test_window_size_llama_cpp_ignores_is_named(tmp_path):
    """A checkpoint with 56-pixel windows: the file records window_size 56, but llama.cpp's qwen2.5vl
    runtime always uses 112-pixel windows; verify fails the bar and names that, and the file matches
    transformers run with 112-pixel windows."""
    folder = qwen2vl.build_qwen25(window_size=56)
    out = mmproj.convert(converter_for(Checkpoint(folder / "hf")), tmp_path / "w56.gguf", "f32")
    assert gguf_file.value(gguf_file.open_gguf(out, "mmproj"), gguf.Keys.ClipVision.WINDOW_SIZE) == 56
    report = verify(folder / "hf", out, text=folder / "vocab.gguf", image_size=FOUR_WINDOWS)
    assert not report.passed and report.result.min_cosine < 0.999
    assert report.runtime_note and "112" in report.runtime_note
    assert report.runtime_result.min_cosine >= BARS["f32"], report.runtime_result


@pytest.mark.parametrize("family,changes,needle", [
    ("qwen25vl", {"fullatt_block_indexes": [1]}, "fullatt_block_indexes [1] is not periodic"),
    ("qwen2vl", {"temporal_patch_size": 3}, "temporal_patch_size"),
    ("lfm2vl", {"hidden_act": "relu"}, "'relu'"),
])
def test_inexpressible_config_is_refused(family, changes, needle, fixture_dirs, tmp_path):
    assert_refused(config_variant(fixture_dirs[family] / "hf", tmp_path / "ckpt", vision=changes), tmp_path, needle)


def test_unmappable_tensor_is_named(fixture_dirs, tmp_path):
    src = config_variant(fixture_dirs["qwen25vl"] / "hf", tmp_path / "ckpt",
                         extra={"visual.blocks.0.attn.rel_pos.weight": np.zeros((4, 4), np.float32)})
    assert_refused(src, tmp_path, "visual.blocks.0.attn.rel_pos.weight")


def test_convert_and_verify_cli(fixture_dirs, tmp_path):
    folder = fixture_dirs["qwen25vl"]
    cli_convert_and_verify(folder / "hf-modules", tmp_path, "q8_0", text=folder / "vocab.gguf",
                           projector="qwen2.5vl_merger", image_size=FOUR_WINDOWS)
