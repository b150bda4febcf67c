"""EXAONE 4.5 (projector exaone4_5): every saved layout, every output type, through ``ggraft verify``.

The test image is 126 x 154 pixels (patch 7: 9 x 11 merged tokens), so the 112-pixel windows the
blocks before the full-attention one attend within are four, three of them partial; llama.cpp
takes it as it is (a multiple of 14 pixels a side, within the fixture's min/max pixels).  mtmd
tokenizes ``<vision>``/``</vision>`` around the image, so verify is given the vocabulary-only
text GGUF.

Two ways llama.cpp's runtime could depart from transformers are shown on variants of the
fixture: a window size other than 112 pixels, which the runtime ignores (named, and matched
by transformers run with 112-pixel windows), and an FFN as wide as the tower, whose up and down
projections clip.cpp swaps (compensated by the converter, which writes them swapped).
"""
from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest

from conftest import (BARS, assert_audit_finds, assert_fidelity, assert_refused, assert_same_tensors, changed_config,
                      cli_convert_and_verify, config_variant, family_fixtures, gguf_tensors, pair_codes,
                      window_attention_cosines)
from fixtures import exaone4_5
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.jobs.verify import verify
from ggraft.mmproj import writer as mmproj
from ggraft.mmproj.converter import converter_for

Q = gguf.GGMLQuantizationType
CV = gguf.Keys.ClipVision
LAYOUTS = ("hf", "hf-hub", "hf-flat")
TOKENS = 99  # 9 x 11 merged tokens
DEFECT = "clip.cpp:4957"


folder, converted = family_fixtures(lambda: exaone4_5.build(), "exaone4_5")


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fidelity(layout, outtype, folder, converted):
    report = verify(folder / layout, converted(layout, outtype), text=folder / "text.gguf")
    # 112-pixel windows: no runtime defect applies
    assert_fidelity("exaone4_5", outtype, report, tokens=TOKENS, image_size=(126, 154))


def test_keys_and_tensors(folder, converted):
    path = converted("hf", "q8_0")
    r = gguf_file.open_gguf(path, "mmproj")
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    assert v(gguf.Keys.Clip.PROJECTOR_TYPE) == "exaone4_5"
    assert v("clip.vision.attention.head_count_kv") == 2 and v(CV.Attention.HEAD_COUNT) == 4
    assert v(CV.N_WA_PATTERN) == 3 and v(CV.WINDOW_SIZE) == 112 and v(CV.SPATIAL_MERGE_SIZE) == 2
    assert (v(CV.IMAGE_MIN_PIXELS), v(CV.IMAGE_MAX_PIXELS)) == (2 * 56 * 56, 512 * 28 * 28)
    assert v(CV.PATCH_SIZE) == 7 and v(CV.BLOCK_COUNT) == 3 and v(CV.PROJECTION_DIM) == 80
    assert v(CV.FEED_FORWARD_LENGTH) == 96 and v(CV.USE_SILU) is True
    assert v(CV.Attention.LAYERNORM_EPS) == pytest.approx(1e-6)
    assert np.allclose(v(CV.IMAGE_MEAN), [0.45, 0.42, 0.39])  # from preprocessor_config.json
    t = gguf_tensors(path)
    for name in ("v.patch_embd.weight", "v.patch_embd.weight.1"):  # the Conv3d kernel, one Conv2d per frame
        assert tuple(t[name].shape) == (7, 7, 3, 64) and t[name].tensor_type == Q.F16
    assert "v.patch_embd.bias" not in t and not any(".attn_q." in n or ".attn_k." in n for n in t)
    qkv = t["v.blk.2.attn_qkv.weight"]  # q (4 heads) | k (2) | v (2), 16 wide each, fused
    assert tuple(qkv.shape) == (64, 128) and qkv.tensor_type == Q.Q8_0
    assert tuple(t["v.blk.2.attn_qkv.bias"].shape) == (128,) and t["v.blk.2.attn_qkv.bias"].tensor_type == Q.F32
    assert tuple(t["v.blk.0.ffn_up.weight"].shape) == (64, 96) and tuple(t["v.blk.0.ffn_down.weight"].shape) == (96, 64)
    assert "v.blk.0.ffn_gate.weight" in t and t["v.post_ln.weight"].tensor_type == Q.F32
    assert tuple(t["mm.0.weight"].shape) == (256, 256) and tuple(t["mm.2.weight"].shape) == (256, 80)
    f32 = gguf.GGUFReader(converted("hf", "f32"))
    ckpt = Checkpoint(folder / "hf")
    assert np.array_equal(gguf_file.tensor_values(f32, "v.blk.2.attn_qkv.weight"),
                          ckpt.load("model.visual.blocks.2.attn.qkv.weight"))


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_layouts_write_identical_files(layout, converted):
    assert_same_tensors(converted("hf", "f32"), converted(layout, "f32"))


def test_test_image_exercises_the_windows(folder):
    """transformers' own features for the test image change when every block attends fully: the
    fidelity tests compare window attention, not its absence."""
    attend_fully = lambda m: setattr(m.model.visual, "fullatt_block_indexes", [0, 1, 2])  # noqa: E731
    (cos,) = window_attention_cosines(folder / "hf", attend_fully)
    assert cos.min() < 0.99


def test_window_size_llama_cpp_ignores_is_named(tmp_path):
    """56-pixel windows: the file records them, llama.cpp's exaone4_5 runtime attends within 112-pixel
    windows anyway; verify fails the bar and names that, and the file matches transformers run with
    112-pixel windows.  check warns of it for this file only."""
    from ggraft.pair.check import check_pair

    folder = exaone4_5.build(window_size=56)
    out = mmproj.convert(converter_for(Checkpoint(folder / "hf")), tmp_path / "w56.gguf", "f32")
    assert gguf_file.value(gguf_file.open_gguf(out, "mmproj"), CV.WINDOW_SIZE) == 56
    report = verify(folder / "hf", out, text=folder / "text.gguf")
    assert not report.passed and report.result.min_cosine < 0.99
    assert report.runtime_note and DEFECT in report.runtime_note and "112" in report.runtime_note
    assert report.runtime_result.min_cosine >= BARS["f32"], report.runtime_result
    codes = {f.code: f for f in check_pair(folder / "text.gguf", out).findings}
    assert codes["runtime-defect"].severity == "warning" and DEFECT in codes["runtime-defect"].message


def test_ffn_as_wide_as_the_tower_is_written_swapped(tmp_path):
    """intermediate_size == hidden_size: clip.cpp swaps ffn_up and ffn_down back (its fix for old
    files), so the converter writes them swapped and the file passes; written as they are, it fails."""
    from ggraft.converters.exaone4_5 import Exaone45

    folder = exaone4_5.build(intermediate_size=64)
    ckpt = Checkpoint(folder / "hf")
    out = mmproj.convert(converter_for(ckpt), tmp_path / "square.gguf", "f32")
    reader = gguf.GGUFReader(out)
    assert np.array_equal(gguf_file.tensor_values(reader, "v.blk.0.ffn_up.weight"),
                          ckpt.load("model.visual.blocks.0.mlp.down_proj.weight"))
    report = verify(folder / "hf", out, text=folder / "text.gguf")
    assert report.passed, report.result

    class AsTheyAre(Exaone45):
        ffn_swapped = False

    plain = mmproj.convert(AsTheyAre(ckpt), tmp_path / "plain.gguf", "f32")
    assert verify(folder / "hf", plain, text=folder / "text.gguf").result.min_cosine < 0.9


def test_transformers_5_processor_size_gives_the_pixel_limits(folder, tmp_path):
    """transformers 5 saves a Qwen2-VL-style image processor with ``size`` = {shortest_edge: min pixels,
    longest_edge: max pixels} and ``min_pixels``/``max_pixels`` null."""
    src = tmp_path / "ckpt"
    shutil.copytree(folder / "hf", src)
    pre = json.loads((src / "preprocessor_config.json").read_text())
    pre.update(min_pixels=None, max_pixels=None, size={"shortest_edge": 6272, "longest_edge": 401408})
    (src / "preprocessor_config.json").write_text(json.dumps(pre))
    extra = converter_for(Checkpoint(src)).params().extra
    assert (extra[CV.IMAGE_MIN_PIXELS], extra[CV.IMAGE_MAX_PIXELS]) == (6272, 401408)


@pytest.mark.parametrize("changes,needle", [
    ({"fullatt_block_indexes": [0]}, "fullatt_block_indexes [0] is not periodic"),
    ({"rope_parameters": {"rope_type": "axial", "rope_theta": 20000.0}}, "rope_theta 20000.0"),
    ({"num_key_value_heads": 3}, "num_key_value_heads 3 does not divide num_heads 4"),
    ({"spatial_merge_size": 3}, "merges 2x2 patches only"),
])
def test_inexpressible_config_is_refused(changes, needle, folder):
    from ggraft.converters.exaone4_5 import Exaone45

    assert needle in Exaone45.refuses(changed_config(folder / "hf", changes))


def test_refusal_is_one_line(folder, tmp_path):
    src = config_variant(folder / "hf", tmp_path / "ckpt", vision={"fullatt_block_indexes": [0, 1]})
    assert_refused(src, tmp_path, "Exaone4_5_ForConditionalGeneration", "fullatt_block_indexes [0, 1] is not periodic")


def test_check_finds_boundary_tokens(folder, converted):
    codes = pair_codes(folder / "text.gguf", converted("hf", "f16"))
    assert "<vision>" in codes["boundary-tokens"].message and "</vision>" in codes["boundary-tokens"].message
    assert codes["width"].severity == "info" and codes["chat-template"].severity == "info"
    assert "runtime-defect" not in codes  # 112-pixel windows: what the runtime uses


def test_audit_finds_exaone_tokens(folder):
    assert_audit_finds(folder, "EXAONE 4.5", 4, "Exaone4_5_ForConditionalGeneration", library=True)


def test_convert_and_verify_cli(folder, tmp_path):
    cli_convert_and_verify(folder / "hf-hub", tmp_path, "bf16", text=folder / "text.gguf", projector="exaone4_5")
