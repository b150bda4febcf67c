"""MiniMax-M3 (projector minimax_m3): every saved layout, every output type, through ``ggraft verify``.

The test image is 42x56 pixels at patch 7: 6x8 patches, 12 tokens of 2x2, within llama.cpp's
8..576 token budget and aligned to 14 pixels, so neither side resizes; the whole image is compared.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from conftest import (BARS, assert_audit_finds, assert_fidelity, assert_refused, assert_same_tensors,
                      cli_convert_and_verify, config_variant, family_fixtures, gguf_tensors, pair_codes)
from fixtures import minimax_m3
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.jobs.verify import verify
from ggraft.mmproj import writer as mmproj

Q = gguf.GGMLQuantizationType
LAYOUTS = ("hf", "hf-hub", "hf-modules")
BOI, EOI = "]<]start of image[>[", "]<]end of image[>["


folder, converted = family_fixtures(lambda: minimax_m3.build(), "minimax_m3")


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fidelity(layout, outtype, folder, converted):
    report = verify(folder / layout, converted(layout, outtype), text=folder / "text.gguf")
    assert_fidelity("minimax_m3", outtype, report, tokens=12, context=report)  # 6x8 patches of 7 pixels, merged 2x2
    assert report.runtime_note is None


def test_keys_and_tensors(folder, converted):
    path = converted("hf", "q8_0")
    r = gguf.GGUFReader(path)
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    assert v(gguf.Keys.Clip.PROJECTOR_TYPE) == "minimax_m3"
    assert v(gguf.Keys.ClipVision.SPATIAL_MERGE_SIZE) == 2
    assert v(gguf.Keys.ClipVision.PATCH_SIZE) == 7 and v(gguf.Keys.ClipVision.IMAGE_SIZE) == 112
    assert v(gguf.Keys.ClipVision.BLOCK_COUNT) == 2 and v(gguf.Keys.ClipVision.Attention.HEAD_COUNT) == 2
    assert v(gguf.Keys.ClipVision.EMBEDDING_LENGTH) == 56 and v(gguf.Keys.ClipVision.FEED_FORWARD_LENGTH) == 72
    assert v(gguf.Keys.ClipVision.PROJECTION_DIM) == 48
    assert v(gguf.Keys.ClipVision.Attention.LAYERNORM_EPS) == pytest.approx(1e-6)
    assert np.allclose(v(gguf.Keys.ClipVision.IMAGE_MEAN), [0.5, 0.45, 0.4])  # preprocessor_config.json
    assert np.allclose(v(gguf.Keys.ClipVision.IMAGE_STD), [0.25, 0.3, 0.28])
    t = gguf_tensors(path)
    assert not any(n.startswith(("v.post_ln", "v.class_embd", "v.position_embd")) or n == "v.patch_embd.bias"
                   for n in t)
    assert {"v.pre_ln.weight", "v.pre_ln.bias", "v.blk.1.attn_q.bias", "v.blk.1.attn_out.bias",
            "v.blk.1.ln2.bias"} <= set(t)
    for name in ("v.patch_embd.weight", "v.patch_embd.weight.1"):
        assert t[name].tensor_type == Q.F16 and tuple(t[name].shape) == (7, 7, 3, 56), name
    for name, shape, kind in (("mm.1.weight", (56, 40), Q.F16), ("mm.2.weight", (40, 48), Q.F16),
                              ("mm.merger.fc1.weight", (192, 40), Q.Q8_0), ("mm.merger.fc2.weight", (40, 48), Q.F16),
                              ("mm.merger.fc2.bias", (48,), Q.F32), ("v.blk.0.attn_q.weight", (56, 56), Q.F16)):
        assert t[name].tensor_type == kind and tuple(t[name].shape) == shape, name
    # q and k rows are reordered per head into llama.cpp's rope layout, v is not
    f32 = gguf.GGUFReader(converted("hf", "f32"))
    ckpt = Checkpoint(folder / "hf")
    prefix = "vision_tower.vision_model.encoder.layers.0.self_attn."
    q = ckpt.load(prefix + "q_proj.weight")
    assert np.array_equal(gguf_file.tensor_values(f32, "v.blk.0.attn_v.weight"), ckpt.load(prefix + "v_proj.weight"))
    ours = gguf_file.tensor_values(f32, "v.blk.0.attn_q.weight")
    assert not np.array_equal(ours, q)
    assert sorted(map(bytes, ours)) == sorted(map(bytes, q))  # the same rows, reordered
    assert np.array_equal(ours[24:28], q[24:28]) and np.array_equal(ours[4:8], q[12:16])  # T second half; pass-through


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_layouts_write_identical_files(layout, converted):
    assert_same_tensors(converted("hf", "f32"), converted(layout, "f32"))


def test_rope_layout_is_needed(folder, tmp_path):
    """q and k left in transformers' [T H W | T H W] order (llama.cpp's own converter permutes them
    only for head width 80, conversion/minimax.py _permute_vit_qk) break the runtime's rope."""
    from ggraft.converters.minimax_m3 import QK, MiniMaxM3

    class Unpermuted(MiniMaxM3):
        def modify(self, gguf_name, tensor):
            if QK.fullmatch(gguf_name):
                yield gguf_name, tensor
            else:
                yield from super().modify(gguf_name, tensor)

    out = mmproj.convert(Unpermuted(Checkpoint(folder / "hf")), tmp_path / "unpermuted.gguf", "f32")
    report = verify(folder / "hf", out, text=folder / "text.gguf")
    assert report.result is not None and not report.passed, report


@pytest.mark.parametrize("changes,needle", [
    ({"rope_parameters": {"rope_type": "axial", "rope_theta": 20000.0}}, "rope_theta 20000"),
    ({"spatial_merge_size": 3}, "spatial_merge_size 3"),
    ({"hidden_act": "gelu_pytorch_tanh"}, "'gelu_pytorch_tanh'"),
    ({"temporal_patch_size": 1}, "temporal_patch_size 2"),
])
def test_inexpressible_config_is_refused(changes, needle, folder, tmp_path):
    assert_refused(config_variant(folder / "hf", tmp_path / "ckpt", vision=changes), tmp_path, needle)


def test_check_finds_boundary_tokens(folder, converted):
    codes = pair_codes(folder / "text.gguf", converted("hf", "f16"))
    assert BOI in codes["boundary-tokens"].message and EOI in codes["boundary-tokens"].message
    assert "runtime-defect" not in codes


def test_audit_finds_minimax_m3_tokens(folder):
    assert_audit_finds(folder, "MiniMax-M3", 4, "MiniMaxM3SparseForConditionalGeneration")


def test_convert_and_verify_cli(folder, tmp_path):
    cli_convert_and_verify(folder / "hf-hub", tmp_path, "bf16", text=folder / "text.gguf", projector="minimax_m3")
