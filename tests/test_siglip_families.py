"""SigLIP families: Gemma 3 (projector gemma3) and Idefics3 / SmolVLM (projector idefics3).

Every saved layout is converted once per output type and run in llama.cpp through
``ggraft.verify`` against transformers' ``get_image_features`` on the same pixels.  Both
projectors make llama.cpp tokenize text around the image (``<start_of_image>``, tile markers),
which needs a vocabulary, so verify is given each fixture's text GGUF.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from conftest import (assert_fidelity, assert_refused, assert_same_tensors, config_variant, families_fixtures,
                      gguf_tensors)
from fixtures import gemma3, idefics3
from ggraft.gguf_io import gguf_file
from ggraft.mmproj import writer as mmproj
from ggraft.hf.checkpoint import Checkpoint
from ggraft.mmproj.converter import converter_for
from ggraft.jobs.verify import verify

Q = gguf.GGMLQuantizationType
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
LAYOUTS = [("gemma3", "hf"), ("gemma3", "hf-hub"),
           ("idefics3", "hf"), ("idefics3", "hf-hub"), ("idefics3", "hf-smolvlm")]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]


fixture_dirs, converted = families_fixtures({"gemma3": gemma3.build, "idefics3": idefics3.build}, "siglip")


@pytest.mark.parametrize("outtype", OUTTYPES)
@pytest.mark.parametrize("family,layout", LAYOUTS)
def test_fidelity(family, layout, outtype, fixture_dirs, converted):
    out = converted(family, layout, outtype)
    if family == "gemma3":
        # llama.cpp's gemma3 graph copies mm.input_projection transposed (ggml_cont(ggml_transpose));
        # for a block-quantized tensor that copy overruns its buffer and corrupts the heap
        # ("free(): invalid size"), so the file must keep it unquantized, as llama.cpp's converter does
        kept = gguf_tensors(out)["mm.input_projection.weight"].tensor_type
        assert kept in (Q.F32, Q.F16, Q.BF16), f"mm.input_projection.weight written as {kept.name}"
    report = verify(fixture_dirs[family] / layout, out, text=fixture_dirs[family] / "text.gguf")
    # gemma3: 8x8 patches pooled 2x2; idefics3: one 8x8 tile shuffled 2x2
    assert_fidelity(family, outtype, report, tokens=16)


def test_gemma3_keys_and_tensors(converted, fixture_dirs):
    path = converted("gemma3", "hf", "f32")
    r = gguf.GGUFReader(path)
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    assert v("clip.projector_type") == "gemma3" and v("clip.vision.image_size") == 64
    assert v("clip.vision.patch_size") == 8 and v("clip.vision.block_count") == 3
    assert v("clip.vision.projector.scale_factor") == 2  # 8x8 patches -> mm_tokens_per_image 16
    assert v("clip.vision.projection_dim") == 96 and v("clip.use_gelu") is True
    assert v("clip.vision.attention.layer_norm_epsilon") == pytest.approx(1e-6)
    assert np.allclose(v("clip.vision.image_mean"), CLIP_MEAN)  # from preprocessor_config.json
    t = gguf_tensors(path)
    assert {"mm.input_projection.weight", "mm.soft_emb_norm.weight", "v.post_ln.weight", "v.blk.2.ffn_down.weight"} <= set(t)
    ckpt = Checkpoint(fixture_dirs["gemma3"] / "hf")
    norm = ckpt.load("multi_modal_projector.mm_soft_emb_norm.weight")
    assert np.array_equal(gguf_file.tensor_values(r, "mm.soft_emb_norm.weight"), norm + 1)  # Gemma RMSNorm: 1 + w
    proj = ckpt.load("multi_modal_projector.mm_input_projection_weight")
    assert np.array_equal(gguf_file.tensor_values(r, "mm.input_projection.weight"), proj)  # vision x text, as saved


def test_idefics3_keys(converted):
    for layout in ("hf", "hf-smolvlm"):
        r = gguf.GGUFReader(converted("idefics3", layout, "f32"))
        v = lambda k: gguf_file.value(r, k)  # noqa: E731
        assert v("clip.projector_type") == "idefics3" and v("clip.vision.image_size") == 64
        assert v("clip.vision.projector.scale_factor") == 2
        assert v("clip.vision.preproc_image_size") == 128  # size.longest_edge: llama.cpp tiles like transformers
        assert v("clip.vision.projection_dim") == 96 and v("clip.use_gelu") is True
        assert np.allclose(v("clip.vision.image_mean"), CLIP_MEAN)
        assert "mm.model.fc.weight" in {t.name for t in r.tensors}


def test_idefics3_without_splitting_is_not_tiled(fixture_dirs, tmp_path):
    src = config_variant(fixture_dirs["idefics3"] / "hf", tmp_path / "ckpt",
                         preprocessor={"do_image_splitting": False})
    out = mmproj.convert(converter_for(Checkpoint(src)), tmp_path / "m.gguf", "f32")
    assert gguf_file.value(gguf.GGUFReader(out), "clip.vision.preproc_image_size") == 64  # one tile


@pytest.mark.parametrize("family", ["gemma3", "idefics3"])
def test_layouts_write_identical_tensors(family, converted):
    assert_same_tensors(converted(family, "hf", "f32"), converted(family, "hf-hub", "f32"))


def test_gemma3_model_prefixed_names(fixture_dirs, converted, tmp_path):
    """Saves of transformers' in-memory names (model.vision_tower.vision_model.*, e.g. from
    converters outside transformers) map onto the same tensors."""
    from fixtures import common

    src = tmp_path / "ckpt"
    common.save_renamed(fixture_dirs["gemma3"] / "hf-hub", src,
                        lambda k: k if k.startswith("language_model.") else "model." + k)
    out = mmproj.convert(converter_for(Checkpoint(src)), tmp_path / "m.gguf", "f32")
    assert_same_tensors(out, converted("gemma3", "hf", "f32"))


def test_gemma3_siglip_head_is_left_out(fixture_dirs, tmp_path):
    head = {"vision_tower.head.probe": np.zeros((1, 1, 64), np.float32),
            "vision_tower.head.mlp.fc1.weight": np.zeros((160, 64), np.float32)}
    src = config_variant(fixture_dirs["gemma3"] / "hf", tmp_path / "with-head", extra=head)
    out = mmproj.convert(converter_for(Checkpoint(src)), tmp_path / "m.gguf", "f32")
    assert not any("head" in name for name in gguf_tensors(out))


@pytest.mark.parametrize("family,stray", [
    ("gemma3", "vision_tower.encoder.layers.0.mlp.fc3.weight"),
    ("idefics3", "model.connector.modality_projection.gate.weight"),
])
def test_unmappable_tensor_is_named(family, stray, fixture_dirs, tmp_path):
    src = config_variant(fixture_dirs[family] / "hf", tmp_path / "ckpt", extra={stray: np.zeros((4, 4), np.float32)})
    assert_refused(src, tmp_path, stray)


@pytest.mark.parametrize("family,key,value", [
    ("gemma3", "mm_tokens_per_image", 15),  # not a square grid
    ("idefics3", "scale_factor", 3),  # 8x8 patches do not shuffle by 3
])
def test_inexpressible_config_is_refused(family, key, value, fixture_dirs, tmp_path):
    assert_refused(config_variant(fixture_dirs[family] / "hf", tmp_path / "ckpt", **{key: value}), tmp_path, key)
