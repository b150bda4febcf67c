"""InternVL (projector internvl): transformers' layouts and OpenGVLab's original one.

Every saved layout is converted once per output type and run in llama.cpp through
``ggraft.verify`` against transformers' ``get_image_features`` on an ``image_size`` square image
(one tile, nothing resized).  transformers cannot load the original layout (remote code), so its
mmproj is verified against the ``hf/`` checkpoint, which holds the same weights (the layouts are
also shown to write the same tensors).  llama.cpp marks images with ``<img>``/``</img>``, so verify
is given the fixture's text GGUF.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from conftest import (BARS, assert_fidelity, assert_refused, assert_same_tensors, config_variant, family_fixtures,
                      gguf_tensors)
from fixtures import internvl
from ggraft.converters.internvl import POSITIONS, InternVL
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.jobs.verify import verify
from ggraft.mmproj import writer as mmproj
from ggraft.mmproj.converter import converter_for

Q = gguf.GGMLQuantizationType
LAYOUTS = ("hf", "hf-hub", "hf-modules", "original")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]


folder, converted = family_fixtures(lambda: internvl.build(), "internvl")


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fidelity(layout, outtype, folder, converted):
    reference = folder / ("hf" if layout == "original" else layout)
    report = verify(reference, converted(layout, outtype), text=folder / "text.gguf")
    assert_fidelity("internvl", outtype, report, tokens=16)  # 8x8 patches, pixel-shuffled 2x2


def test_layouts_write_the_same_tensors_in_the_same_order(converted):
    for layout in LAYOUTS[1:]:
        assert_same_tensors(converted("hf", "f32"), converted(layout, "f32"), ordered=True)


def test_keys_and_tensors(converted, folder):
    for layout, tiles in (("hf", None), ("original", (1, 6))):
        r = gguf.GGUFReader(converted(layout, "q8_0"))
        v = lambda k: gguf_file.value(r, k)  # noqa: E731
        K = gguf.Keys.ClipVision
        assert v(gguf.Keys.Clip.PROJECTOR_TYPE) == "internvl" and v(K.IMAGE_SIZE) == 56 and v(K.PATCH_SIZE) == 7
        assert v(K.BLOCK_COUNT) == 3 and v(K.Projector.SCALE_FACTOR) == 2 and v(K.PROJECTION_DIM) == 96
        assert v(K.Attention.LAYERNORM_EPS) == pytest.approx(1e-5) and v(K.USE_GELU) is True
        assert np.allclose(v(K.IMAGE_MEAN), CLIP_MEAN)  # from preprocessor_config.json, not ImageNet's default
        assert (v(K.PREPROC_MIN_TILES), v(K.PREPROC_MAX_TILES)) == (tiles or (None, None))
    t = gguf_tensors(converted("hf", "q8_0"))
    assert {"v.class_embd", "v.blk.2.ls1.weight", "v.blk.2.ls2.weight", "v.blk.0.attn_q.bias", "v.patch_embd.bias",
            "mm.model.mlp.0.weight", "mm.model.mlp.1.weight", "mm.model.mlp.3.bias"} <= set(t)
    assert not any("attn_qkv" in n or "post_ln" in n for n in t)
    assert t[POSITIONS].tensor_type == Q.F32 and t["v.patch_embd.weight"].tensor_type == Q.F16
    assert t["mm.model.mlp.1.weight"].tensor_type == Q.Q8_0
    # the position rows in llama.cpp's order: the patches', then CLS's
    saved = Checkpoint(folder / "hf").load("vision_tower.embeddings.position_embeddings")
    written = gguf_file.tensor_values(gguf.GGUFReader(converted("hf", "f32")), POSITIONS)
    assert np.array_equal(written.reshape(saved.shape), np.concatenate([saved[:, 1:], saved[:, :1]], 1))


class CheckpointOrder(InternVL):
    """The file llama.cpp's own converter writes: positions in checkpoint order (CLS's row first)."""

    def modify(self, gguf_name, tensor):
        yield from [(gguf_name, tensor)] if gguf_name == POSITIONS else super().modify(gguf_name, tensor)


def test_runtime_puts_cls_last(folder, tmp_path):
    """Why the position rows are rotated: llama.cpp appends CLS after the patches and adds the rows
    in stored order.  A file in checkpoint order misses transformers, and matches transformers run
    with every patch given its left neighbour's row and CLS the last one's.  (If this fails, the
    runtime has changed its order, and so must the converter.)"""
    import torch

    from ggraft.jobs.verify import compare, llama_embeddings, load_reference_model, pixel_values, test_image

    ckpt = Checkpoint(folder / "hf")
    out = mmproj.convert(CheckpointOrder(ckpt), tmp_path / "checkpoint-order.gguf", "f32")
    img = test_image(56, 56)
    rows = llama_embeddings(out, img, 96, folder / "text.gguf", None)
    conv, model = converter_for(ckpt), load_reference_model(ckpt)
    pv = pixel_values(img, conv.params().image_mean, conv.params().image_std)
    positions = model.model.vision_tower.embeddings.position_embeddings
    with torch.no_grad():
        reference = conv.reference_features(model, pv).pooler_output[0].numpy()
        positions.copy_(torch.roll(positions, 1, dims=1))  # CLS gets row n, patch i row i
        as_run = conv.reference_features(model, pv).pooler_output[0].numpy()
    assert compare(rows, reference).min_cosine < 0.99
    assert compare(rows, as_run).min_cosine > 0.9999


@pytest.mark.parametrize("feature_layer,blocks,post_norm", [(-1, 3, True), (-2, 2, False)])
def test_feature_layer_and_final_norm(feature_layer, blocks, post_norm, folder, tmp_path):
    """A tower with a final norm (``use_mean_pooling: false``) and features from an earlier block:
    the blocks after it are left out and the norm applies to the last hidden state only."""
    rng = np.random.default_rng(0)
    norm = {"vision_tower.layernorm.weight": (1 + 0.3 * rng.standard_normal(64)).astype(np.float32),
            "vision_tower.layernorm.bias": (0.3 * rng.standard_normal(64)).astype(np.float32)}
    # the norm added to model.safetensors itself (not saved beside it: transformers loads that file only)
    src = config_variant(folder / "hf", tmp_path / "ckpt", {"use_mean_pooling": False}, extra=norm,
                         extra_file="model.safetensors", vision_feature_layer=feature_layer)
    out = mmproj.convert(converter_for(Checkpoint(src)), tmp_path / "m.gguf", "f32")
    t = gguf_tensors(out)
    assert ("v.post_ln.weight" in t) == post_norm and f"v.blk.{blocks - 1}.ln1.weight" in t
    assert f"v.blk.{blocks}.ln1.weight" not in t
    report = verify(src, out, text=folder / "text.gguf")
    assert report.passed, report.result


@pytest.mark.parametrize("layout,config,vision,needle", [
    ("original", {"ps_version": "v1"}, {}, "ps_version"),
    ("hf", {}, {"norm_type": "rms_norm"}, "norm_type"),
    ("original", {}, {"qk_normalization": True}, "q/k norms"),
    ("hf", {"vision_feature_select_strategy": "full"}, {}, "vision_feature_select_strategy"),
    ("hf", {"downsample_ratio": 0.4}, {}, "downsample_ratio"),  # not 1/n
    ("hf", {"downsample_ratio": 1 / 3}, {}, "downsample_ratio"),  # 8x8 patches do not shuffle by 3
    ("hf", {}, {"image_size": [56, 49]}, "image_size"),
])
def test_inexpressible_config_is_refused(layout, config, vision, needle, folder, tmp_path):
    assert_refused(config_variant(folder / layout, tmp_path / "ckpt", vision, **config), tmp_path, needle)


def test_the_6b_tower_is_taken_with_rms_norm():
    six_b = {"hidden_size": 3200, "num_hidden_layers": 45, "norm_type": "rms_norm", "qk_normalization": True}
    assert InternVL.refuses({"vision_config": six_b}) is None
    assert "norm_type" in InternVL.refuses({"vision_config": {**six_b, "norm_type": "layer_norm"}})


@pytest.mark.parametrize("layout,stray", [("hf", "multi_modal_projector.gate.weight"),
                                          ("original", "mlp1.2.weight"),
                                          ("original", "vision_model.encoder.layers.0.mlp.fc3.weight")])
def test_unmappable_tensor_is_named(layout, stray, folder, tmp_path):
    src = config_variant(folder / layout, tmp_path / "ckpt", extra={stray: np.zeros((4, 4), np.float32)},
                         extra_file="model.safetensors")
    assert_refused(src, tmp_path, stray)


def test_check_and_audit(folder, converted):
    from ggraft.jobs.audit import audit
    from ggraft.pair.check import check_pair

    report = check_pair(folder / "text.gguf", converted("original", "f16"))
    assert report.ok, report.findings
    boundary = [f for f in report.findings if f.code == "boundary-tokens"]
    assert boundary and "<img>" in boundary[0].message and "</img>" in boundary[0].message
    found = audit(folder / "text.gguf")
    assert {"family": "InternVL", "found": 3, "expected": 3} in found.families
    assert found.donors["InternVL"] == ["InternVL (InternVLForConditionalGeneration, InternVLChatModel)"]
