"""Qwen4-Exp and Qwen3-Omni's vision side (projector qwen3vl_merger).

Every saved layout is converted once per output type and run in llama.cpp through
``ggraft.verify`` against transformers on the same pixels (Qwen3-Omni: the thinker's merger
output with both DeepStack features appended in block order); the ``hf`` layout also on an image
the position grid is resampled for (at f32).
"""
from __future__ import annotations

import json

import gguf
import pytest

from conftest import (BARS, assert_fidelity, assert_refused, assert_same_tensors, cli_check, cli_convert_and_verify,
                      config_variant, families_fixtures, gguf_tensors, run_cli)
from fixtures import qwen_extras
from ggraft.gguf_io import gguf_file
from ggraft.jobs.verify import verify

Q = gguf.GGMLQuantizationType
FAMILIES = {"qwen4exp": "Qwen4-Exp", "qwen3omni": "Qwen3-Omni (vision)"}  # fixture -> converter family
LAYOUTS = [("qwen4exp", "hf"), ("qwen4exp", "hf-hub"),
           ("qwen3omni", "hf"), ("qwen3omni", "hf-hub"), ("qwen3omni", "hf-thinker")]
#: (height, width) -> tokens: the 6x6 position grid's own size first, then a resampled one
IMAGES = {"qwen4exp": {(72, 72): 9, (96, 72): 12}, "qwen3omni": {(84, 84): 9, (112, 84): 12}}


fixture_dirs, converted = families_fixtures(
    {"qwen4exp": qwen_extras.build_qwen4exp, "qwen3omni": qwen_extras.build_qwen3omni}, "qwen_extras")


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("family,layout", LAYOUTS)
def test_fidelity(family, layout, outtype, fixture_dirs, converted):
    out = converted(family, layout, outtype)
    sizes = IMAGES[family] if (layout, outtype) == ("hf", "f32") else dict([next(iter(IMAGES[family].items()))])
    for size, tokens in sizes.items():
        report = verify(fixture_dirs[family] / layout, out, text=fixture_dirs[family] / "text.gguf", image_size=size)
        assert_fidelity(FAMILIES[family], outtype, report, tokens=tokens, context=size)


@pytest.mark.parametrize("family,layouts", [("qwen4exp", ("hf-hub",)), ("qwen3omni", ("hf-hub", "hf-thinker"))])
def test_layouts_give_the_same_file(family, layouts, converted):
    for layout in layouts:
        assert_same_tensors(converted(family, "hf", "f32"), converted(family, layout, "f32"))


def test_tensors_and_keys(converted):
    r = gguf_file.open_gguf(converted("qwen3omni", "hf", "q8_0"))
    assert gguf_file.value(r, gguf.Keys.Clip.PROJECTOR_TYPE) == "qwen3vl_merger"
    assert gguf_file.value(r, gguf.Keys.Clip.HAS_AUDIO_ENCODER) in (None, False)  # the vision side only
    assert gguf_file.value(r, gguf.Keys.ClipVision.IS_DEEPSTACK_LAYERS) == [True, False, True]
    assert gguf_file.value(r, gguf.Keys.ClipVision.IMAGE_SIZE) == 84 and gguf_file.value(r, gguf.Keys.ClipVision.USE_GELU)
    assert gguf_file.value(r, gguf.Keys.ClipVision.Attention.LAYERNORM_EPS) == pytest.approx(1e-6)  # text: 1e-5
    t = gguf_tensors(converted("qwen3omni", "hf", "q8_0"))
    assert not any(n.startswith(("a.", "mm.a.")) for n in t)  # no audio tower
    assert tuple(t["v.patch_embd.weight.1"].shape) == (14, 14, 3, 64) and t["v.patch_embd.weight"].tensor_type == Q.F16
    deepstack = {n for n in t if n.startswith("v.deepstack.")}
    assert {n.split(".")[2] for n in deepstack} == {"0", "2"} and len(deepstack) == 12  # named by vision block
    assert tuple(t["v.deepstack.2.norm.weight"].shape) == (256,)  # merger_list's ln_q: the 2x2 concatenation
    assert tuple(t["v.post_ln.weight"].shape) == (64,)  # merger.ln_q: per patch
    assert t["mm.0.weight"].tensor_type == Q.Q8_0 and tuple(t["mm.2.bias"].shape) == (80,)

    r = gguf_file.open_gguf(converted("qwen4exp", "hf", "f32"))
    assert gguf_file.value(r, gguf.Keys.ClipVision.USE_SILU) is True
    assert gguf_file.value(r, gguf.Keys.ClipVision.IS_DEEPSTACK_LAYERS) is None
    assert gguf_file.value(r, gguf.Keys.ClipVision.IMAGE_SIZE) == 72 and gguf_file.value(r, gguf.Keys.ClipVision.PROJECTION_DIM) == 48
    t = gguf_tensors(converted("qwen4exp", "hf", "f32"))
    assert not any(n.startswith("v.deepstack.") for n in t) and tuple(t["v.blk.1.attn_qkv.weight"].shape) == (32, 96)


@pytest.mark.parametrize("family,layout,changes,needle", [
    ("qwen3omni", "hf", {"deepstack_visual_indexes": [0, 5]}, "deepstack_visual_indexes [0, 5]"),
    ("qwen3omni", "hf-thinker", {"spatial_merge_size": 3}, "2x2 patches only"),
    ("qwen4exp", "hf", {"rope_parameters": {"rope_type": "axial", "rope_theta": 5000.0}}, "rope_theta 5000"),
])
def test_inexpressible_config_is_refused(family, layout, changes, needle, fixture_dirs, tmp_path):
    nested = layout == "hf" and family == "qwen3omni"  # Qwen3-Omni's vision_config sits under thinker_config
    src = config_variant(fixture_dirs[family] / layout, tmp_path / "ckpt", vision=changes,
                         vision_section="thinker_config.vision_config" if nested else "vision_config")
    assert_refused(src, tmp_path, needle)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_check_and_audit_of_the_fixture_pair(family, fixture_dirs, converted):
    width = {"qwen4exp": 48, "qwen3omni": 80 * 3}[family]  # Qwen3-Omni: the main embedding and 2 DeepStack features
    _, found = cli_check(fixture_dirs[family] / "text.gguf", converted(family, "hf", "f16"), width)
    assert "'<|vision_start|>'" in found["boundary-tokens"]["message"]
    audit = json.loads(run_cli("audit", fixture_dirs[family] / "text.gguf", "--json").stdout)
    qwen = next(f for f in audit["families"] if f["family"] == "Qwen-VL")
    assert qwen["found"] == 4
    assert any(d.startswith(FAMILIES[family] + " (") for d in audit["donors"]["Qwen-VL"])


def test_convert_and_verify_cli(fixture_dirs, tmp_path):
    folder = fixture_dirs["qwen3omni"]
    cli_convert_and_verify(folder / "hf-hub", tmp_path, "bf16", text=folder / "text.gguf", projector="qwen3vl_merger",
                           image_size=(112, 84))
