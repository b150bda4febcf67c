"""Qwen3-VL and Qwen3.5, dense and MoE (projector qwen3vl_merger).

Every saved layout of both fixtures is converted once per output type and run in llama.cpp
through ``ggraft.verify`` against transformers on the same pixels: Qwen3-VL's reference is its
merger output with both DeepStack features appended in block order (the layout llama.cpp gives
each image token), and each of the three parts is also compared on its own.  Each fixture is
compared on an image of its position grid's size and on one the grids are resampled for.  The
MoE architectures have the same vision tower under the same names: they must give the same file.
"""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from conftest import (BARS, assert_fidelity, assert_refused, assert_same_tensors, cli_check, cli_convert_and_verify,
                      config_variant, families_fixtures, gguf_tensors, run_cli)
from fixtures import qwen3vl
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.jobs.verify import verify
from ggraft.mmproj import writer as mmproj
from ggraft.mmproj.converter import converter_for

Q = gguf.GGMLQuantizationType
FAMILIES = {"qwen3vl": "Qwen3-VL", "qwen35": "Qwen3.5"}  # fixture -> converter family (the figures' label)
LAYOUTS = [(f, layout) for f in FAMILIES for layout in ("hf", "hf-bare")]
#: (height, width) -> tokens: the position grid's own size (6x6 patches of 14, 8x8 of 12), then a resampled one
IMAGES = {"qwen3vl": {(84, 84): 9, (112, 84): 12}, "qwen35": {(96, 96): 16, (96, 72): 12}}
MOE = {"qwen3vl": "Qwen3VLMoeForConditionalGeneration", "qwen35": "Qwen3_5MoeForConditionalGeneration"}


fixture_dirs, converted = families_fixtures({"qwen3vl": qwen3vl.build_qwen3vl, "qwen35": qwen3vl.build_qwen35},
                                            "qwen3vl")


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("family,layout", LAYOUTS)
def test_fidelity(family, layout, outtype, fixture_dirs, converted):
    out = converted(family, layout, outtype)
    for size, tokens in IMAGES[family].items():
        report = verify(fixture_dirs[family] / layout, out, text=fixture_dirs[family] / "text.gguf", image_size=size)
        assert_fidelity(FAMILIES[family], outtype, report, tokens=tokens, context=size)


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_main_embedding_and_every_deepstack_feature(outtype, fixture_dirs, converted):
    """The merger output and each DeepStack feature, compared apart (a concatenation's cosine could
    hide one bad part behind two good ones)."""
    from ggraft.jobs.verify import compare, llama_embeddings, load_reference_model, reference_embeddings, test_image

    folder, out = fixture_dirs["qwen3vl"], converted("qwen3vl", "hf", outtype)
    conv = converter_for(Checkpoint(folder / "hf"))
    width = conv.params().projection_dim
    img = test_image(112, 84)
    llama = llama_embeddings(out, img, 3 * width, folder / "text.gguf", None)
    reference, _ = reference_embeddings(conv, load_reference_model(conv.ckpt), img)
    assert llama.shape == reference.shape == (12, 3 * width)
    for part in range(3):  # merger, then the features of blocks 0 and 2
        cols = slice(part * width, (part + 1) * width)
        result = compare(llama[:, cols], reference[:, cols])
        assert result.min_cosine >= BARS[outtype], (part, result)
    # the parts differ from each other: a swapped order would not pass
    assert compare(llama[:, width:2 * width], reference[:, 2 * width:]).min_cosine < 0.9


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layouts_give_the_same_file(family, converted):
    assert_same_tensors(converted(family, "hf", "f32"), converted(family, "hf-bare", "f32"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_architecture_gives_the_same_file(family, fixture_dirs, converted, tmp_path):
    src = config_variant(fixture_dirs[family] / "hf", tmp_path / "moe", architectures=[MOE[family]])
    conv = converter_for(Checkpoint(src))
    assert conv.family == FAMILIES[family]
    out = mmproj.convert(conv, tmp_path / "moe.gguf", "f32")
    dense, moe = gguf_file.open_gguf(converted(family, "hf", "f32")), gguf_file.open_gguf(out)
    clip = lambda r: {k: gguf_file.value(r, k) for k in gguf_file.metadata(r) if k.startswith("clip.")}  # noqa: E731
    assert clip(dense) == clip(moe)
    assert_same_tensors(converted(family, "hf", "f32"), out)


def test_tensors_and_keys(converted):
    path = converted("qwen3vl", "hf", "q8_0")
    r = gguf_file.open_gguf(path)
    assert gguf_file.value(r, gguf.Keys.Clip.PROJECTOR_TYPE) == "qwen3vl_merger"
    assert gguf_file.value(r, gguf.Keys.ClipVision.IS_DEEPSTACK_LAYERS) == [True, False, True]
    assert gguf_file.value(r, gguf.Keys.ClipVision.IMAGE_SIZE) == 84  # the 6x6 position grid of 14-pixel patches
    assert gguf_file.value(r, gguf.Keys.ClipVision.PROJECTION_DIM) == 80
    assert gguf_file.value(r, gguf.Keys.ClipVision.SPATIAL_MERGE_SIZE) == 2
    assert gguf_file.value(r, gguf.Keys.ClipVision.USE_GELU) is True
    assert gguf_file.value(r, gguf.Keys.ClipVision.Attention.LAYERNORM_EPS) == pytest.approx(1e-6)  # text: 1e-5
    t = gguf_tensors(path)
    for name in ("v.patch_embd.weight", "v.patch_embd.weight.1"):  # the Conv3d kernel, one Conv2d per frame
        assert tuple(t[name].shape) == (14, 14, 3, 64) and t[name].tensor_type == Q.F16
    assert t["v.patch_embd.bias"].tensor_type == Q.F32 and t["v.position_embd.weight"].tensor_type == Q.F32
    assert tuple(t["v.blk.0.attn_qkv.weight"].shape) == (64, 192) and not any("attn_q." in n for n in t)
    deepstack = {n for n in t if n.startswith("v.deepstack.")}
    assert {n.split(".")[2] for n in deepstack} == {"0", "2"} and len(deepstack) == 12  # named by vision block
    assert tuple(t["v.deepstack.2.norm.weight"].shape) == (256,)  # normalizes the 2x2 concatenation
    assert t["mm.0.weight"].tensor_type == Q.Q8_0 and t["v.deepstack.0.fc2.weight"].tensor_type == Q.Q8_0
    assert t["v.post_ln.weight"].tensor_type == Q.F32 and tuple(t["mm.2.bias"].shape) == (80,)

    r = gguf_file.open_gguf(converted("qwen35", "hf", "f32"))
    assert gguf_file.value(r, gguf.Keys.ClipVision.USE_SILU) is True
    assert gguf_file.value(r, gguf.Keys.ClipVision.IS_DEEPSTACK_LAYERS) is None
    assert not any(n.startswith("v.deepstack.") for n in gguf_tensors(converted("qwen35", "hf", "f32")))


@pytest.mark.parametrize("family,changes,needle", [
    ("qwen3vl", {"deepstack_visual_indexes": [0, 5]}, "deepstack_visual_indexes [0, 5]"),
    ("qwen3vl", {"deepstack_visual_indexes": [1, 1]}, "deepstack_visual_indexes [1, 1]"),
    ("qwen3vl", {"spatial_merge_size": 3}, "2x2 patches only"),
    ("qwen3vl", {"rope_parameters": {"rope_type": "axial", "rope_theta": 5000.0}}, "rope_theta 5000"),
    ("qwen35", {"hidden_act": "relu"}, "'relu'"),
    ("qwen35", {"num_position_embeddings": 60}, "not a square grid"),
    ("qwen35", {"temporal_patch_size": 1}, "temporal_patch_size"),
])
def test_inexpressible_config_is_refused(family, changes, needle, fixture_dirs, tmp_path):
    assert_refused(config_variant(fixture_dirs[family] / "hf", tmp_path / "ckpt", vision=changes), tmp_path, needle)


@pytest.mark.parametrize("family,name", [
    ("qwen3vl", "model.visual.deepstack_merger_list.2.norm.weight"),  # a third merger for two indexes
    ("qwen35", "model.visual.deepstack_merger_list.0.norm.weight"),   # Qwen3.5 has no DeepStack
    ("qwen3vl", "model.visual.blocks.0.attn.rel_pos.weight"),
])
def test_unmappable_tensor_is_named(family, name, fixture_dirs, tmp_path):
    src = config_variant(fixture_dirs[family] / "hf", tmp_path / "ckpt", extra={name: np.zeros((4, 4), np.float32)})
    assert_refused(src, tmp_path, name)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_check_and_audit_of_the_fixture_pair(family, fixture_dirs, converted):
    width = {"qwen3vl": 80 * 3, "qwen35": 64}[family]  # Qwen3-VL: the main embedding and 2 DeepStack features
    _, found = cli_check(fixture_dirs[family] / "text.gguf", converted(family, "hf", "f16"), width)
    assert "'<|vision_start|>'" in found["boundary-tokens"]["message"]
    assert found["text-architecture"]["severity"] == "info" and found["width"]["severity"] == "info"
    audit = json.loads(run_cli("audit", fixture_dirs[family] / "text.gguf", "--json").stdout)
    qwen = next(f for f in audit["families"] if f["family"] == "Qwen-VL")
    assert qwen["found"] == 4
    assert any(d.startswith(FAMILIES[family] + " (") and MOE[family] in d for d in audit["donors"]["Qwen-VL"])


def test_convert_and_verify_cli(fixture_dirs, tmp_path):
    folder = fixture_dirs["qwen3vl"]
    cli_convert_and_verify(folder / "hf-bare", tmp_path, "bf16", text=folder / "text.gguf", projector="qwen3vl_merger",
                           image_size=(112, 84))
