"""LLaVA-1.5 conversion: keys, tensors, both saved layouts, dtype policy, atomic output."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from conftest import gguf_tensors, run_cli
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.mmproj.converter import converter_for
from ggraft.mmproj.writer import convert

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def both_layouts(llava_fixture, tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts")
    return {lay: convert(converter_for(Checkpoint(llava_fixture / lay)), out / f"{lay}.gguf", "f32")
            for lay in ("hf", "hf-hub")}


def test_keys_follow_config_and_preprocessor(both_layouts):
    r = gguf.GGUFReader(both_layouts["hf"])
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    assert v("general.architecture") == "clip" and v("general.type") == "mmproj"
    assert v("clip.has_vision_encoder") is True and v("clip.projector_type") == "mlp"
    assert v("clip.vision.image_size") == 56 and v("clip.vision.patch_size") == 14
    assert v("clip.vision.embedding_length") == 64 and v("clip.vision.feed_forward_length") == 128
    assert v("clip.vision.block_count") == 3  # vision_feature_layer -2: all blocks, llama.cpp runs n-1
    assert v("clip.vision.projection_dim") == 96
    assert v("clip.vision.feature_layer") is None
    assert np.allclose(v("clip.vision.image_mean"), [0.48145466, 0.4578275, 0.40821073])
    assert v("clip.use_gelu") is None  # CLIP's quick_gelu is llama.cpp's default
    assert v("ggraft.source_architecture") == "LlavaForConditionalGeneration"


def test_both_layouts_give_identical_tensors(both_layouts):
    a, b = gguf_tensors(both_layouts["hf"]), gguf_tensors(both_layouts["hf-hub"])
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name


def test_tensor_names_and_values(both_layouts, llava_fixture):
    t = gguf_tensors(both_layouts["hf"])
    assert {"mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias", "v.class_embd", "v.patch_embd.weight",
            "v.position_embd.weight", "v.pre_ln.weight", "v.blk.2.ffn_down.weight"} <= set(t)
    assert not any(n.startswith("v.post_ln") for n in t)  # LLaVA reads hidden states, not post_layernorm
    ckpt = Checkpoint(llava_fixture / "hf")
    src = ckpt.load("multi_modal_projector.linear_1.weight")
    assert np.array_equal(gguf_file.tensor_values(gguf.GGUFReader(both_layouts["hf"]), "mm.0.weight"), src)


@pytest.mark.parametrize("outtype,expect", [
    ("f16", {"mm.0.weight": Q.F16, "v.patch_embd.weight": Q.F16, "v.position_embd.weight": Q.F32,
             "v.blk.0.ln1.weight": Q.F32, "mm.0.bias": Q.F32, "v.class_embd": Q.F32}),
    ("bf16", {"mm.0.weight": Q.BF16, "v.patch_embd.weight": Q.F16, "v.position_embd.weight": Q.F32}),
    ("q8_0", {"mm.0.weight": Q.Q8_0, "v.blk.0.attn_q.weight": Q.Q8_0, "v.patch_embd.weight": Q.F16,
              "v.position_embd.weight": Q.F32, "v.blk.0.ffn_up.bias": Q.F32}),
])
def test_dtype_policy(llava_fixture, tmp_path, outtype, expect):
    out = convert(converter_for(Checkpoint(llava_fixture / "hf")), tmp_path / "m.gguf", outtype)
    t = gguf_tensors(out)
    for name, qtype in expect.items():
        assert t[name].tensor_type == qtype, (name, t[name].tensor_type)


def test_explicit_feature_layer(llava_fixture, tmp_path):
    """vision_feature_layer -1 is written as an absolute index and no block is dropped."""
    import shutil

    src = tmp_path / "ckpt"
    shutil.copytree(llava_fixture / "hf", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["vision_feature_layer"] = -1
    (src / "config.json").write_text(json.dumps(cfg))
    r = gguf.GGUFReader(convert(converter_for(Checkpoint(src)), tmp_path / "m.gguf", "f32"))
    assert gguf_file.value(r, "clip.vision.feature_layer") == [3]
    assert gguf_file.value(r, "clip.vision.block_count") == 3


def test_cli_convert_json_and_no_temp_left(llava_fixture, tmp_path):
    out = tmp_path / "mmproj.gguf"
    res = run_cli("convert", llava_fixture / "hf-hub", "-o", out, "--outtype", "f16", "--json")
    assert res.code == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["projector_type"] == "mlp" and info["outtype"] == "f16" and info["bytes"] == out.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["mmproj.gguf"]
    again = run_cli("convert", llava_fixture / "hf-hub", "-o", out, "--outtype", "f32", "--force")
    assert again.code == 0 and gguf_file.value(gguf.GGUFReader(out), "general.file_type") == 0
