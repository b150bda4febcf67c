"""MiniCPM-V 4.6 (projector minicpmv4_6): every layout and output type through ``ggraft verify``,
the whole sliced image chunk by chunk, and the two things the file does for llama.cpp's runtime.

``verify`` compares the overview of a slice-sized image (llama.cpp does not resize it).  The whole
image is compared too: llama.cpp's slicing of an image with slices (``mtmd-image.cpp``) follows
transformers' processor, and its Pillow-style bicubic resize gives the overview the processor's
pixels, so every chunk (overview, then each slice) is compared with transformers fed by the
processor.  In 16x mode llama.cpp departs from the processor for images smaller in area than a
slice and not square (a declared runtime defect, shown here by the token counts).
"""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from conftest import (BARS, assert_audit_finds, assert_fidelity, assert_refused, assert_same_tensors,
                      cli_convert_and_verify, config_variant, family_fixtures, gguf_tensors, llama_chunks, pair_codes)
from fixtures import minicpmv
from ggraft.converters.minicpmv import LLAMA_GRID, POSITIONS, MiniCPMV46, spread_rows
from ggraft.errors import UnsupportedModelError
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.jobs import verify as verify_job
from ggraft.jobs.verify import compare, load_reference_model, verify
from ggraft.mmproj import writer as mmproj
from ggraft.mmproj.converter import converter_for

Q = gguf.GGMLQuantizationType
K = gguf.Keys.ClipVision
LAYOUTS = ("hf", "hf-hub", "hf-bare", "hf4x")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
DEFECT = "mtmd-image.cpp:517-525"


folder, converted = family_fixtures(lambda: minicpmv.build(), "minicpmv")


def text_for(folder, layout):
    return folder / ("text-hf4x.gguf" if layout == "hf4x" else "text.gguf")


@pytest.mark.parametrize("outtype", list(BARS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fidelity(layout, outtype, folder, converted):
    report = verify(folder / layout, converted(layout, outtype), text=text_for(folder, layout))
    # (96/8/2)^2; (112/7/4)^2
    assert_fidelity("minicpmv4_6", outtype, report, tokens=36 if layout == "hf4x" else 16, context=report)


def test_keys_and_tensors(folder, converted):
    r = gguf.GGUFReader(converted("hf", "q8_0"))
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    assert v(gguf.Keys.Clip.PROJECTOR_TYPE) == "minicpmv4_6"
    assert v(K.Projector.SCALE_FACTOR) == 4 and list(v(K.WA_LAYER_INDEXES)) == [1]  # 16x, merger after block 1
    assert v(K.IMAGE_SIZE) == 112 and v(K.PATCH_SIZE) == 7  # the processor's slice size, not the tower's 98
    assert v(K.BLOCK_COUNT) == 3 and v(K.Attention.HEAD_COUNT) == 2 and v(K.PROJECTION_DIM) == 48
    assert v(K.Attention.LAYERNORM_EPS) == pytest.approx(1e-6) and v(K.USE_GELU) is True
    assert np.allclose(v(K.IMAGE_MEAN), CLIP_MEAN)  # from preprocessor_config.json, not the processor's 0.5
    t = gguf_tensors(converted("hf", "q8_0"))
    merger = {f"v.vit_merger.{n}.weight" for n in ("ln1", "attn_q", "attn_k", "attn_v", "attn_out", "ds_ln",
                                                    "ds_ffn_up", "ds_ffn_down")}
    assert merger | {"mm.input_norm.weight", "mm.up.weight", "mm.down.bias", "v.post_ln.weight",
                     "v.patch_embd.bias", "v.blk.2.ffn_up.weight"} <= set(t)
    assert tuple(t[POSITIONS].shape) == (32, LLAMA_GRID ** 2) and t[POSITIONS].tensor_type == Q.F32
    assert t["v.patch_embd.weight"].tensor_type == Q.F16 and tuple(t["v.patch_embd.weight"].shape) == (7, 7, 3, 32)
    for name, shape in (("v.vit_merger.ds_ffn_up.weight", (128, 320)), ("mm.up.weight", (128, 128)),
                        ("mm.down.weight", (128, 48)), ("v.blk.0.ffn_up.weight", (32, 80))):
        assert t[name].tensor_type == Q.Q8_0 and tuple(t[name].shape) == shape, name
    saved = Checkpoint(folder / "hf").load("model.vision_tower.embeddings.position_embedding.weight")
    written = gguf_file.tensor_values(gguf.GGUFReader(converted("hf", "f32")), POSITIONS).reshape(70, 70, -1)
    assert np.array_equal(written[34, 69], saved[6 * 14 + 13])  # row (a, b) is the checkpoint's (a // 5, b // 5)


def test_positions_land_on_transformers_rows():
    """llama.cpp's lookup (floor(70 i / h) * 70 + floor(70 j / w)) into the spread table picks the row
    transformers' nearest-bucket lookup picks, for every grid that divides 70 and many image grids."""
    import torch
    from transformers.vision_utils import get_vision_nearest_position_ids

    for n in (70, 35, 14, 10, 7):
        spread = spread_rows(n)
        for h, w in ((16, 16), (32, 32), (12, 24), (6, 30), (64, 40)):
            rows = [int(70 * i / h) * 70 + int(70 * j / w) for i in range(h) for j in range(w)]
            expected = get_vision_nearest_position_ids(torch.tensor([[h, w]]), n).numpy()
            assert np.array_equal(spread[rows], expected), (n, h, w)


def test_4x_file(folder, converted):
    path = converted("hf4x", "f32")
    r = gguf.GGUFReader(path)
    assert gguf_file.value(r, K.Projector.SCALE_FACTOR) == 2 and gguf_file.value(r, K.WA_LAYER_INDEXES) is None
    t = gguf_tensors(path)
    assert not any(n.startswith("v.vit_merger.") for n in t)  # 4x runs no ViT merger
    assert tuple(t[POSITIONS].shape) == (24, LLAMA_GRID ** 2)  # already 70x70: the table as it is
    fc1 = Checkpoint(folder / "hf4x").load("model.vision_tower.encoder.layers.0.mlp.fc1.weight")
    assert np.array_equal(gguf_file.tensor_values(r, "v.blk.0.ffn_down.weight").reshape(fc1.shape), fc1)


def test_square_ffn_unswapped_fails(folder, tmp_path):
    """Why a tower whose FFN is as wide as itself gets fc1/fc2 under each other's names: clip.cpp
    (2335-2361) swaps up and down whenever ffn_down's first ggml dimension is the tower's width.
    Written the plain way, llama.cpp runs fc2 before fc1."""

    class Unswapped(MiniCPMV46):
        def modify(self, gguf_name, tensor):
            if ".ffn_" in gguf_name:
                yield gguf_name, tensor
            else:
                yield from super().modify(gguf_name, tensor)

    out = mmproj.convert(Unswapped(Checkpoint(folder / "hf4x")), tmp_path / "unswapped.gguf", "f32")
    report = verify(folder / "hf4x", out, text=text_for(folder, "hf4x"))
    assert not report.passed and report.result.min_cosine < 0.99, report.result


@pytest.mark.parametrize("layout", LAYOUTS[1:3])
def test_layouts_write_identical_files(layout, converted):
    assert_same_tensors(converted("hf", "f32"), converted(layout, "f32"))


def processed(folder, layout, img: np.ndarray):
    """transformers' processor on ``img``: (pixel_values, target sizes, slice grid)."""
    from PIL import Image
    from transformers import MiniCPMV4_6ImageProcessorPil

    pre = json.loads((folder / layout / "preprocessor_config.json").read_text())
    pre.pop("image_processor_type")
    out = MiniCPMV4_6ImageProcessorPil(**pre)(Image.fromarray(img), return_tensors="pt")
    return out["pixel_values"], out["target_sizes"], out["grids"][0]


def test_whole_sliced_image(folder, converted):
    """A 224x112 image: the overview (resized to 168x84) and two 112x112 slices, in llama.cpp's
    chunks and text markers, against transformers fed by its own processor."""
    import torch

    img = verify_job.test_image(112, 224, seed=3)
    chunks = llama_chunks(converted("hf", "f32"), folder / "text.gguf", img, 48, pieces=True, n_threads=2)
    texts = [pieces for kind, pieces in chunks if kind == "text"]
    assert texts == [["<image>"], ["</image>", "<slice>"], ["</slice>", "<slice>"], ["</slice>"]]
    pixels, sizes, grid = processed(folder, "hf", img)
    assert list(grid) == [1, 2] and sizes.tolist() == [[12, 24], [16, 16], [16, 16]]
    model = load_reference_model(Checkpoint(folder / "hf"))
    with torch.no_grad():
        reference = model.get_image_features(pixel_values=pixels, target_sizes=sizes).pooler_output
    images = [emb for kind, emb in chunks if kind == "image"]
    assert [len(e) for e in images] == [18, 16, 16]
    for ours, theirs in zip(images, reference):
        assert compare(ours, theirs.float().numpy()).min_cosine >= BARS["f32"]


@pytest.mark.parametrize("layout,size,llama,transformers", [
    ("hf", (56, 112), [16], [18]),  # stretched to the 112x112 slice; transformers keeps 84x168
    ("hf", (56, 168), [12, 15, 15], [14]),  # sliced in two; transformers resizes to 56x196, unsliced
    ("hf4x", (48, 96), [32], [32]),  # 4x: both resize to 64x128
])
def test_runtime_defect_16x_unsliced_image(layout, size, llama, transformers, folder, converted):
    """Images smaller in area than a slice: in 16x mode llama.cpp stretches or slices them where
    transformers' processor keeps the aspect ratio in one image (the declared runtime defect)."""
    img = verify_job.test_image(*size, seed=4)
    chunks = llama_chunks(converted(layout, "f32"), text_for(folder, layout), img, 48 if layout == "hf" else 40,
                          pieces=True, n_threads=2)
    _, sizes, _ = processed(folder, layout, img)
    per_token = 16 if layout == "hf" else 4
    assert [len(e) for kind, e in chunks if kind == "image"] == llama
    assert [int(s.prod()) // per_token for s in sizes] == transformers


def test_inexpressible_config_is_refused(folder, tmp_path):
    assert_refused(config_variant(folder / "hf", tmp_path / "ckpt", vision={"image_size": 84}), tmp_path,
                   "a 12x12 position grid")


@pytest.mark.parametrize("vision,top,needle", [
    ({"layer_norm_eps": 1e-5}, {}, "layer_norm_eps 1e-05"),
    ({}, {"merger_times": 2}, "merger_times 2"),
    ({}, {"insert_layer_id": 3}, "insert_layer_id 3"),
    ({"window_kernel_size": [3, 3]}, {}, "other than 2x2"),
])
def test_other_inexpressible_configs(vision, top, needle, folder, tmp_path):
    with pytest.raises(UnsupportedModelError, match=needle):
        converter_for(Checkpoint(config_variant(folder / "hf", tmp_path / "ckpt", vision=vision, **top)))


def test_model_and_processor_modes_must_agree(folder, tmp_path):
    src = config_variant(folder / "hf", tmp_path / "ckpt", preprocessor={"downsample_mode": "4x"})
    with pytest.raises(UnsupportedModelError, match="downsample_mode '16x' but the processor's is '4x'"):
        converter_for(Checkpoint(src)).params()


def test_check_finds_boundary_tokens_and_warns_of_the_defect(folder, converted):
    for layout in ("hf", "hf4x"):
        codes = pair_codes(text_for(folder, layout), converted(layout, "f16"))
        assert all(t in codes["boundary-tokens"].message for t in ("<image>", "</image>", "<slice>", "</slice>"))
        assert codes["width"].severity == "info"
        defect = codes.get("runtime-defect")
        assert (defect is not None and DEFECT in defect.message) == (layout == "hf")  # 4x keeps the aspect


def test_audit_finds_minicpm_tokens(folder):
    assert_audit_finds(folder, "MiniCPM-V", 4, "MiniCPMV4_6ForConditionalGeneration")


def test_convert_and_verify_cli(folder, tmp_path):
    cli_convert_and_verify(folder / "hf-hub", tmp_path, "bf16", text=folder / "text.gguf", projector="minicpmv4_6")
