"""LLaVA-NeXT (CLIP) and LLaVA-OneVision (SigLIP), projector ``mlp`` with anyres pinpoints.

Fidelity through ``ggraft verify`` compares the base image (an image of the tower's size, which
llama.cpp encodes as one overview) with the first rows of transformers' ``get_image_features``.
The CLIP tower has LLaVA-1.5's CLS defect (ggml-org/llama.cpp#25814): either the runtime matches
transformers at the bar, or verify names that defect and the file matches transformers run the
runtime's way.  The whole anyres image is compared apart (``test_anyres_image``): llama.cpp's tiling
is deterministic and picks transformers' pinpoint, each tile matches, and re-packing llama.cpp's
tiles the transformers way (base first, unpadded grid, image_newline per row) gives transformers'
embeddings; the sequence llama.cpp itself feeds the model (tiles, then the overview, no newlines)
is the named anyres defect.
"""
from __future__ import annotations

import re

import gguf
import numpy as np
import pytest

from conftest import (BARS, assert_audit_finds, assert_fidelity, assert_refused, assert_same_tensors,
                      cli_convert_and_verify, config_variant, families_fixtures, gguf_tensors, llama_chunks)
from fixtures import llava_next
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.jobs import verify as V
from ggraft.mmproj import writer as mmproj
from ggraft.mmproj.converter import converter_for

Q = gguf.GGMLQuantizationType
FAMILIES = ("next", "onevision")
LAYOUTS = ("hf", "hf-hub", "hf-modules")
#: every layout of both families, and the Granite Vision 3.x-style LLaVA-NeXT (SigLIP, two feature layers)
CASES = [(f, lay) for f in FAMILIES for lay in LAYOUTS] + [("granite", "hf")]
RECORD_AS = {"next": "llavanext", "granite": "llavanext", "onevision": "llavaonevision"}  # the converter classes
CLS_DEFECT, ANYRES_DEFECT = "25814", "mtmd.cpp:517"
#: per family: tokens of the base image, the anyres test image (height, width), a 1x2 grid of tiles
BASE_TOKENS = {"next": 36, "onevision": 49, "granite": 49}
WIDE = {"next": (42, 84), "onevision": (35, 70)}


fixture_dirs, converted = families_fixtures(
    {"next": llava_next.build, "onevision": llava_next.build_onevision, "granite": llava_next.build_granite},
    "llava_next")


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("family,layout", CASES)
def test_fidelity(family, layout, outtype, fixture_dirs, converted):
    report = V.verify(fixture_dirs[family] / layout, converted(family, layout, outtype),
                      text=fixture_dirs[family] / "text.gguf")
    # SigLIP has no CLS: nothing for the CLS defect to touch
    assert_fidelity(RECORD_AS[family], outtype, report, tokens=BASE_TOKENS[family],
                    defect=CLS_DEFECT if family == "next" else None)


def test_keys_and_tensors(converted):
    v = lambda r, k: gguf_file.value(r, k)  # noqa: E731
    nxt, ov = gguf.GGUFReader(converted("next", "hf", "q8_0")), gguf.GGUFReader(converted("onevision", "hf", "q8_0"))
    for r, size, patch, blocks in ((nxt, 42, 7, 3), (ov, 35, 5, 2)):
        assert v(r, gguf.Keys.Clip.PROJECTOR_TYPE) == "mlp"
        assert v(r, gguf.Keys.ClipVision.IMAGE_SIZE) == size and v(r, gguf.Keys.ClipVision.PATCH_SIZE) == patch
        assert v(r, gguf.Keys.ClipVision.BLOCK_COUNT) == blocks and v(r, gguf.Keys.ClipVision.Attention.HEAD_COUNT) == 2
        assert v(r, "clip.vision.mm_patch_merge_type") == "spatial_unpad"
    # [height, width] pairs become width, height (clip_image_size), in the config's order
    assert list(v(nxt, "clip.vision.image_grid_pinpoints")) == [84, 42, 42, 126, 84, 84]
    assert list(v(ov, "clip.vision.image_grid_pinpoints")) == [35, 35, 70, 35, 35, 70, 70, 70]
    assert v(nxt, "clip.vision.feature_layer") is None  # -2: llama.cpp's default, every block written
    assert list(v(ov, "clip.vision.feature_layer")) == [2]  # -1: the output of the last block
    assert v(nxt, gguf.Keys.ClipVision.USE_GELU) is None and v(ov, gguf.Keys.ClipVision.USE_GELU) is True
    assert np.allclose(v(nxt, gguf.Keys.ClipVision.IMAGE_MEAN), [0.5, 0.45, 0.4])  # preprocessor_config.json
    assert np.allclose(v(ov, gguf.Keys.ClipVision.IMAGE_STD), [0.5, 0.5, 0.5])
    t, o = gguf_tensors(converted("next", "hf", "q8_0")), gguf_tensors(converted("onevision", "hf", "q8_0"))
    for tensors, text_width, vision_width in ((t, 96, 64), (o, 64, 32)):
        nl = tensors["v.image_newline"]
        assert nl.tensor_type == Q.F32 and tuple(nl.shape) == (text_width,)
        mm0, mm2 = tensors["mm.0.weight"], tensors["mm.2.weight"]
        assert tuple(mm0.shape) == (vision_width, text_width) and mm0.tensor_type == Q.Q8_0
        assert tuple(mm2.shape) == (text_width, text_width) and tensors["mm.2.bias"].tensor_type == Q.F32
        assert not any(n.startswith(("v.post_ln", "v.head", "mm.model")) for n in tensors)
    assert "v.class_embd" in t and "v.pre_ln.weight" in t and tuple(t["v.position_embd.weight"].shape) == (64, 37)
    assert "v.class_embd" not in o and "v.patch_embd.bias" in o and tuple(o["v.position_embd.weight"].shape) == (32, 49)
    assert t["v.blk.2.ffn_up.weight"].tensor_type == Q.Q8_0  # every block kept: llama.cpp runs n-1 of them
    g = gguf.GGUFReader(converted("granite", "hf", "f32"))
    assert list(v(g, "clip.vision.feature_layer")) == [1, 3] and v(g, gguf.Keys.ClipVision.BLOCK_COUNT) == 3
    assert tuple(gguf_tensors(converted("granite", "hf", "f32"))["mm.0.weight"].shape) == (64, 64)  # 2 x 32 wide
    assert o["v.patch_embd.weight"].tensor_type == Q.F16


@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("family", FAMILIES)
def test_layouts_write_identical_files(family, layout, converted):
    assert_same_tensors(converted(family, "hf", "f32"), converted(family, layout, "f32"))


@pytest.mark.parametrize("family", FAMILIES)
def test_anyres_image(family, fixture_dirs, converted):
    import torch
    from PIL import Image

    conv = converter_for(Checkpoint(fixture_dirs[family] / "hf"))
    p, (h, w) = conv.params(), WIDE[family]
    img, s, n = V.test_image(h, w), p.image_size, BASE_TOKENS[family]
    chunks = llama_chunks(converted(family, "hf", "f32"), None, img, p.projection_dim, n_threads=2)
    assert all(kind == "image" for kind, _ in chunks)  # no text between
    rows = [c for _, c in chunks]
    # the pinpoint transformers picks (a 1x2 grid; a file with height and width swapped gives 1x3),
    # each tile encoded as an image of its own, then the overview: no newline rows anywhere
    assert [len(r) for r in rows] == [n, n, n]
    overview = np.asarray(Image.fromarray(img).resize((s, s), Image.BICUBIC))  # llama.cpp resizes as Pillow does
    patches = [overview, img[:, :s], img[:, s:]]  # transformers' order: base image, then tiles row by row
    pv = torch.cat([V.pixel_values(x, p.image_mean, p.image_std) for x in patches])
    model = V.load_reference_model(conv.ckpt)
    cfg, sizes = model.config, torch.tensor([[h, w]])

    how = ({"vision_aspect_ratio": cfg.vision_aspect_ratio} if family == "onevision"
           else {"vision_feature_select_strategy": cfg.vision_feature_select_strategy})

    def pack(per_patch):  # transformers' own packing (the OneVision wrapper's signature is broken in 5.24)
        packed, _ = model.model.pack_image_features([torch.as_tensor(np.stack(per_patch))], sizes,
                                                    image_newline=model.model.image_newline, **how)
        return V.as_rows(packed)

    with torch.no_grad():
        strict = V.as_rows(model.get_image_features(pixel_values=pv[None], image_sizes=sizes))
        llama_repacked = pack([rows[2], rows[0], rows[1]])
        emulated = pack([V.as_rows(conv.runtime_reference(model, x[None])) for x in pv]) \
            if family == "next" else None
    assert len(strict) == 3 * n + h // p.patch_size  # base + the 1x2 grid + one image_newline per row
    reference = strict if emulated is None else emulated
    assert V.compare(llama_repacked, reference).min_cosine >= BARS["f32"]
    if emulated is not None:  # the CLS defect touches every tile
        assert V.compare(llama_repacked, strict).min_cosine < BARS["f32"]


@pytest.mark.parametrize("family,changes,needle", [
    ("next", {"vision_feature_select_strategy": "full"}, "'full' on a clip_vision_model tower"),
    ("onevision", {"vision_feature_select_strategy": "default"}, "'default' on a siglip_vision_model tower"),
    ("next", {"image_grid_pinpoints": [[42, 84], [60, 42]]}, "[60, 42] is not a multiple of the tower's image_size 42"),
    ("onevision", {"vision": {"model_type": "dinov2"}}, "'dinov2' is neither CLIP nor SigLIP"),
    ("onevision", {"projector_hidden_act": "silu"}, "projector_hidden_act 'silu'"),
])
def test_inexpressible_config_is_refused(family, changes, needle, fixture_dirs, tmp_path):
    from ggraft.errors import UnsupportedModelError

    src = config_variant(fixture_dirs[family] / "hf", tmp_path / "ckpt", **changes)
    with pytest.raises(UnsupportedModelError, match=re.escape(needle)):
        converter_for(Checkpoint(src))


def test_refusal_is_one_line_and_exit_2(fixture_dirs, tmp_path):
    src = config_variant(fixture_dirs["next"] / "hf", tmp_path / "ckpt", image_grid_pinpoints=[[42, 84], [60, 42]])
    assert_refused(src, tmp_path, "LlavaNextForConditionalGeneration", "[60, 42] is not a multiple")


def test_projector_without_biases_gets_zero_biases(fixture_dirs, tmp_path):
    """``multimodal_projector_bias: false``: llama.cpp adds mm.0/mm.2 biases unconditionally."""
    from safetensors.numpy import load_file, save_file

    src = config_variant(fixture_dirs["onevision"] / "hf", tmp_path / "ckpt", multimodal_projector_bias=False)
    drop = ("multi_modal_projector.linear_1.bias", "multi_modal_projector.linear_2.bias")
    weights = load_file(src / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k not in drop}, src / "model.safetensors", {"format": "pt"})
    out = mmproj.convert(converter_for(Checkpoint(src)), tmp_path / "m.gguf", "f32")
    t = gguf_tensors(out)
    assert not np.asarray(t["mm.0.bias"].data).any() and not np.asarray(t["mm.2.bias"].data).any()
    report = V.verify(src, out, text=fixture_dirs["onevision"] / "text.gguf")
    assert report.passed, report.result


@pytest.mark.parametrize("family", FAMILIES)
def test_check_names_no_boundary_tokens_and_warns_of_the_defects(family, fixture_dirs, converted):
    from ggraft.pair.check import check_pair

    report = check_pair(fixture_dirs[family] / "text.gguf", converted(family, "hf", "f16"))
    assert report.ok, report.findings
    codes = {f.code: f for f in report.findings}
    assert "inserts no boundary tokens" in codes["boundary-tokens"].message
    assert codes["width"].severity == "info"
    warnings = [f.message for f in report.findings if f.code == "runtime-defect"]
    assert any(ANYRES_DEFECT in m for m in warnings)
    assert any(CLS_DEFECT in m for m in warnings) == (family == "next")


@pytest.mark.parametrize("family", FAMILIES)
def test_audit_finds_llava_tokens(family, fixture_dirs):
    arch = {"next": "LlavaNextForConditionalGeneration", "onevision": "LlavaOnevisionForConditionalGeneration"}
    assert_audit_finds(fixture_dirs[family], "LLaVA", 1, arch[family], library=True)


def test_convert_and_verify_cli(fixture_dirs, tmp_path):
    folder = fixture_dirs["next"]
    cli_convert_and_verify(folder / "hf-modules", tmp_path, "bf16", text=folder / "text.gguf", projector="mlp",
                           defect=CLS_DEFECT)
