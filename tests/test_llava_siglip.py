"""LLaVA with a SigLIP tower (projector ``mlp``): every saved layout, every output type, through
``ggraft verify``.

SigLIP has no CLS, so LLaVA-1.5's CLS defect (ggml-org/llama.cpp#25814) has nothing to touch: the
file must match transformers strictly.  The fixture reads the tower's last layer (written as
``clip.vision.feature_layer``), keeps every patch (strategy ``full``, what llama.cpp runs without a
class embedding) and has a projector without biases (zero biases written: llama.cpp adds them).
"""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from conftest import (BARS, ROOT, assert_fidelity, assert_refused, assert_same_tensors, cli_check,
                      cli_convert_and_verify, config_variant, family_fixtures, gguf_tensors, run_cli)
from fixtures import llava_siglip
from ggraft.gguf_io import gguf_file
from ggraft.jobs.verify import verify

Q = gguf.GGMLQuantizationType
CV = gguf.Keys.ClipVision
LAYOUTS = ("hf", "hf-hub")
TOKENS = 100  # 70 / 7 = 10 x 10 patches, all kept

folder, converted = family_fixtures(lambda: llava_siglip.build(), "llava_siglip")


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fidelity(layout, outtype, folder, converted):
    report = verify(folder / layout, converted(layout, outtype), text=folder / "text.gguf")
    assert_fidelity("llava", outtype, report, tokens=TOKENS, image_size=(70, 70))
    assert report.runtime_note is None  # strict: no CLS, no defect


def test_keys_and_tensors(converted):
    path = converted("hf", "q8_0")
    r = gguf_file.open_gguf(path, "mmproj")
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    assert v(gguf.Keys.Clip.PROJECTOR_TYPE) == "mlp"
    assert v("clip.vision.feature_layer") == [3]  # the last of 3 layers (-1)
    assert v(CV.BLOCK_COUNT) == 3 and v(CV.Attention.HEAD_COUNT) == 2 and v(CV.PATCH_SIZE) == 7
    assert v(CV.IMAGE_SIZE) == 70 and v(CV.PROJECTION_DIM) == 96 and v(CV.USE_GELU) is True
    assert v(CV.Attention.LAYERNORM_EPS) == pytest.approx(1e-6)
    assert np.allclose(v(CV.IMAGE_MEAN), llava_siglip.MEAN) and np.allclose(v(CV.IMAGE_STD), llava_siglip.STD)
    t = gguf_tensors(path)
    assert "v.class_embd" not in t and "v.pre_ln.weight" not in t and not any(n.startswith("v.post_ln") for n in t)
    assert not any("head" in n for n in t)  # SigLIP's pooling head is not LLaVA's
    assert tuple(t["v.patch_embd.weight"].shape) == (7, 7, 3, 64)
    assert tuple(t["v.position_embd.weight"].shape) == (64, 100)
    assert t["v.blk.2.attn_q.weight"].tensor_type == Q.Q8_0
    for i in (0, 2):  # the projector has no biases: zeros, which llama.cpp adds
        bias = t[f"mm.{i}.bias"]
        assert bias.tensor_type == Q.F32 and not np.asarray(bias.data).any()


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_layouts_write_identical_files(layout, converted):
    assert_same_tensors(converted("hf", "f32"), converted(layout, "f32"))


@pytest.mark.parametrize("changes,needle", [
    ({"vision_feature_select_strategy": "default"}, "'default' on a siglip_vision_model tower"),
    ({"projector_hidden_act": "relu"}, "projector_hidden_act 'relu'"),
])
def test_inexpressible_config_is_refused_in_one_line(changes, needle, folder, tmp_path):
    assert_refused(config_variant(folder / "hf", tmp_path / "ckpt", **changes), tmp_path, needle)


def test_check_and_run_the_pair(folder, converted, tmp_path):
    _, found = cli_check(folder / "text.gguf", converted("hf", "f16"))
    assert "runtime-defect" not in found  # the CLS defect needs v.class_embd
    out = run_cli("run", folder / "text.gguf", converted("hf", "q8_0"), "--image", ROOT / "fixtures" / "sample.png",
                  "-p", "What is it?", "--max-tokens", "4", "--seed", "0", "--json")
    assert out.code == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["timings"]["images"] == 1 and data["timings"]["prompt_tokens"] > TOKENS and not data["warnings"]


def test_convert_and_verify_cli(folder, tmp_path):
    cli_convert_and_verify(folder / "hf-hub", tmp_path, "bf16", projector="mlp")
