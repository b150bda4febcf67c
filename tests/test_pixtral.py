"""Pixtral / Mistral Small 3.1 conversion: fidelity in llama.cpp, both transformers layouts and
Mistral's native one, the [IMG_BREAK] row, keys, and refusals."""
from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest

from conftest import BARS, assert_fidelity, assert_refused, assert_same_tensors, cli_convert, gguf_tensors
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint, MistralCheckpoint, open_checkpoint
from ggraft.mmproj.converter import converter_for
from ggraft.mmproj.writer import convert
from ggraft.jobs.verify import verify

EMBEDDINGS = "language_model.model.embed_tokens.weight"


@pytest.fixture(scope="module")
def fixture():
    from fixtures import mistral3

    return mistral3.build()


@pytest.fixture(scope="module")
def layouts(fixture, tmp_path_factory):
    out = tmp_path_factory.mktemp("pixtral")
    return {lay: convert(converter_for(open_checkpoint(fixture / lay)), out / f"{lay}.gguf", "f32")
            for lay in ("hf", "hf-modules", "native")}


@pytest.mark.parametrize("outtype", list(BARS))
def test_mistral3_fidelity(fixture, tmp_path, outtype):
    mmproj = convert(converter_for(Checkpoint(fixture / "hf-modules")), tmp_path / "m.gguf", outtype)
    report = verify(fixture / "hf", mmproj, text=fixture / "text.gguf")
    # 3x4 merged tokens, aligned to patch*merge: llama.cpp does not resize
    assert_fidelity("pixtral", outtype, report, tokens=12, image_size=(48, 64))


def test_pixtral_12b_fidelity(fixture, tmp_path):
    """Pixtral-12B's form: LlavaForConditionalGeneration with a Pixtral tower (no merger, biased projector)."""
    conv = converter_for(Checkpoint(fixture / "pixtral-hf"))
    assert type(conv).__name__ == "Pixtral" and not conv.merges
    mmproj = convert(conv, tmp_path / "m.gguf", "f32")
    t = gguf_tensors(mmproj)
    assert {"mm.1.bias", "mm.2.bias"} <= set(t) and "mm.patch_merger.weight" not in t
    report = verify(fixture / "pixtral-hf", mmproj, text=fixture / "pixtral-text.gguf")
    assert_fidelity("pixtral-12b", "f32", report, tokens=12)


def test_earlier_feature_layer_drops_later_blocks(fixture, tmp_path):
    """vision_feature_layer -2 reads the input of the last block: llama.cpp runs every block it finds,
    so the mmproj carries one block fewer."""
    hf = linked_copy(fixture / "hf", tmp_path / "hf", config={"vision_feature_layer": -2})
    mmproj = convert(converter_for(Checkpoint(hf)), tmp_path / "m.gguf", "f32")
    assert gguf_file.value(gguf.GGUFReader(mmproj), "clip.vision.block_count") == 1
    assert not any(n.startswith("v.blk.1.") for n in gguf_tensors(mmproj))
    report = verify(hf, mmproj, text=fixture / "text.gguf")
    assert report.passed, report.result


def test_keys(layouts):
    r = gguf.GGUFReader(layouts["hf"])
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    assert v("clip.projector_type") == "pixtral" and v("general.type") == "mmproj"
    assert v("clip.vision.spatial_merge_size") == 2 and v("clip.use_silu") is True and v("clip.use_gelu") is None
    assert v("clip.vision.block_count") == 2 and v("clip.vision.projection_dim") == 256
    assert v("clip.vision.patch_size") == 8 and v("clip.vision.embedding_length") == 64
    assert v("clip.vision.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert v("ggraft.image_tokens") == ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    assert v("ggraft.image_token_ids") == [320, 321, 322]


def test_tensors_and_img_break_row(layouts, fixture):
    t = gguf_tensors(layouts["hf"])
    assert {"v.patch_embd.weight", "v.pre_ln.weight", "v.blk.1.attn_q.weight", "v.blk.1.ffn_gate.weight",
            "mm.input_norm.weight", "mm.patch_merger.weight", "mm.1.weight", "mm.2.weight"} <= set(t)
    brk = t["v.token_embd.img_break"]
    assert brk.tensor_type == gguf.GGMLQuantizationType.F32 and list(brk.shape) == [256]
    row = Checkpoint(fixture / "hf").load_rows(EMBEDDINGS, 321, 1)[0]
    assert np.array_equal(np.asarray(brk.data), row)


def test_layouts_give_identical_tensors(layouts):
    """transformers 5.23's save_pretrained (= 4.x hub names), the module names (sharded) and Mistral's
    native consolidated.safetensors (q/k interleaved, adapter as w_in/w_out) give one mmproj."""
    for lay in ("hf-modules", "native"):
        assert_same_tensors(layouts["hf"], layouts[lay])


def test_native_checkpoint(fixture):
    ckpt = open_checkpoint(fixture / "native")
    assert isinstance(ckpt, MistralCheckpoint) and ckpt.layout == "mistral"
    assert ckpt.architecture == "Mistral3ForConditionalGeneration"
    assert ckpt.config["spatial_merge_size"] == 2 and ckpt.config["text_config"]["hidden_size"] == 256
    # params.json ships -1 placeholders for these two: the ids come from tekken.json
    tokens = ckpt.added_tokens()
    assert tokens["[IMG_BREAK]"] == (321, True) and tokens["[IMG_END]"] == (322, True)
    assert isinstance(open_checkpoint(fixture / "hf"), Checkpoint) and open_checkpoint(fixture / "hf").layout == "hf"


def test_native_convert_cli(fixture, tmp_path):
    cli_convert(fixture / "native", tmp_path / "n.gguf", "f16", "pixtral")


def test_native_without_weights(fixture, tmp_path):
    shutil.copy(fixture / "native" / "params.json", tmp_path / "params.json")
    assert_refused(tmp_path, tmp_path, "no *.safetensors")


def linked_copy(src, dst, config: dict | None = None, leave_out: tuple[str, ...] = ()):
    """``src`` as symlinks in ``dst``, with config.json keys replaced by ``config``."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in leave_out and not (config and f.name == "config.json"):
            (dst / f.name).symlink_to(f)
    if config:
        (dst / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), **config}))
    return dst


def test_missing_img_break_token_is_one_line(fixture, tmp_path):
    hf = linked_copy(fixture / "hf", tmp_path / "hf", leave_out=("tokenizer_config.json",))
    assert_refused(hf, tmp_path, "[IMG_BREAK]", "not in the tokenizer")


def test_llava_clip_still_goes_to_the_clip_converter(llava_fixture):
    assert type(converter_for(Checkpoint(llava_fixture / "hf"))).__name__ == "LlavaClip"


@pytest.mark.parametrize("change, needle", [
    ({"vision_config": {"rope_parameters": {"rope_theta": 1e6, "rope_type": "axial"}}}, "rope_theta"),
    ({"projector_hidden_act": "silu"}, "GELU"),
    ({"vision_feature_layer": [-1, -2]}, "vision_feature_layer"),
    ({"vision_feature_layer": -3}, "vision_feature_layer"),  # 2 blocks: hidden_states[-3] is the input
    ({"vision_feature_select_strategy": "default"}, "default"),
])
def test_refusals_name_the_reason(fixture, tmp_path, change, needle):
    config = json.loads((fixture / "hf" / "config.json").read_text())
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    assert_refused(linked_copy(fixture / "hf", tmp_path / "hf", config=config), tmp_path, needle)
