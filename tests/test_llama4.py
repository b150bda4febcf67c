"""Llama 4 (projector llama4): every saved layout, every output type, through ``ggraft verify``.

llama.cpp's llama4 graph (llama-cpp-python 0.3.36) emits the pixel-shuffled image tokens
column-major where transformers emits them row-major (tools/mtmd/models/llama4.cpp:71, a
commented-out permute), whatever the file holds.  The tests therefore assert what can be
asserted honestly: either the runtime matches transformers at the bar (a fixed llama.cpp), or
verify names that defect and the file matches transformers run in the runtime's token order at
the same bar.  The second cause of llama.cpp's own converter's failure, a tensor named by
gguf-py's table alone (``post_attention_layernorm`` -> ``attn_post_norm``), is shown apart.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from conftest import (BARS, assert_audit_finds, assert_fidelity, assert_refused, assert_same_tensors,
                      cli_convert_and_verify, config_variant, family_fixtures, gguf_tensors, pair_codes)
from fixtures import llama4
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.jobs.verify import verify
from ggraft.mmproj import writer as mmproj
from ggraft.mmproj.converter import Converter

Q = gguf.GGMLQuantizationType
LAYOUTS = ("hf", "hf-hub", "hf-modules")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
DEFECT = "llama4.cpp:71"


folder, converted = family_fixtures(lambda: llama4.build(), "llama4")


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fidelity(layout, outtype, folder, converted):
    report = verify(folder / layout, converted(layout, outtype), text=folder / "text.gguf")
    assert_fidelity("llama4", outtype, report, tokens=16, defect=DEFECT)  # 8x8 patches, pixel-shuffled 2x2


def test_keys_and_tensors(folder, converted):
    path = converted("hf", "q8_0")
    r = gguf.GGUFReader(path)
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    assert v(gguf.Keys.Clip.PROJECTOR_TYPE) == "llama4"
    assert v(gguf.Keys.ClipVision.Projector.SCALE_FACTOR) == 2  # 1 / pixel_shuffle_ratio
    assert v(gguf.Keys.ClipVision.IMAGE_SIZE) == 64 and v(gguf.Keys.ClipVision.PATCH_SIZE) == 8
    assert v(gguf.Keys.ClipVision.BLOCK_COUNT) == 2 and v(gguf.Keys.ClipVision.Attention.HEAD_COUNT) == 2
    assert v(gguf.Keys.ClipVision.FEED_FORWARD_LENGTH) == 256 and v(gguf.Keys.ClipVision.PROJECTION_DIM) == 80
    assert v(gguf.Keys.ClipVision.Attention.LAYERNORM_EPS) == pytest.approx(1e-5)
    assert v(gguf.Keys.ClipVision.USE_GELU) is True
    assert np.allclose(v(gguf.Keys.ClipVision.IMAGE_MEAN), CLIP_MEAN)  # from preprocessor_config.json
    t = gguf_tensors(path)
    assert {"v.blk.1.ln1.weight", "v.blk.1.ln2.weight", "v.blk.1.ln2.bias", "v.pre_ln.weight",
            "v.post_ln.bias", "v.class_embd"} <= set(t)
    assert not any("attn_post_norm" in name for name in t)
    assert t["v.position_embd.weight"].tensor_type == Q.F32 and tuple(t["v.position_embd.weight"].shape) == (64, 65)
    assert t["v.patch_embd.weight"].tensor_type == Q.F16 and tuple(t["v.patch_embd.weight"].shape) == (192, 64)
    for name, shape in (("mm.model.mlp.1.weight", (256, 96)), ("mm.model.mlp.2.weight", (96, 96)),
                        ("mm.model.fc.weight", (96, 80))):
        assert t[name].tensor_type == Q.Q8_0 and tuple(t[name].shape) == shape, name
    f32 = gguf.GGUFReader(converted("hf", "f32"))
    ckpt = Checkpoint(folder / "hf")
    norm = ckpt.load("vision_model.model.layers.1.post_attention_layernorm.weight")
    assert np.array_equal(gguf_file.tensor_values(f32, "v.blk.1.ln2.weight"), norm)


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_layouts_write_identical_files(layout, converted):
    assert_same_tensors(converted("hf", "f32"), converted(layout, "f32"))


def test_table_named_ffn_norm_breaks_even_the_runtime_order(folder, tmp_path):
    """gguf-py's TensorNameMap maps ``post_attention_layernorm`` to gemma4's ``attn_post_norm``
    (its later row wins over llama4's ``ln2``), as llama.cpp's own converter writes it; llama.cpp
    then normalizes the attention output and runs the FFN unnormalized.  Such a file fails even
    against transformers in the runtime's token order, which ggraft's file passes."""

    from ggraft.converters.llama4 import Llama4

    class TableNamed(Llama4):
        def rename(self, canonical):
            if ".post_attention_layernorm." in canonical:
                return Converter.rename(self, canonical)
            return super().rename(canonical)

    out = mmproj.convert(TableNamed(Checkpoint(folder / "hf")), tmp_path / "table-named.gguf", "f32")
    assert "v.blk.0.attn_post_norm.weight" in gguf_tensors(out)
    report = verify(folder / "hf", out, text=folder / "text.gguf")
    assert not report.passed and report.runtime_result.min_cosine < 0.9, report


@pytest.mark.parametrize("changes,needle", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 20000.0}}, "rope_theta 20000.0"),
    ({"pixel_shuffle_ratio": 0.3}, "pixel_shuffle_ratio 0.3"),
    ({"pixel_shuffle_ratio": 0.25, "image_size": 48}, "6x6 patch grid"),
])
def test_inexpressible_config_is_refused(changes, needle, folder, tmp_path):
    assert_refused(config_variant(folder / "hf", tmp_path / "ckpt", vision=changes), tmp_path, needle)


def test_unmappable_tensor_is_named(folder, tmp_path):
    extra = {"multi_modal_projector.linear_1.bias": np.zeros(80, np.float32)}  # transformers' has none
    assert_refused(config_variant(folder / "hf", tmp_path / "ckpt", extra=extra), tmp_path,
                   "multi_modal_projector.linear_1.bias")


def test_check_finds_boundary_tokens_and_warns_of_the_defect(folder, converted):
    codes = pair_codes(folder / "text.gguf", converted("hf", "f16"))
    assert "<|image_start|>" in codes["boundary-tokens"].message and "<|image_end|>" in codes["boundary-tokens"].message
    assert codes["width"].severity == "info"
    assert codes["runtime-defect"].severity == "warning" and DEFECT in codes["runtime-defect"].message


def test_audit_finds_llama4_tokens(folder):
    assert_audit_finds(folder, "Llama 4", 6, "Llama4ForConditionalGeneration")


def test_convert_and_verify_cli(folder, tmp_path):
    cli_convert_and_verify(folder / "hf-hub", tmp_path, "bf16", text=folder / "text.gguf", projector="llama4",
                           defect=DEFECT)
