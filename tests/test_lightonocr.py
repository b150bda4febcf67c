"""LightOnOCR (projector lightonocr): every saved layout, every output type, through ``ggraft verify``.

The tower and projector run through llama.cpp's pixtral graph without [IMG_BREAK] rows, so
Pixtral's NaN [IMG_BREAK] deviation cannot arise here.  llama.cpp preprocesses in C++: it resizes
every image to its longest edge (``clip.vision.preproc_image_size``), with no tiling.  verify's
image has that longest edge, so the whole image is compared unresized; that the runtime upscales
a smaller image (where transformers' processor keeps its size) is shown apart, as the family's
declared runtime defect.
"""
from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest

from conftest import (BARS, assert_audit_finds, assert_fidelity, assert_refused, assert_same_tensors,
                      cli_convert_and_verify, config_variant, family_fixtures, gguf_tensors, pair_codes)
from fixtures import lightonocr
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint, open_checkpoint
from ggraft.jobs.verify import llama_embeddings, test_image as make_image, verify
from ggraft.mmproj import writer as mmproj
from ggraft.mmproj.converter import converter_for

Q = gguf.GGMLQuantizationType
CV = gguf.Keys.ClipVision
LAYOUTS = ("hf", "hf-hub", "hf-bare")
DEFECT = "mtmd-image.cpp:135"


folder, converted = family_fixtures(lambda: lightonocr.build(), "lightonocr")


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fidelity(layout, outtype, folder, converted):
    report = verify(folder / layout, converted(layout, outtype), text=folder / "text.gguf")
    # the longest edge, 56: the runtime does not resize it; 6x8 patches of 7 pixels, merged 2x2, no
    # [IMG_BREAK] rows; the declared defect needs an image below the longest edge (strict pass)
    assert_fidelity("lightonocr", outtype, report, tokens=12, image_size=(42, 56))
    assert report.nonfinite_outside == 0


def test_portrait_image(folder, converted):
    """Rows and columns of the 2D rope and the merger the other way round (56 high, 42 wide)."""
    report = verify(folder / "hf", converted("hf", "f32"), text=folder / "text.gguf", image_size=(56, 42))
    assert report.result.tokens == 12 and report.passed, (report.problem, report.result)


def test_gelu_tower(folder, tmp_path):
    """The same weights with a GELU tower (releases use SiLU): the file switches use_silu for use_gelu."""
    hf = config_variant(folder / "hf", tmp_path / "hf", vision={"hidden_act": "gelu"})
    out = mmproj.convert(converter_for(Checkpoint(hf)), tmp_path / "m.gguf", "f32")
    r = gguf.GGUFReader(out)
    assert gguf_file.value(r, CV.USE_GELU) is True and gguf_file.value(r, CV.USE_SILU) is None
    report = verify(hf, out, text=folder / "text.gguf")
    assert report.passed, report.result


def test_keys_and_tensors(folder, converted):
    r = gguf.GGUFReader(converted("hf", "q8_0"))
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    assert v(gguf.Keys.Clip.PROJECTOR_TYPE) == "lightonocr" and v("general.type") == "mmproj"
    assert v(CV.SPATIAL_MERGE_SIZE) == 2 and v(CV.PREPROC_IMAGE_SIZE) == 56 and v(CV.IMAGE_SIZE) == 70
    assert v(CV.PATCH_SIZE) == 7 and v(CV.EMBEDDING_LENGTH) == 64 and v(CV.FEED_FORWARD_LENGTH) == 112
    assert v(CV.BLOCK_COUNT) == 3 and v(CV.Attention.HEAD_COUNT) == 2 and v(CV.PROJECTION_DIM) == 96
    assert v(CV.Attention.LAYERNORM_EPS) == pytest.approx(1e-5)  # PixtralRMSNorm's, hard-coded
    assert v(CV.USE_SILU) is True and v(CV.USE_GELU) is None
    assert np.allclose(v(CV.IMAGE_MEAN), [0.45, 0.5, 0.55]) and np.allclose(v(CV.IMAGE_STD), [0.25, 0.3, 0.28])
    assert v("ggraft.image_tokens") is None  # recorded only by families that carry text-model rows
    assert converter_for(Checkpoint(folder / "hf")).token_ids() == {"<|im_start|>": 320, "<|image_pad|>": 325,
                                                                   "<|im_end|>": 321}
    t = gguf_tensors(converted("hf", "q8_0"))
    shapes = {"v.patch_embd.weight": (Q.F16, (7, 7, 3, 64)), "v.pre_ln.weight": (Q.F32, (64,)),
              "v.blk.2.attn_q.weight": (Q.Q8_0, (64, 64)), "v.blk.2.ffn_gate.weight": (Q.Q8_0, (64, 112)),
              "v.blk.2.ffn_down.weight": (Q.F16, (112, 64)),  # rows of 112: not whole Q8_0 blocks
              "v.blk.2.ln2.weight": (Q.F32, (64,)),
              "mm.input_norm.weight": (Q.F32, (64,)), "mm.patch_merger.weight": (Q.Q8_0, (256, 64)),
              "mm.1.weight": (Q.Q8_0, (64, 96)), "mm.2.weight": (Q.Q8_0, (96, 96))}
    for name, (qtype, shape) in shapes.items():
        assert t[name].tensor_type == qtype and tuple(int(d) for d in t[name].shape) == shape, name
    assert not any(n.startswith("v.token_embd.") or n.endswith(".bias") for n in t)  # no [IMG_BREAK], no biases
    assert len(t) == 2 + 3 * 9 + 4  # patch conv (no bias) and pre-norm; 9 per block; norm, merger, 2 linears
    # transformers' rotate-half q rows back in llama.cpp's interleaved-pair order (2 heads of 32)
    q = Checkpoint(folder / "hf").load("model.vision_encoder.transformer.layers.2.attention.q_proj.weight")
    f32 = gguf.GGUFReader(converted("hf", "f32"))
    interleaved = q.reshape(2, 2, 16, 64).swapaxes(1, 2).reshape(64, 64)
    assert np.array_equal(gguf_file.tensor_values(f32, "v.blk.2.attn_q.weight"), interleaved)


@pytest.mark.parametrize("layout", ("hf-hub", "hf-ocr", "hf-bare"))
def test_layouts_write_identical_files(layout, converted):
    assert_same_tensors(converted("hf", "f32"), converted(layout, "f32"))


def test_ocr_spelling_verifies_against_transformers_spelling(folder, converted):
    """The hub's first spelling converts to the file hf/ gives (proved above); transformers builds it
    as ``LightOnOcrForConditionalGeneration`` (the converter's ``reference_classes``), which verify loads."""
    assert open_checkpoint(folder / "hf-ocr").architecture == "LightOnOCRForConditionalGeneration"
    report = verify(folder / "hf-ocr", converted("hf-ocr", "f32"), text=folder / "text.gguf")
    assert report.passed, report


def test_preproc_image_size_keeps_the_test_image_unresized(folder, tmp_path):
    """Without clip.vision.preproc_image_size (llama.cpp's own converter writes none) the runtime
    resizes to image_size (70): the 42x56 image becomes 56x70, 4x5 tokens where transformers has 3x4."""
    from ggraft.converters.lightonocr import LightOnOcr

    class NoEdgeKey(LightOnOcr):
        def params(self):
            p = super().params()
            return dataclasses.replace(p, extra={k: x for k, x in p.extra.items() if k != CV.PREPROC_IMAGE_SIZE})

    out = mmproj.convert(NoEdgeKey(Checkpoint(folder / "hf")), tmp_path / "no-edge.gguf", "f32")
    rows = llama_embeddings(out, make_image(42, 56), 96, folder / "text.gguf", None)
    assert rows.shape == (20, 96)


def test_runtime_upscales_smaller_images(folder, converted):
    """The declared defect: transformers' processor shrinks a larger image to the 56-pixel longest edge
    but keeps a 28x42 one as it is (2x3 tokens); llama.cpp scales that one up too (3x4 tokens)."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    processor = PixtralImageProcessorPil.from_pretrained(folder / "hf")
    sizes = [processor(images=[make_image(*hw)], return_tensors="np")["image_sizes"][0].tolist()
             for hw in ((84, 112), (28, 42))]
    assert sizes == [[42, 56], [28, 42]]
    mmproj_file = converted("hf", "f32")
    for hw in ((84, 112), (28, 42)):
        assert llama_embeddings(mmproj_file, make_image(*hw), 96, folder / "text.gguf", None).shape == (12, 96), hw


@pytest.mark.parametrize("changes, needle", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, "rope_theta 1000000.0"),
    ({"hidden_act": "gelu_pytorch_tanh"}, "hidden_act 'gelu_pytorch_tanh'"),
])
def test_inexpressible_config_is_refused(changes, needle, folder, tmp_path):
    assert_refused(config_variant(folder / "hf", tmp_path / "hf", vision=changes), tmp_path, needle)


def test_check_finds_boundary_tokens_and_warns_of_the_defect(folder, converted):
    codes = pair_codes(folder / "text.gguf", converted("hf", "f16"))
    assert "llama-cpp-requirement" not in codes, codes["llama-cpp-requirement"].message
    assert "'<|im_start|>'" in codes["boundary-tokens"].message and "'<|im_end|>'" in codes["boundary-tokens"].message
    assert codes["width"].severity == "info" and codes["chat-template"].severity == "info"
    assert codes["runtime-defect"].severity == "warning" and DEFECT in codes["runtime-defect"].message
    assert "img-break" not in " ".join(codes)


def test_audit_finds_qwen_tokens(folder):
    """LightOnOCR's tokenizer is Qwen's: audit names the Qwen-VL convention, and LightOnOCR as a donor."""
    assert_audit_finds(folder, "Qwen-VL", 5, "LightOnOCR (")


def test_convert_and_verify_cli(folder, tmp_path):
    cli_convert_and_verify(folder / "hf-hub", tmp_path, "bf16", text=folder / "text.gguf", projector="lightonocr")
