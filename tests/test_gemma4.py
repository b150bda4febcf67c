"""Gemma 4 (projector gemma4v) and Gemma 4 unified (projector gemma4uv).

Every saved layout is converted once per output type and run in llama.cpp through
``ggraft.verify`` against transformers' ``get_image_features`` on a 72-soft-token image that
llama.cpp takes unresized (it resizes anything under 70 tokens).  mtmd writes ``<|image>`` /
``<image|>`` around images, so verify is given each fixture's vocabulary-only GGUF.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from conftest import (BARS, assert_fidelity, assert_refused, assert_same_tensors, cli_convert_and_verify,
                      config_variant, families_fixtures, gguf_tensors, run_cli)
from fixtures import gemma4
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.jobs.verify import verify
from ggraft.mmproj import writer as mmproj
from ggraft.mmproj.converter import converter_for

Q = gguf.GGMLQuantizationType
K = gguf.Keys.ClipVision
LAYOUTS = [("gemma4v", "hf"), ("gemma4v", "hf-base"), ("gemma4uv", "hf"), ("gemma4uv", "hf-modules")]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
HUB = "model.vision_tower."


fixture_dirs, converted = families_fixtures({"gemma4v": lambda: gemma4.build(),
                                             "gemma4uv": lambda: gemma4.build_unified()}, "gemma4")


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("family,layout", LAYOUTS)
def test_fidelity(family, layout, outtype, fixture_dirs, converted):
    report = verify(fixture_dirs[family] / layout, converted(family, layout, outtype),
                    text=fixture_dirs[family] / "vocab.gguf")
    # 72 tokens: 16 x 18 patches pooled 2x2 / 8 x 9 merged patches
    assert_fidelity(family, outtype, report, tokens=72, image_size=(64, 72))


def values(reader, name):
    return np.asarray(gguf_file.tensor_values(reader, name))


def test_gemma4_keys_and_tensors(converted, fixture_dirs):
    r = gguf.GGUFReader(converted("gemma4v", "hf", "f32"))
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    assert v(gguf.Keys.Clip.PROJECTOR_TYPE) == "gemma4v" and v(K.PATCH_SIZE) == 4 and v(K.BLOCK_COUNT) == 3
    assert v(K.Projector.SCALE_FACTOR) == 2 and v(K.PROJECTION_DIM) == 56 and v(K.EMBEDDING_LENGTH) == 64
    assert v("clip.vision.attention.head_dim") == 24 and v("clip.vision.attention.head_count_kv") == 2
    assert v(K.Attention.LAYERNORM_EPS) == pytest.approx(1e-5)  # rms_norm_eps, not a default
    assert v(K.USE_GELU) is True  # without it clip.cpp runs GELU-quick (llama.cpp's own converter omits it)
    assert np.allclose(v(K.IMAGE_MEAN), CLIP_MEAN)  # the preprocessor normalizes
    ckpt = Checkpoint(fixture_dirs["gemma4v"] / "hf")
    t = gguf_tensors(converted("gemma4v", "hf", "f32"))
    assert not any(n.startswith("a.") for n in t)  # the audio tower is left out
    assert any(n.startswith("model.audio_tower.") for n in ckpt.names())
    patch = ckpt.load(HUB + "patch_embedder.input_proj.weight")  # (64, 4 * 4 * 3) over (row, col, channel)
    assert np.array_equal(values(r, "v.patch_embd.weight"), patch.reshape(64, 4, 4, 3).transpose(0, 3, 1, 2))
    assert tuple(t["v.position_embd.weight"].shape) == (64, 40, 2)
    layer = HUB + "encoder.layers.1."
    for gguf_name, hf_name in (("v.blk.1.attn_post_norm.weight", "post_attention_layernorm.weight"),
                               ("v.blk.1.ln2.weight", "pre_feedforward_layernorm.weight"),
                               ("v.blk.1.ffn_post_norm.weight", "post_feedforward_layernorm.weight"),
                               ("v.blk.1.attn_k.weight", "self_attn.k_proj.linear.weight")):
        assert np.array_equal(values(r, gguf_name), ckpt.load(layer + hf_name)), gguf_name  # RMSNorm: weight as is
    clamp = t["v.blk.1.ffn_down.output_max"]
    assert tuple(clamp.shape) == (1,) and clamp.tensor_type == Q.F32
    assert values(r, "v.blk.1.ffn_down.output_max")[0] == ckpt.load(layer + "mlp.down_proj.output_max")
    assert {"v.std_bias", "v.std_scale", "mm.input_projection.weight"} <= set(t)
    q = gguf_tensors(converted("gemma4v", "hf", "q8_0"))
    assert q["v.blk.0.attn_q.weight"].tensor_type == Q.Q8_0 and q["v.patch_embd.weight"].tensor_type == Q.F16
    assert q["v.blk.0.attn_q.input_min"].tensor_type == Q.F32 and q["v.position_embd.weight"].tensor_type == Q.F32


def test_unified_keys_and_tensors(converted, fixture_dirs):
    r = gguf.GGUFReader(converted("gemma4uv", "hf", "f32"))
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    assert v(gguf.Keys.Clip.PROJECTOR_TYPE) == "gemma4uv" and v(K.PATCH_SIZE) == 4
    assert v(K.Projector.SCALE_FACTOR) == 2 and v(K.EMBEDDING_LENGTH) == 40 and v(K.PROJECTION_DIM) == 56
    assert v(K.BLOCK_COUNT) == 0 and v(K.IMAGE_MEAN) == [0.0] * 3 and v(K.IMAGE_STD) == [1.0] * 3
    t = gguf_tensors(converted("gemma4uv", "hf", "f32"))
    assert set(t) == {"v.patch_embd.weight", "v.patch_embd.bias", "v.position_embd.weight",
                      "mm.input_projection.weight",
                      *(f"v.patch_norm.{i}.{kind}" for i in (1, 2, 3) for kind in ("weight", "bias"))}
    ckpt = Checkpoint(fixture_dirs["gemma4uv"] / "hf")
    im2col = np.arange(192).reshape(8, 8, 3).transpose(2, 0, 1).reshape(-1)  # llama.cpp's (channel, row, col)
    dense = ckpt.load("model.vision_embedder.patch_dense.weight")
    assert np.array_equal(values(r, "v.patch_embd.weight"), dense[:, im2col])
    norm = ckpt.load("model.vision_embedder.patch_ln1.weight")
    assert np.array_equal(values(r, "v.patch_norm.1.weight"), norm[im2col])
    table = ckpt.load("model.vision_embedder.pos_embedding")  # (size, axis, width)
    assert np.array_equal(values(r, "v.position_embd.weight"), table.transpose(1, 0, 2))


@pytest.mark.parametrize("family,other", [("gemma4v", "hf-base"), ("gemma4uv", "hf-modules")])
def test_layouts_write_identical_tensors(family, other, converted):
    assert_same_tensors(converted(family, "hf", "f32"), converted(family, other, "f32"))


def test_the_clamps_bite(fixture_dirs):
    """transformers' own output changes when the clipped linears' bounds are lifted: the fidelity
    test exercises the bounds llama.cpp reads."""
    import torch

    from ggraft.jobs.verify import as_rows, load_reference_model, pixel_values, test_image

    ckpt = Checkpoint(fixture_dirs["gemma4v"] / "hf")
    conv, model = converter_for(ckpt), load_reference_model(ckpt)
    pv = pixel_values(test_image(*conv.test_image_size()), conv.params().image_mean, conv.params().image_std)
    with torch.no_grad():
        clipped = as_rows(conv.reference_features(model, pv))
        for mod in model.model.vision_tower.modules():
            for bound in ("input_min", "input_max", "output_min", "output_max"):
                if hasattr(mod, bound):
                    getattr(mod, bound).fill_(float("inf") if bound.endswith("max") else -float("inf"))
        free = as_rows(conv.reference_features(model, pv))
    cos = (clipped * free).sum(1) / np.linalg.norm(clipped, axis=1) / np.linalg.norm(free, axis=1)
    assert cos.min() < 0.999


@pytest.mark.parametrize("family,stray", [
    ("gemma4v", "model.vision_tower.encoder.layers.0.mlp.fc3.linear.weight"),
    ("gemma4v", "model.vision_tower.encoder.layers.3.input_layernorm.weight"),  # past num_hidden_layers
    ("gemma4uv", "model.vision_embedder.patch_ln4.weight"),
])
def test_unmappable_tensor_is_named(family, stray, fixture_dirs, tmp_path):
    src = config_variant(fixture_dirs[family] / "hf", tmp_path / "ckpt", extra={stray: np.zeros((4, 4), np.float32)})
    assert_refused(src, tmp_path, stray)


@pytest.mark.parametrize("family,change,needle", [
    ("gemma4v", {"rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0}}, "rope_theta 10000.0"),
    ("gemma4v", {"hidden_activation": "relu"}, "'relu'"),
    ("gemma4uv", {"output_proj_dims": 48}, "output_proj_dims 48"),
])
def test_inexpressible_config_is_refused(family, change, needle, fixture_dirs, tmp_path):
    assert_refused(config_variant(fixture_dirs[family] / "hf", tmp_path / "ckpt", vision=change), tmp_path, needle)


@pytest.mark.parametrize("family", ["gemma4v", "gemma4uv"])
def test_check_and_audit(family, fixture_dirs, converted):
    from ggraft.jobs.audit import audit
    from ggraft.pair.check import check_pair

    report = check_pair(fixture_dirs[family] / "vocab.gguf", converted(family, "hf", "f16"))
    assert report.ok, report.findings
    boundary = [f for f in report.findings if f.code == "boundary-tokens"]
    assert boundary and "<|image>" in boundary[0].message and "<image|>" in boundary[0].message
    assert not [f for f in report.findings if f.code == "runtime-defect"]
    found = audit(fixture_dirs[family] / "vocab.gguf")
    assert {"family": "Gemma 4", "found": 3, "expected": 3} in found.families
    assert found.donors["Gemma 4"] == ["Gemma 4 (Gemma4ForConditionalGeneration)",
                                       "Gemma 4 unified (Gemma4UnifiedForConditionalGeneration)"]


def test_convert_and_verify_cli(fixture_dirs, tmp_path):
    folder = fixture_dirs["gemma4v"]
    cli_convert_and_verify(folder / "hf-base", tmp_path, "q8_0", text=folder / "vocab.gguf", projector="gemma4v",
                           image_size=(64, 72))


def test_graft_onto_a_gemma4_vocab(fixture_dirs, tmp_path):
    """No text-model rows: a graft is the tower plus the recipient's image-token ids, checked."""
    folder = fixture_dirs["gemma4v"]
    out = tmp_path / "grafted.gguf"
    res = run_cli("graft", "--donor", folder / "hf", "--text", folder / "vocab.gguf", "-o", out)
    assert res.code == 0, res.stderr
    assert run_cli("check", folder / "vocab.gguf", out).code == 0
    ids = gguf_file.value(gguf.GGUFReader(out), mmproj.IMAGE_TOKEN_IDS_KEY)
    assert len(ids) == 3


def test_the_f32_gap_is_ggml_precision(fixture_dirs, converted, monkeypatch):
    """gemma4v's f32 figure (~0.999998, not 1.0) is the runtime's arithmetic, not the file: with
    flash attention off (it casts K/V to f16, clip.cpp build_attn), transformers run with the two
    other f16 steps of ggml's CPU graph -- ggml_conv_2d's f16 im2col (pixels and kernel rounded,
    ggml.c) and GELU through an f16 table (GGML_GELU_FP16, ggml-cpu/vec.h) -- matches llama.cpp."""
    import types

    import torch
    from llama_cpp import mtmd_cpp

    from ggraft.jobs import verify as v

    default = mtmd_cpp.mtmd_context_params_default

    def without_flash_attention():
        params = default()
        params.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
        return params

    monkeypatch.setattr(mtmd_cpp, "mtmd_context_params_default", without_flash_attention)
    folder = fixture_dirs["gemma4v"]
    ckpt = Checkpoint(folder / "hf")
    conv, model = converter_for(ckpt), v.load_reference_model(ckpt)
    f16 = lambda t: t.to(torch.float16).float()  # noqa: E731

    def conv_in_f16(self, pixel_values, positions, padding):
        patch = f16(2 * (pixel_values - 0.5)) @ f16(self.input_proj.weight).T
        return patch + self._position_embeddings(positions, padding)

    def gelu_table(x):
        y = f16(torch.nn.functional.gelu(f16(x), approximate="tanh"))
        return torch.where(x <= -10, 0.0, torch.where(x >= 10, x, y))

    tower = model.model.vision_tower
    tower.patch_embedder.forward = types.MethodType(conv_in_f16, tower.patch_embedder)
    for layer in tower.encoder.layers:
        del layer.mlp.act_fn  # a module: replaced by a plain function
        layer.mlp.act_fn = gelu_table
    img = v.test_image(*conv.test_image_size())
    llama = v.llama_embeddings(converted("gemma4v", "hf", "f32"), img, 56, folder / "vocab.gguf", None)
    assert v.compare(llama, v.reference_embeddings(conv, model, img)[0]).min_cosine > 0.9999999
