"""Janus-Pro (projector janus_pro): every saved layout, every output type, through ``ggraft verify``.

The understanding path only: the vision tower and the aligner become the mmproj, the VQ model and
the generation heads the checkpoint also holds are left out.  llama.cpp runs the tower and aligner
as transformers does (an image of ``image_size`` square, nothing resized), so every file must pass
strictly.  llama.cpp puts no text tokens around a janus_pro image (mtmd.cpp), so ``check`` reports
none and the family's markers are found by ``audit``.
"""
from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest

from conftest import (BARS, assert_audit_finds, assert_fidelity, assert_refused, assert_same_tensors,
                      cli_convert_and_verify, config_variant, family_fixtures, gguf_tensors, pair_codes)
from fixtures import janus
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.jobs.verify import verify

Q = gguf.GGMLQuantizationType
K = gguf.Keys.ClipVision
LAYOUTS = ("hf", "hf-hub", "hf-bare")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]


folder, converted = family_fixtures(lambda: janus.build(), "janus")


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fidelity(layout, outtype, folder, converted):
    report = verify(folder / layout, converted(layout, outtype), text=folder / "text.gguf")
    assert_fidelity("janus", outtype, report, tokens=64)  # 56 / 7 = 8 patches a side, one token each
    assert report.runtime_note is None, report


def test_keys_and_tensors(folder, converted):
    path = converted("hf", "q8_0")
    r = gguf.GGUFReader(path)
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    assert v(gguf.Keys.Clip.PROJECTOR_TYPE) == "janus_pro"
    assert v(K.IMAGE_SIZE) == 56 and v(K.PATCH_SIZE) == 7
    assert v(K.EMBEDDING_LENGTH) == 64 and v(K.FEED_FORWARD_LENGTH) == 160  # int(64 * mlp_ratio 2.5)
    assert v(K.BLOCK_COUNT) == 3 and v(K.Attention.HEAD_COUNT) == 2 and v(K.PROJECTION_DIM) == 96
    assert v(K.Attention.LAYERNORM_EPS) == pytest.approx(1e-5)
    assert v(K.USE_GELU) is True and v(K.USE_SILU) is None
    assert np.allclose(v(K.IMAGE_MEAN), IMAGENET_MEAN)  # from preprocessor_config.json
    t = gguf_tensors(path)
    assert len(t) == 2 + 1 + 2 + 3 * 16 + 4  # patch conv, positions, post norm, blocks, aligner
    assert not any(name.startswith(("v.pre_ln", "v.class_embd", "mm.model.")) for name in t)
    assert t["v.patch_embd.weight"].tensor_type == Q.F16 and tuple(t["v.patch_embd.weight"].shape) == (7, 7, 3, 64)
    assert t["v.position_embd.weight"].tensor_type == Q.F32 and tuple(t["v.position_embd.weight"].shape) == (64, 64)
    assert t["v.blk.2.attn_out.weight"].tensor_type == Q.Q8_0  # transformers' projection_layer
    for name, shape in (("mm.0.weight", (64, 96)), ("mm.1.weight", (96, 96))):
        assert t[name].tensor_type == Q.Q8_0 and tuple(t[name].shape) == shape, name
    assert t["mm.1.bias"].tensor_type == Q.F32 and tuple(t["mm.1.bias"].shape) == (96,)
    f32 = gguf.GGUFReader(converted("hf", "f32"))
    ckpt = Checkpoint(folder / "hf")
    aligner_out = ckpt.load("model.aligner.hidden_layers.0.weight")
    assert np.array_equal(gguf_file.tensor_values(f32, "mm.1.weight"), aligner_out)


def test_generation_parts_are_left_out(folder, converted):
    """The checkpoint's VQ model and generation heads hold a linear ``fc1``/``hidden_layers`` pair
    just like the aligner's; none of it reaches the mmproj."""
    names = set(Checkpoint(folder / "hf").names())
    assert any(n.startswith("model.vqmodel.") for n in names)
    assert "model.generation_aligner.hidden_layers.0.weight" in names
    f32 = gguf.GGUFReader(converted("hf", "f32"))
    ckpt = Checkpoint(folder / "hf")
    assert np.array_equal(gguf_file.tensor_values(f32, "mm.0.weight"), ckpt.load("model.aligner.fc1.weight"))


def test_missing_preprocessor_takes_the_processor_defaults(folder, tmp_path):
    from ggraft.converters.janus import Janus

    src = shutil.copytree(folder / "hf", tmp_path / "ckpt")
    (src / "preprocessor_config.json").unlink()
    assert Janus(Checkpoint(src)).params().image_mean == pytest.approx(CLIP_MEAN)  # JanusImageProcessor's


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_layouts_write_identical_files(layout, converted):
    assert_same_tensors(converted("hf", "f32"), converted(layout, "f32"), ordered=True)


@pytest.mark.parametrize("changes,needle", [
    ({"depth": 3}, "aligner depth 3"),
    ({"use_qk_norm": True}, "use_qk_norm"),
    ({"hidden_act": "relu"}, "vision activation 'relu'"),
    ({"image_size": 60}, "image_size 60 is not a multiple of patch_size 7"),
])
def test_inexpressible_config_is_refused(changes, needle, folder, tmp_path):
    assert_refused(config_variant(folder / "hf", tmp_path / "ckpt", vision=changes), tmp_path, needle)


def test_unmappable_tensor_is_named(folder, tmp_path):
    extra = {"model.aligner.hidden_layers.1.weight": np.zeros((96, 96), np.float32)}  # a third layer
    assert_refused(config_variant(folder / "hf", tmp_path / "ckpt", extra=extra), tmp_path,
                   "model.aligner.hidden_layers.1.weight")


def test_check_passes_finds_no_boundary_tokens_and_warns_of_the_missing_markers(folder, converted):
    codes = pair_codes(folder / "text.gguf", converted("hf", "f16"))
    assert "inserts no boundary tokens" in codes["boundary-tokens"].message  # mtmd.cpp: none for janus_pro
    assert codes["width"].severity == "info" and "96" in codes["width"].message
    assert codes["chat-template"].severity == "info"
    assert "llama-cpp-requirement" not in codes
    defect = codes["runtime-defect"]  # the prompt departs (no <begin_of_image>), not the embeddings
    assert defect.severity == "warning" and "mtmd.cpp:639" in defect.message and "<begin_of_image>" in defect.message
    assert "prompt" in defect.hint and "embeddings" not in defect.hint


def test_audit_finds_janus_tokens(folder):
    assert_audit_finds(folder, "Janus-Pro", 3, "JanusForConditionalGeneration")


def test_convert_and_verify_cli(folder, tmp_path):
    cli_convert_and_verify(folder / "hf-hub", tmp_path, "bf16", text=folder / "text.gguf", projector="janus_pro")
