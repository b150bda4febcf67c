"""Gemma 3n (projector gemma3nv): every saved layout, every output type, through ``ggraft verify``.

transformers builds Gemma 3n's vision tower through timm (MobileNet-V5), so this module needs
timm.  The projector makes llama.cpp put ``<start_of_image>`` / ``<end_of_image>`` around the
image, which needs a vocabulary: verify is given the fixture's text GGUF.
"""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from conftest import (BARS, assert_audit_finds, assert_fidelity, assert_refused, assert_same_tensors,
                      cli_convert_and_verify, config_variant, family_fixtures, gguf_tensors, pair_codes)
from fixtures import gemma3n
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.jobs.verify import verify
from ggraft.mmproj import writer as mmproj
from ggraft.mmproj.converter import converter_for

pytest.importorskip("timm", reason="transformers builds Gemma 3n's vision tower with timm, which is not installed")

Q = gguf.GGMLQuantizationType
LAYOUTS = ("hf", "hf-hub")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
TOWER = "model.vision_tower.timm_model."


folder, converted = family_fixtures(lambda: gemma3n.build(), "gemma3n")


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fidelity(layout, outtype, folder, converted):
    report = verify(folder / layout, converted(layout, outtype), text=folder / "text.gguf")
    # 256 tokens: the adapter's 32x32 map of a 512-pixel image, pooled 2x2
    assert_fidelity("gemma3n", outtype, report, tokens=256)


def test_keys_and_tensors(folder, converted):
    path = converted("hf", "f32")
    r = gguf.GGUFReader(path)
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    CV = gguf.Keys.ClipVision
    assert v(gguf.Keys.Clip.PROJECTOR_TYPE) == "gemma3nv"
    assert v(CV.IMAGE_SIZE) == 512 and v(CV.PATCH_SIZE) == 2  # llama.cpp emits image_size / patch_size = 256 tokens
    assert v(CV.EMBEDDING_LENGTH) == 2048 and v(CV.PROJECTION_DIM) == 2048 and v(CV.BLOCK_COUNT) == 10
    assert v(CV.Attention.LAYERNORM_EPS) == pytest.approx(1e-6)
    assert np.allclose(v(CV.IMAGE_MEAN), CLIP_MEAN)  # the fixture's preprocessor normalises
    t = gguf_tensors(path)
    assert {"v.conv_stem.conv.weight", "v.conv_stem.bn.weight", "v.blk.0.1.conv_pwl.weight",
            "v.blk.1.0.dw_start.conv.weight", "v.blk.2.1.attn.key.down_conv.weight", "v.blk.3.1.attn.query.proj.weight",
            "v.msfa.ffn.pw_proj.conv.weight", "v.msfa.norm.weight", "mm.input_projection.weight",
            "mm.soft_emb_norm.weight"} <= set(t)
    assert "v.blk.3.1.attn.key.down_conv.weight" not in t  # keys/values not strided in stage 3
    assert not any(n.startswith(("mm.embedding", "mm.hard_emb_norm", "mm.a.", "a.")) for n in t)
    # channel-wise vectors are (1, C, 1, 1) so they broadcast over [W, H, C] maps (ggml shapes are reversed)
    assert tuple(t["v.blk.2.1.layer_scale.gamma"].shape) == (1, 1, 24, 1)
    assert tuple(t["v.conv_stem.conv.bias"].shape) == (1, 1, 16, 1)
    ckpt = Checkpoint(folder / "hf")
    norm = ckpt.load("model.embed_vision.soft_embedding_norm.weight")
    assert np.array_equal(gguf_file.tensor_values(r, "mm.soft_emb_norm.weight"), norm)  # scales by w, not 1 + w
    gamma = ckpt.load(TOWER + "blocks.2.1.layer_scale.gamma")
    assert np.array_equal(gguf_file.tensor_values(r, "v.blk.2.1.layer_scale.gamma").reshape(-1), gamma)


@pytest.mark.parametrize("outtype", ["f32", "bf16", "q8_0"])
def test_dtype_policy_fits_ggml_convolutions(outtype, converted):
    """ggml's convolutions take f32/f16 kernels (depthwise ones f16 only) and its binary ops no
    f16 operand: every conv kernel is f32/f16, depthwise ones f16, vectors f32."""
    t = gguf_tensors(converted("hf", outtype))
    for name, info in t.items():
        shape = tuple(info.shape)  # ggml order: a depthwise kernel is (k, k, 1, C)
        if sum(d > 1 for d in shape) < 2:
            assert info.tensor_type == Q.F32, name
        elif len(shape) == 4:
            want = (Q.F16,) if shape[2] == 1 or outtype != "f32" else (Q.F32,)
            assert info.tensor_type in want, (name, info.tensor_type.name)
    assert t["mm.input_projection.weight"].tensor_type == (Q.F32 if outtype == "f32" else Q.F16 if outtype == "q8_0"
                                                             else Q.BF16)


def test_layouts_write_identical_tensors(folder, converted, tmp_path):
    assert_same_tensors(converted("hf", "f16"), converted("hf-hub", "f16"))
    from fixtures import common

    # saves of the bare Gemma3nModel: vision_tower.timm_model.*, embed_vision.* (no `model.`)
    common.save_renamed(folder / "hf", tmp_path / "bare", lambda k: k.removeprefix("model."))
    out = mmproj.convert(converter_for(Checkpoint(tmp_path / "bare")), tmp_path / "bare.gguf", "f16")
    assert_same_tensors(out, converted("hf", "f16"))


def test_preprocessor_without_normalisation(folder, tmp_path):
    """The released preprocessors list mean/std 0.5 but do_normalize false: pixels are only rescaled."""
    pre = {"do_normalize": False, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    src = config_variant(folder / "hf", tmp_path / "ckpt", preprocessor=pre)
    r = gguf.GGUFReader(mmproj.convert(converter_for(Checkpoint(src)), tmp_path / "m.gguf", "f16"))
    assert gguf_file.value(r, "clip.vision.image_mean") == [0.0] * 3
    assert gguf_file.value(r, "clip.vision.image_std") == [1.0] * 3


def _blocks(edit):
    from fixtures.gemma3n import MODEL_ARGS

    args = json.loads(json.dumps(MODEL_ARGS))
    edit(args["block_args"])
    return {"model_args": args}


@pytest.mark.parametrize("changes,needle", [
    ({"config": {"text_config.hidden_size": 1536}}, "clip_n_mmproj_embd"),  # in the saved text_config
    ({"config": {"vision_soft_tokens_per_image": 64}}, "vision_soft_tokens_per_image 64"),
    ({"vision": {"architecture": "mobilenetv5_base"}}, "'mobilenetv5_base'"),
    ({"vision": {"rms_norm_eps": 1e-5}}, "rms_norm_eps"),
    ({"vision": {"model_args": {"msfa_indices": [-3, -1]}}}, "'msfa_indices'"),
    ({"vision": _blocks(lambda b: b.pop())}, "3 stages"),
    ({"vision": _blocks(lambda b: b[1][1].update(dw_kernel_size_end=3))}, "[1][1]: uir block with dw_kernel_size_end"),
    ({"vision": _blocks(lambda b: b[0][1].update(exp_kernel_size=5))}, "block_args[0][1]"),
    ({"vision": _blocks(lambda b: b[2].insert(0, b[2].pop(1)))}, "block_args[2][0]"),
    ({"preprocessor": {"size": {"height": 384, "width": 384}}}, "384x384"),
])
def test_inexpressible_config_is_refused(changes, needle, folder, tmp_path):
    src = config_variant(folder / "hf", tmp_path / "ckpt", vision=changes.get("vision"),
                         preprocessor=changes.get("preprocessor"), **changes.get("config", {}))
    assert_refused(src, tmp_path, needle)


def test_unmappable_tensor_is_named(folder, tmp_path):
    stray = TOWER + "blocks.1.1.se.conv_reduce.weight"  # squeeze-excite: no llama.cpp equivalent
    src = config_variant(folder / "hf", tmp_path / "ckpt", extra={stray: np.zeros((4, 16, 1, 1), np.float32)})
    assert_refused(src, tmp_path, stray)


def test_check_finds_boundary_tokens(folder, converted):
    codes = pair_codes(folder / "text.gguf", converted("hf", "f16"))
    boundary = codes["boundary-tokens"].message
    assert "<start_of_image>" in boundary and "<end_of_image>" in boundary
    assert codes["width"].severity == "info"


def test_audit_finds_gemma_tokens(folder):
    assert_audit_finds(folder, "Gemma 3", 3, "Gemma3nForConditionalGeneration", "Gemma3ForConditionalGeneration")


def test_convert_and_verify_cli(folder, tmp_path):
    cli_convert_and_verify(folder / "hf-hub", tmp_path, "q8_0", text=folder / "text.gguf", projector="gemma3nv")
