"""dots3-note vision (projector dots3note_v): every saved layout, every output type, through ``ggraft verify``.

The test image is 70 x 98 pixels (patch 7: 5 x 7 merged tokens), a multiple of 14 pixels a side within
the fixture's min/max pixels, so llama.cpp's dyn-size preprocessor takes it as it is: the whole image is
compared.  mtmd tokenizes ``<|img|>``/``<|endofimg|>`` around it, so verify is given the vocabulary-only
text GGUF.  The file is vision-only (llama.cpp's own converter writes vision + audio); libmtmd loads it.

The main fixture's tokens use every expert (6 >= 4 and 6 experts), so the MoE's routing weights are
compared at every type without a discrete choice.  ``dots3note.build(2)`` chooses 2 experts, with a
selection bias: exact at f32 and f16; at bf16 and q8_0 a few near-tied choices flip (transformers' own
bf16 run flips too), which no per-token bar can absorb (see ``test_routed_tower_at_bf16``).

One runtime defect, in preprocessing only: an image not already at a multiple of 14 pixels a side is
letterboxed by llama.cpp and stretched by transformers' processor (``test_unaligned_image_is_letterboxed``).
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from conftest import (BARS, assert_fidelity, assert_refused, assert_same_tensors, changed_config,
                      cli_convert_and_verify, config_variant, family_fixtures, gguf_tensors, pair_codes)
from fixtures import dots3note
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.jobs.verify import verify
from ggraft.mmproj import writer as mmproj
from ggraft.mmproj.converter import converter_for

Q = gguf.GGMLQuantizationType
CV = gguf.Keys.ClipVision
LAYOUTS = dots3note.LAYOUTS
TOKENS, IMAGE = 35, (70, 98)


folder, converted = family_fixtures(lambda: dots3note.build(), "dots3note")


@pytest.fixture(scope="module")
def routed():
    return dots3note.build(2)


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fidelity(layout, outtype, folder, converted):
    report = verify(folder / layout, converted(layout, outtype), text=folder / "text.gguf")
    assert_fidelity("dots3note", outtype, report, tokens=TOKENS, image_size=IMAGE)


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_routed_fidelity(outtype, routed, tmp_path):
    """Top-2 of 4 and of 6 experts, chosen with the selection bias: the same choices as transformers."""
    out = mmproj.convert(converter_for(Checkpoint(routed / "hf")), tmp_path / "m.gguf", outtype)
    report = verify(routed / "hf", out, text=routed / "text.gguf")
    assert_fidelity("dots3note", outtype, report, tokens=TOKENS, image_size=IMAGE)


def test_routed_tower_at_bf16(routed, tmp_path):
    """At bf16 a near-tied expert choice can flip (here 1 of 35 tokens, 0.96: the closest choice is 1e-4
    apart; none once the router is kept in f32, as llama.cpp's converter keeps it): the per-token bar fails
    while the other tokens match.  transformers' own bf16 run (its router in fp32) departs from its f32
    output as much (0.94), so this is bf16's, not the file's or the runtime's."""
    import torch
    import transformers

    from ggraft.jobs.verify import load_reference_model, pixel_values, test_image

    out = mmproj.convert(converter_for(Checkpoint(routed / "hf")), tmp_path / "m.gguf", "bf16")
    report = verify(routed / "hf", out, text=routed / "text.gguf")
    assert report.result.mean_cosine > 0.99, report.result  # flips or not depends on the CPU's bf16 path
    ckpt = Checkpoint(routed / "hf")
    conv = converter_for(ckpt)
    pv = pixel_values(test_image(*IMAGE), conv.params().image_mean, conv.params().image_std)
    half = transformers.Dots3NoteForConditionalGeneration.from_pretrained(routed / "hf", dtype=torch.bfloat16)
    with torch.no_grad():
        f32 = torch.cat(conv.reference_features(load_reference_model(ckpt), pv).pooler_output)
        bf16 = torch.cat(conv.reference_features(half.eval(), pv.to(torch.bfloat16)).pooler_output).float()
    assert torch.nn.functional.cosine_similarity(f32, bf16, dim=-1).min() < BARS["bf16"]


def letterboxed(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """mtmd's ``img_tool::resize`` with PAD_CEIL: the image scaled to fit (Pillow's bicubic, which mtmd's
    ``resize_pillow`` reproduces), sides rounded up, centred on black."""
    import math

    from PIL import Image

    scale = min(width / img.shape[1], height / img.shape[0])
    w, h = min(math.ceil(img.shape[1] * scale), width), min(math.ceil(img.shape[0] * scale), height)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(Image.fromarray(img).resize((w, h), Image.BICUBIC), ((width - w) // 2, (height - h) // 2))
    return np.asarray(canvas)


def test_unaligned_image_is_letterboxed(folder, converted):
    """100 x 150 pixels: llama.cpp and transformers' processor both make it 98 x 154 (7 x 11 tokens), but
    llama.cpp letterboxes it (147 x 98 centred on black) where the processor stretches it.  llama.cpp's
    embeddings are transformers' for the letterboxed pixels; the processor's are another image's."""
    import torch
    import transformers
    from PIL import Image

    from ggraft.jobs.verify import as_rows, compare, llama_embeddings, load_reference_model, pixel_values, test_image

    img = test_image(100, 150, seed=3)
    rows = llama_embeddings(converted("hf", "f32"), img, 80, folder / "text.gguf", None)
    ckpt = Checkpoint(folder / "hf")
    conv, model = converter_for(ckpt), load_reference_model(ckpt)
    p = conv.params()
    processor = transformers.Qwen2VLImageProcessorPil(
        min_pixels=dots3note.MIN_PIXELS, max_pixels=dots3note.MAX_PIXELS, patch_size=7, temporal_patch_size=1,
        merge_size=2, image_mean=dots3note.MEAN, image_std=dots3note.STD)
    inputs = processor(images=Image.fromarray(img), return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 14, 22]] and rows.shape == (77, 80)
    with torch.no_grad():
        stretched = as_rows(model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                           image_grid_thw=inputs["image_grid_thw"]))
        boxed = as_rows(conv.reference_features(model, pixel_values(letterboxed(img, 98, 154), p.image_mean,
                                                                    p.image_std)))
    assert compare(rows, boxed).min_cosine >= BARS["f32"]
    assert compare(rows, stretched).min_cosine < 0.9


def test_keys_and_tensors(folder, converted):
    path = converted("hf", "q8_0")
    r = gguf_file.open_gguf(path, "mmproj")
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    assert v(gguf.Keys.Clip.PROJECTOR_TYPE) == "dots3note_v" and v(gguf.Keys.Clip.HAS_VISION_ENCODER) is True
    assert v(gguf.Keys.Clip.HAS_AUDIO_ENCODER) is None  # vision-only
    assert v("clip.vision.expert_used_count") == 6 and v(CV.SPATIAL_MERGE_SIZE) == 2 and v(CV.USE_SILU) is True
    assert (v(CV.IMAGE_MIN_PIXELS), v(CV.IMAGE_MAX_PIXELS)) == (dots3note.MIN_PIXELS, dots3note.MAX_PIXELS)
    assert v(CV.EMBEDDING_LENGTH) == 64 and v(CV.Attention.HEAD_COUNT) == 2 and v(CV.PROJECTION_DIM) == 80
    assert v(CV.PATCH_SIZE) == 7 and v(CV.BLOCK_COUNT) == 3 and v(CV.FEED_FORWARD_LENGTH) == 96
    assert v(CV.Attention.LAYERNORM_EPS) == pytest.approx(1e-6) and np.allclose(v(CV.IMAGE_MEAN), dots3note.MEAN)
    t = gguf_tensors(path)
    shapes = {n: tuple(int(d) for d in t[n].shape) for n in t}
    assert shapes["v.patch_embd.weight"] == (7, 7, 3, 64) and "v.patch_embd.bias" in t
    assert shapes["v.blk.0.attn_qkv.weight"] == (64, 192) and shapes["v.blk.0.attn_q_norm.weight"] == (32,)
    assert {"v.pre_ln.weight", "mm.post_norm.weight", "mm.input_norm.weight", "mm.input_norm.bias"} <= set(t)
    assert shapes["v.blk.0.ffn_up.weight"] == (64, 96) and not any(n.startswith("v.blk.0.ffn_gate_") for n in t)
    for bid, n in ((1, 4), (2, 6)):  # ggml order: (width, ffn, experts) / (ffn, width, experts)
        assert shapes[f"v.blk.{bid}.ffn_gate_exps.weight"] == shapes[f"v.blk.{bid}.ffn_up_exps.weight"] == (64, 32, n)
        assert shapes[f"v.blk.{bid}.ffn_down_exps.weight"] == (32, 64, n)
        assert shapes[f"v.blk.{bid}.ffn_gate_inp.weight"] == (64, n)
        assert shapes[f"v.blk.{bid}.exp_probs_b.weight"] == (n,)
        assert t[f"v.blk.{bid}.exp_probs_b.weight"].tensor_type == Q.F32 and f"v.blk.{bid}.ffn_up.weight" not in t
        assert t[f"v.blk.{bid}.ffn_gate_inp.weight"].tensor_type == Q.F32  # routers kept f32: choices flip otherwise
        for kind in ("gate", "up", "down"):  # stacked experts are matrices for ggml_mul_mat_id, not kernels
            assert t[f"v.blk.{bid}.ffn_{kind}_exps.weight"].tensor_type == Q.Q8_0
    assert t["mm.0.weight"].tensor_type == Q.Q8_0 and shapes["mm.2.weight"] == (256, 80)
    f32 = gguf.GGUFReader(converted("hf", "f32"))
    ckpt = Checkpoint(folder / "hf")
    expert = lambda e, fc: ckpt.load(f"vision_encoder.blocks.2.mlp.experts.{e}.{fc}.weight")  # noqa: E731
    assert np.array_equal(gguf_file.tensor_values(f32, "v.blk.2.ffn_up_exps.weight")[5], expert(5, "fc3"))
    assert np.allclose(gguf_file.tensor_values(f32, "v.blk.2.ffn_down_exps.weight")[3], 1.5 * expert(3, "fc2"))


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_layouts_write_identical_files(layout, converted):
    assert_same_tensors(converted("hf", "f32"), converted(layout, "f32"))


def test_router_scaling_is_folded_into_the_experts(folder, tmp_path):
    """clip.cpp weighs the experts by their normalized scores only; written without the 1.5 the fixture's
    router_scaling_factor asks for, the file departs from transformers."""
    from ggraft.converters.dots3note import Dots3Note

    class Unscaled(Dots3Note):
        def router_scale(self):
            return 1.0

    out = mmproj.convert(Unscaled(Checkpoint(folder / "hf")), tmp_path / "unscaled.gguf", "f32")
    assert verify(folder / "hf", out, text=folder / "text.gguf").result.min_cosine < 0.99


@pytest.mark.parametrize("changes,needle", [
    ({"hidden_act": "gelu"}, "experts run SiLU only"),
    ({"rope_parameters": {"rope_type": "axial", "rope_theta": 20000.0}}, "rope_theta 20000.0"),
    ({"num_attention_heads": 32}, "a multiple of 4"),
    ({"spatial_merge_size": 1}, "spatial_merge_size 1"),
])
def test_inexpressible_config_is_refused(changes, needle, folder):
    from ggraft.converters.dots3note import Dots3Note

    config = changed_config(folder / "hf", changes)
    assert needle in Dots3Note.refuses(config)
    assert "no vision_config" in Dots3Note.refuses({**config, "vision_config": None})


def test_refusal_is_one_line(folder, tmp_path):
    src = config_variant(folder / "hf", tmp_path / "ckpt", vision={"hidden_act": "gelu_pytorch_tanh"})
    assert_refused(src, tmp_path, "Dots3NoteForConditionalGeneration", "SiLU only")


def test_check_finds_boundary_tokens(folder, converted):
    codes = pair_codes(folder / "text.gguf", converted("hf", "f16"))
    assert "<|img|>" in codes["boundary-tokens"].message and "<|endofimg|>" in codes["boundary-tokens"].message
    assert codes["width"].severity == "info" and codes["chat-template"].severity == "info"
    assert codes["runtime-defect"].severity == "warning" and "mtmd-image.cpp:787" in codes["runtime-defect"].message


def test_audit_finds_dots3note_tokens(folder):
    from ggraft.jobs.audit import audit

    for source in (folder / "text.gguf", folder / "hf"):
        report = audit(source)
        assert report.families[0] == {"family": "dots3-note", "found": 4, "expected": 4}, report.families
        assert any("Dots3NoteForConditionalGeneration" in d for d in report.donors["dots3-note"])


def test_convert_and_verify_cli(folder, tmp_path):
    cli_convert_and_verify(folder / "hf-hub", tmp_path, "bf16", text=folder / "text.gguf", projector="dots3note_v")
