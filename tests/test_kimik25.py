"""Kimi-K2.5 (projector kimik25): every saved layout, every output type, through ``ggraft verify``.

The test image (60x84, a 10x14 patch grid) is aligned to patch x merge, so neither transformers'
processor nor llama.cpp's dyn-size preprocessor resizes it, and its grid differs from the 5x5 learned
position grid, so both sides resample the positions bicubically.  The whole image is compared (there
is no tiling for this family).
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from conftest import (BARS, assert_audit_finds, assert_fidelity, assert_refused, assert_same_tensors,
                      cli_convert_and_verify, config_variant, family_fixtures, gguf_tensors, pair_codes, run_cli)
from fixtures import kimik25
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.jobs.verify import verify

Q = gguf.GGMLQuantizationType
LAYOUTS = ("hf", "hf-hub", "hf-modules")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]


folder, converted = family_fixtures(lambda: kimik25.build(), "kimik25")


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fidelity(layout, outtype, folder, converted):
    report = verify(folder / layout, converted(layout, outtype), text=folder / "text.gguf")
    assert_fidelity("kimik25", outtype, report, tokens=35)  # 10x14 patches merged 2x2


@pytest.mark.parametrize("size", [(120, 120), (24, 36)])
def test_other_grids(size, folder, converted):
    """A 20x20 grid (positions upsampled 4x) and a 4x6 one (downsampled): still exact."""
    report = verify(folder / "hf", converted("hf", "f32"), text=folder / "text.gguf", image_size=size)
    assert report.passed and report.result.tokens == size[0] * size[1] // 144, report.result


def test_keys_and_tensors(folder, converted):
    path = converted("hf", "q8_0")
    r = gguf.GGUFReader(path)
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    cv = gguf.Keys.ClipVision
    assert v(gguf.Keys.Clip.PROJECTOR_TYPE) == "kimik25"
    assert v(cv.Projector.SCALE_FACTOR) == 2 and v(cv.IMAGE_SIZE) == 30 and v(cv.PATCH_SIZE) == 6
    assert v(cv.IMAGE_MIN_PIXELS) == 144 and v(cv.IMAGE_MAX_PIXELS) == 1024 * 36
    assert v(cv.BLOCK_COUNT) == 2 and v(cv.Attention.HEAD_COUNT) == 2 and v(cv.EMBEDDING_LENGTH) == 48
    assert v(cv.FEED_FORWARD_LENGTH) == 96 and v(cv.PROJECTION_DIM) == 80
    assert v(cv.Attention.LAYERNORM_EPS) == pytest.approx(1e-5) and v(cv.USE_GELU) is True
    assert np.allclose(v(cv.IMAGE_MEAN), CLIP_MEAN)  # from preprocessor_config.json
    t = gguf_tensors(path)
    assert tuple(t["v.position_embd.weight"].shape) == (48, 5, 5) and t["v.position_embd.weight"].tensor_type == Q.F32
    assert tuple(t["v.patch_embd.weight"].shape) == (6, 6, 3, 48) and t["v.patch_embd.weight"].tensor_type == Q.F16
    for name, shape, qtype in (("v.blk.1.attn_q.weight", (48, 48), Q.F16),  # rows of 48: not whole q8_0 blocks
                               ("v.blk.1.ffn_down.weight", (96, 48), Q.Q8_0), ("mm.1.weight", (192, 192), Q.Q8_0),
                               ("mm.2.weight", (192, 80), Q.Q8_0)):
        assert t[name].tensor_type == qtype and tuple(t[name].shape) == shape, name
    assert tuple(t["mm.input_norm.weight"].shape) == (48,) and "v.post_ln.weight" in t
    assert not any("attn_qkv" in n or "time" in n for n in t)
    f32 = gguf.GGUFReader(converted("hf", "f32"))  # v is split out of wqkv unpermuted
    wqkv = Checkpoint(folder / "hf").load("vision_tower.encoder.blocks.1.wqkv.weight")
    assert np.array_equal(gguf_file.tensor_values(f32, "v.blk.1.attn_v.weight"), wqkv[96:])


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_layouts_write_identical_files(layout, converted):
    assert_same_tensors(converted("hf", "f32"), converted(layout, "f32"))


@pytest.mark.parametrize("changes,needle", [
    ({"rope_parameters": {"rope_type": "axial", "rope_theta": 20000.0}}, "rope_theta 20000.0"),
    ({"merge_kernel_size": [2, 3]}, "merge_kernel_size [2, 3]"),
])
def test_inexpressible_config_is_refused(changes, needle, folder, tmp_path):
    assert_refused(config_variant(folder / "hf", tmp_path / "ckpt", vision=changes), tmp_path, needle)


def test_hub_spelling_converts_alike(folder, converted, tmp_path):
    """The hub's ``KimiK25ForConditionalGeneration`` spelling converts to the same file; verify needs
    transformers' class, which has the other spelling (the .shared.md proposes a hook)."""
    src = config_variant(folder / "hf-hub", tmp_path / "ckpt", architectures=["KimiK25ForConditionalGeneration"])
    out = tmp_path / "m.gguf"
    assert run_cli("convert", src, "-o", out).code == 0
    a, b = gguf_tensors(converted("hf", "f32")), gguf_tensors(out)
    assert sorted(a) == sorted(b)


def test_check_finds_boundary_tokens(folder, converted):
    codes = pair_codes(folder / "text.gguf", converted("hf", "f16"))
    assert "llama-cpp-requirement" not in codes, codes["llama-cpp-requirement"].message
    msg = codes["boundary-tokens"].message
    assert "<|media_begin|>" in msg and "<|media_end|>" in msg
    assert codes["width"].severity == "info"
    assert "runtime-defect" not in codes


def test_audit_finds_kimi_tokens(folder):
    assert_audit_finds(folder, "Kimi-VL", 4, "Kimi-K2.5 (")


def test_convert_and_verify_cli(folder, tmp_path):
    cli_convert_and_verify(folder / "hf-hub", tmp_path, "bf16", text=folder / "text.gguf", projector="kimik25")
