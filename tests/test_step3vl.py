"""Step-3.7 (projector step3vl): every saved layout, every output type, through ``ggraft verify``, and
one whole tiled image chunk by chunk.

verify feeds an ``image_size`` square image: llama.cpp cuts no tiles (``mtmd-image.cpp``
``determine_window_size``) and does not resize it, so its one image chunk is the overview, compared
with transformers' ``get_image_features`` on the same pixels.  The whole-image test takes a
1008x1008 image: 2x2 tiles of 504 pixels (sides that are whole tiles, so no tile is resized on either
side) and the overview.  transformers' Step3p7ImageProcessor needs torchvision, which the venv does
not hold, so its own plan (``_plan_patches``) and token string (``Step3p7Processor.replace_image_token``)
are used and the crops taken directly.  llama.cpp departs there in two ways no file can compensate
(``Step3VL.runtime_defects``): the tiles' position table is resampled with antialiasing, and the
overview is shrunk without; each comparison passes strictly or the defect is named and transformers
run the runtime's way clears the bar.
"""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from conftest import (BARS, assert_audit_finds, assert_fidelity, assert_one_line_error, assert_refused,
                      assert_same_tensors, cli_convert_and_verify, config_variant, family_fixtures, gguf_tensors,
                      llama_chunks, run_cli)
from fixtures import step3vl
from ggraft.converters.step3vl import Step3VL, Step3VL10B
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.jobs.verify import as_rows, compare, load_reference_model, pixel_values, verify
from ggraft.jobs.verify import test_image as make_image
from ggraft.mmproj import writer as mmproj
from ggraft.mmproj.converter import converter_for

Q = gguf.GGMLQuantizationType
CV = gguf.Keys.ClipVision
LAYOUTS = ("hf", "hf-hub", "hf-modules")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
TILE_DEFECT, RESIZE_DEFECT = "step3vl.cpp:19", "mtmd-image.cpp:1392"
OVERVIEW_TOKENS, TILE_TOKENS = 49, 36  # (588 / 21 / 4)^2, (504 / 21 / 4)^2


folder, converted = family_fixtures(lambda: step3vl.build(), "step3vl")


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fidelity(layout, outtype, folder, converted):
    report = verify(folder / layout, converted(layout, outtype), text=folder / "text.gguf")
    # at the table's own size the runtime uses the stored rows: a strict pass
    assert_fidelity(Step3VL.family, outtype, report, tokens=OVERVIEW_TOKENS, context=report)


def test_keys_and_tensors(folder, converted):
    path = converted("hf", "q8_0")
    r = gguf.GGUFReader(path)
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    assert v(gguf.Keys.Clip.PROJECTOR_TYPE) == "step3vl"
    assert v(CV.Projector.SCALE_FACTOR) == 4 and v(CV.PREPROC_IMAGE_SIZE) == 3024
    assert v(CV.IMAGE_SIZE) == 588 and v(CV.PATCH_SIZE) == 21
    assert v(CV.BLOCK_COUNT) == 2 and v(CV.Attention.HEAD_COUNT) == 2 and v(CV.EMBEDDING_LENGTH) == 64
    assert v(CV.FEED_FORWARD_LENGTH) == 160 and v(CV.PROJECTION_DIM) == 96
    assert v(CV.Attention.LAYERNORM_EPS) == pytest.approx(1e-6)
    assert v(CV.USE_GELU) is None and v(CV.USE_SILU) is None  # quick_gelu: llama.cpp's default
    assert np.allclose(v(CV.IMAGE_MEAN), IMAGENET_MEAN)  # from preprocessor_config.json
    t = gguf_tensors(path)
    assert not any("attn_qkv" in n or "class_embd" in n or "post_ln" in n for n in t)
    expected = {
        "v.patch_embd.weight": (Q.F16, (21, 21, 3, 64)), "v.position_embd.weight": (Q.F32, (64, 784)),
        "v.pre_ln.bias": (Q.F32, (64,)), "v.blk.1.ls1.weight": (Q.F32, (64,)), "v.blk.1.ls2.weight": (Q.F32, (64,)),
        "v.blk.1.attn_q.weight": (Q.Q8_0, (64, 64)), "v.blk.1.attn_k.bias": (Q.F32, (64,)),
        "v.blk.1.ffn_up.weight": (Q.Q8_0, (64, 160)), "v.blk.1.ffn_down.weight": (Q.Q8_0, (160, 64)),
        "mm.0.weight": (Q.F16, (3, 3, 64, 128)), "mm.0.bias": (Q.F32, (128,)),  # convolutions: ggml's im2col
        "mm.1.weight": (Q.F16, (3, 3, 128, 256)), "mm.1.bias": (Q.F32, (256,)),
        "mm.model.fc.weight": (Q.Q8_0, (256, 96)),
    }
    for name, (qtype, shape) in expected.items():
        assert (t[name].tensor_type, tuple(int(d) for d in t[name].shape)) == (qtype, shape), name
    # the hub's fused in_proj is split as stored: q/k already in llama.cpp's rotated-pair order
    f32 = gguf.GGUFReader(converted("hf", "f32"))
    in_proj = Checkpoint(folder / "hf").load("vision_model.transformer.resblocks.1.attn.in_proj_weight")
    assert np.array_equal(gguf_file.tensor_values(f32, "v.blk.1.attn_k.weight"), in_proj[64:128])


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_layouts_write_identical_files(layout, converted):
    """hf-modules holds q/k in transformers' rotate-half order: permuted back, they are the hub's rows."""
    assert_same_tensors(converted("hf", "f32"), converted(layout, "f32"), ordered=True)


def flat_chunks(mmproj, text, rgb: np.ndarray, n_embd: int) -> list:
    """Every chunk llama.cpp makes of one image, in order: a text token's piece (from the GGUF vocabulary),
    or an image chunk's embeddings (tokens, n_embd)."""
    vocab = [str(p) for p in gguf.GGUFReader(text).get_field("tokenizer.ggml.tokens").contents()]
    return [x for kind, c in llama_chunks(mmproj, text, rgb, n_embd)
            for x in ([c] if kind == "image" else [vocab[t] for t in c])]


def judged(llama, reference, runtime, bar, defect, conv) -> float:
    """Strictly at the bar, or the defect is declared and transformers run the runtime's way clears it."""
    strict = compare(llama, reference).min_cosine
    if strict < bar:
        assert any(defect in d.reference for d in conv.runtime_defects), defect
        assert compare(llama, runtime).min_cosine >= bar
    return strict


def test_whole_tiled_image(folder, converted):
    """1008x1008: the processor's plan (2x2 tiles of 504, newline after the first row, overview last)
    and its token string are what llama.cpp builds; each tile and the overview match transformers."""
    import re
    from types import SimpleNamespace

    import torch
    import torch.nn.functional as F
    from transformers.models.step3p7.image_processing_step3p7 import Step3p7ImageProcessor as Processor
    from transformers.models.step3p7.processing_step3p7 import Step3p7Processor

    img = make_image(1008, 1008, seed=3)
    got = flat_chunks(converted("hf", "f32"), folder / "text.gguf", img, 96)
    conv = converter_for(Checkpoint(folder / "hf"))
    p = conv.params()
    planner = SimpleNamespace(max_image_size=3024, _is_extreme_aspect=Processor._is_extreme_aspect)
    (_, _), (width, height), window, nx, ny, _ = Processor._plan_patches(planner, 1008, 1008, p.image_size, 504)
    assert (width, height, window, nx, ny) == (1008, 1008, 504, 2, 2)
    newlines = [col == nx - 1 and row < ny - 1 for row in range(ny) for col in range(nx)]
    placeholders = SimpleNamespace(patch_feature_placeholder="<im_patch>" * TILE_TOKENS,
                                   image_feature_placeholder="<im_patch>" * OVERVIEW_TOKENS)
    text = Step3p7Processor.replace_image_token(placeholders, {"num_local_patches": [nx * ny],
                                                               "patch_newline_masks": [newlines]}, 0)
    expected = [f"<{len(run) // len('<im_patch>')} features>" if run.startswith("<im_patch>") else run
                for run in re.findall(r"(?:<im_patch>)+|<[a-z_]+>", text)]
    assert [f"<{len(c)} features>" if isinstance(c, np.ndarray) else c for c in got] == expected

    full = pixel_values(img, p.image_mean, p.image_std)  # no tile is resized: crops of the image itself
    tiles = [full[:, :, y:y + window, x:x + window] for y in range(0, height, window) for x in range(0, width, window)]
    overview = {aa: F.interpolate(full, size=(p.image_size,) * 2, mode="bilinear", align_corners=False, antialias=aa)
                for aa in (True, False)}  # the processor antialiases; llama.cpp does not
    model = load_reference_model(Checkpoint(folder / "hf"))
    llama = [c for c in got if isinstance(c, np.ndarray)]
    with torch.no_grad():
        features = as_rows(model.get_image_features(pixel_values=overview[True], pixel_values_local=torch.cat(tiles),
                                                    num_local_patches=[len(tiles)]))
        for i, tile in enumerate(tiles):
            judged(llama[i], features[i * TILE_TOKENS:(i + 1) * TILE_TOKENS],
                   as_rows(conv.runtime_reference(model, tile)), BARS["f32"], TILE_DEFECT, conv)
        judged(llama[-1], features[-OVERVIEW_TOKENS:], as_rows(conv.reference_features(model, overview[False])),
               BARS["f32"], RESIZE_DEFECT, conv)


@pytest.mark.parametrize("changes,needle", [
    (dict(vision={"rope_parameters": {"rope_type": "axial", "rope_theta": 20000.0}}), "rope_theta 20000.0"),
    (dict(vision={"patch_size": 14}), "a 42x42 patch grid"),
    (dict(vision={"patch_size": 16, "image_size": 512}), "504-pixel tiles"),
    (dict(vision={"hidden_act": "relu"}), "'relu'"),
    (dict(projector_bias=True), "projector_bias"),
    (dict(preprocessor={"patch_size": 448}), "patch_size 448"),
])
def test_inexpressible_config_is_refused(changes, needle, folder, tmp_path):
    assert_refused(config_variant(folder / "hf", tmp_path / "ckpt", **changes), tmp_path, needle)


def test_unmappable_tensor_is_named(folder, tmp_path):
    extra = {"vit_large_projector.bias": np.zeros(96, np.float32)}  # llama.cpp's projector has no bias
    assert_refused(config_variant(folder / "hf", tmp_path / "ckpt", extra=extra), tmp_path, "vit_large_projector.bias")


def test_step3_vl_10b_config_writes_the_same_file(folder, converted, tmp_path):
    """StepVLForConditionalGeneration (remote code, no transformers class: untested against a
    reference) in the hub layout with its config's remote-code keys: the same tensors."""
    vision = json.loads((folder / "hf" / "config.json").read_text())["vision_config"]
    renamed = {"hidden_size": None, "num_hidden_layers": None, "num_attention_heads": None,  # None: removed
               "width": vision["hidden_size"], "layers": vision["num_hidden_layers"],
               "heads": vision["num_attention_heads"]}
    src = config_variant(folder / "hf", tmp_path / "ckpt", vision=renamed,
                         architectures=["StepVLForConditionalGeneration"], understand_projector_stride=2)
    conv = converter_for(Checkpoint(src))
    assert type(conv) is Step3VL10B
    assert_same_tensors(converted("hf", "f32"), mmproj.convert(conv, tmp_path / "m.gguf", "f32"), ordered=True)
    src2 = config_variant(src, tmp_path / "stride", understand_projector_stride=3)
    assert_one_line_error(run_cli("convert", src2, "-o", tmp_path / "m3.gguf"), "understand_projector_stride 3")


def test_check_finds_boundary_tokens_and_warns_of_the_defects(folder, converted):
    from ggraft.pair.check import check_pair

    report = check_pair(folder / "text.gguf", converted("hf", "f16"))
    assert report.ok, report.findings
    boundary = next(f for f in report.findings if f.code == "boundary-tokens")
    for token in ("<im_start>", "<im_end>", "<patch_start>", "<patch_end>", "<patch_newline>"):
        assert token in boundary.message, boundary
    warned = " ".join(f.message for f in report.findings if f.code == "runtime-defect" and f.severity == "warning")
    assert TILE_DEFECT in warned and RESIZE_DEFECT in warned


def test_audit_finds_step3vl_tokens(folder):
    assert_audit_finds(folder, "Step3-VL", 6, "Step3p7ForConditionalGeneration")


def test_convert_and_verify_cli(folder, tmp_path):
    cli_convert_and_verify(folder / "hf-hub", tmp_path, "bf16", text=folder / "text.gguf", projector="step3vl",
                           tokens=OVERVIEW_TOKENS)
