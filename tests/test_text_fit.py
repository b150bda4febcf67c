"""check's text-architecture finding (``ggraft.pair.text_fit``): multi-axis positions and DeepStack.

Small text and mmproj GGUFs are written here with gguf-py; the ends of the chain (``check`` of
the real Qwen3-VL / Qwen3.5 fixture pairs, and ``run``/``serve``/``pack`` refusing a pair whose
widths match but whose text architecture does not) use the converted fixtures.
"""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import ROOT, run_cli

from ggraft.pair.check import check_pair

CODE = "text-architecture"
TOKENS = ["<unk>", "<s>", "</s>", "▁a", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
TEMPLATE = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% else %}"
            "<|vision_start|><|image_pad|><|vision_end|>{% endif %}{% endfor %}{% endif %}{% endfor %}")


def write_text(path: Path, arch: str, width: int, *, deepstack: int | None = None,
               sections: tuple[int, ...] | None = None) -> Path:
    """A header-only text GGUF of llama.cpp architecture ``arch`` with a Qwen-style vocab."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_embedding_length(width)
    w.add_block_count(1)
    if deepstack is not None:
        w.add_num_deepstack_layers(deepstack)
    if sections is not None:
        w.add_rope_dimension_sections(list(sections))
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_types([gguf.TokenType.CONTROL if t.startswith("<") else gguf.TokenType.NORMAL for t in TOKENS])
    w.add_chat_template(TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_mmproj(path: Path, projector: str, width: int, deepstack: tuple[int, ...] = (), blocks: int = 3) -> Path:
    """An mmproj header with the tensors llama.cpp reads the width and the DeepStack layers from."""
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(projector)
    w.add_vision_projection_dim(width)
    w.add_vision_block_count(blocks)
    w.add_tensor("v.patch_embd.weight", np.zeros((8, 3, 2, 2), np.float32))
    w.add_tensor("mm.2.bias", np.zeros(width, np.float32))
    if projector == "qwen3vl_merger" and deepstack:
        w.add_vision_is_deepstack_layers([i in deepstack for i in range(blocks)])
    for i in deepstack:
        w.add_tensor(f"v.deepstack.{i}.fc1.weight", np.zeros((8, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def fit(tmp_path: Path, text: dict, mmproj: dict):
    """The text-architecture findings (and the width finding) of the pair."""
    report = check_pair(write_text(tmp_path / "text.gguf", **text), write_mmproj(tmp_path / "mmproj.gguf", **mmproj))
    return [f for f in report.findings if f.code == CODE], {f.code for f in report.findings}


@pytest.mark.parametrize("text, mmproj", [
    (dict(arch="qwen2vl", width=64), dict(projector="qwen2vl_merger", width=64)),
    (dict(arch="qwen2vl", width=64), dict(projector="qwen2.5vl_merger", width=64)),
    (dict(arch="qwen3vl", width=32, deepstack=2), dict(projector="qwen3vl_merger", width=32, deepstack=(0, 2))),
    (dict(arch="qwen3vlmoe", width=32, deepstack=3), dict(projector="qwen3vl_merger", width=32, deepstack=(0, 1, 2))),
    (dict(arch="qwen35", width=64), dict(projector="qwen3vl_merger", width=64)),
    (dict(arch="qwen35moe", width=64), dict(projector="qwen3vl_merger", width=64)),
    (dict(arch="bailingmoe3", width=64, sections=(8, 12, 12, 0)), dict(projector="ling3vl", width=64)),
])
def test_pairs_whose_architecture_fits(tmp_path, text, mmproj):
    found, codes = fit(tmp_path, text, mmproj)
    assert all(f.severity == "info" for f in found), found
    assert len(found) == (mmproj["projector"] != "qwen2vl_merger")  # the others say why they fit
    assert "width" in codes  # the widths match too (llama.cpp's n_embd_inp includes the DeepStack slices)


def test_qwen2vl_merger_on_a_llama_text_model_is_not_an_architecture_error(tmp_path):
    """llama.cpp converts Sarashina2-Vision as a llama text model with a qwen2vl_merger mmproj
    (conversion/sarashina2.py), so a 1-D RoPE text model can take that projector."""
    found, _ = fit(tmp_path, dict(arch="llama", width=64), dict(projector="qwen2vl_merger", width=64))
    assert found == []


@pytest.mark.parametrize("text, mmproj, needles", [
    (dict(arch="llama", width=64), dict(projector="qwen2.5vl_merger", width=64), ["1-D RoPE", "(t, h, w)"]),
    (dict(arch="llama", width=64), dict(projector="qwen3vl_merger", width=64), ["1-D RoPE", "qwen35"]),
    (dict(arch="glm4", width=64), dict(projector="ling3vl", width=64), ["1-D RoPE"]),
    (dict(arch="bailingmoe3", width=64), dict(projector="ling3vl", width=64), ["1-D RoPE"]),  # no rope sections
    # widths match (32 x 3 = 96) but qwen2vl reads no DeepStack slices
    (dict(arch="qwen2vl", width=96), dict(projector="qwen3vl_merger", width=32, deepstack=(0, 2)),
     ["2 DeepStack feature(s)", "does not read DeepStack"]),
    (dict(arch="qwen35", width=96), dict(projector="qwen3vl_merger", width=32, deepstack=(0, 2)),
     ["does not read DeepStack"]),
    # 32 x (1 + 2) = 48 x (1 + 1) = 96: the widths match, the slices do not
    (dict(arch="qwen3vl", width=32, deepstack=2), dict(projector="qwen3vl_merger", width=48, deepstack=(1,)),
     ["n_deepstack_layers = 2", "provides 1"]),
    (dict(arch="qwen3vl", width=24, deepstack=3), dict(projector="qwen2vl_merger", width=96),
     ["n_deepstack_layers = 3", "provides 0"]),
])
def test_pairs_whose_architecture_cannot_take_the_mmproj(tmp_path, text, mmproj, needles):
    found, codes = fit(tmp_path, text, mmproj)
    assert [f.severity for f in found] == ["error"], found
    for needle in needles:
        assert needle in found[0].message, (needle, found[0].message)
    assert "width-mismatch" not in codes  # the width check alone would have let these through


def test_every_reason_in_one_finding(tmp_path):
    found, _ = fit(tmp_path, dict(arch="llama", width=96), dict(projector="qwen3vl_merger", width=32, deepstack=(0, 2)))
    assert len(found) == 1 and found[0].severity == "error"
    assert "1-D RoPE" in found[0].message and "does not read DeepStack" in found[0].message


@pytest.fixture(scope="module")
def qwen3vl_mmproj(tmp_path_factory):
    from fixtures import qwen3vl

    from ggraft.hf.checkpoint import Checkpoint
    from ggraft.mmproj import writer
    from ggraft.mmproj.converter import converter_for

    folder = qwen3vl.build_qwen3vl()
    out = tmp_path_factory.mktemp("text-fit") / "mmproj-qwen3vl.gguf"
    return folder, writer.convert(converter_for(Checkpoint(folder / "hf")), out, "f16")


def test_fixture_pair_fits(qwen3vl_mmproj):
    folder, mmproj = qwen3vl_mmproj
    report = check_pair(folder / "text.gguf", mmproj)
    assert report.ok, report.findings
    found = [f for f in report.findings if f.code == CODE]
    assert len(found) == 1 and "interleaved M-RoPE" in found[0].message and "2 DeepStack" in found[0].message


@pytest.fixture(scope="module")
def misfit(qwen3vl_mmproj, tmp_path_factory):
    """A qwen2vl text model as wide as the Qwen3-VL mmproj's output (80 x 3): only its architecture is wrong."""
    _, mmproj = qwen3vl_mmproj
    text = write_text(tmp_path_factory.mktemp("misfit") / "qwen2vl-240.gguf", "qwen2vl", 240)
    report = check_pair(text, mmproj)
    assert [f.code for f in report.findings if f.severity == "error"] == [CODE]
    return text, mmproj


def _one_error(result, needle: str) -> None:
    assert result.code == 1, (result.stdout, result.stderr)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and needle in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_run_refuses_the_pair(misfit):
    text, mmproj = misfit
    result = run_cli("run", text, mmproj, "--image", ROOT / "fixtures" / "sample.png", "-p", "x")
    _one_error(result, "does not read DeepStack")
    assert result.stdout == ""


def test_serve_refuses_the_pair(misfit):
    text, mmproj = misfit
    _one_error(run_cli("serve", text, mmproj, "--port", "0", timeout=120), "does not read DeepStack")


def test_pack_refuses_the_pair(misfit, tmp_path):
    text, mmproj = misfit
    for layout in ("--lmstudio", "--ollama"):
        _one_error(run_cli("pack", text, mmproj, layout, tmp_path), "does not read DeepStack")
    assert os.listdir(tmp_path) == []


def odd_text(path: Path, arch: str, width: int, key: str, value: str) -> Path:
    """A text GGUF whose ``key`` holds a string where llama.cpp expects numbers."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_embedding_length(width)
    w.add_block_count(1)
    w.add_string(key, value)
    w.add_token_list(TOKENS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_damaged_keys_are_read_as_absent(tmp_path):
    """A DeepStack count or rope sections of the wrong type: read as absent, a finding, not a crash."""
    text = odd_text(tmp_path / "qwen3vl.gguf", "qwen3vl", 32, "qwen3vl.n_deepstack_layers", "two")
    mmproj = write_mmproj(tmp_path / "mmproj.gguf", "qwen3vl_merger", 32, deepstack=(0, 2))
    found = [f for f in check_pair(text, mmproj).findings if f.code == CODE]
    assert len(found) == 1 and "n_deepstack_layers = 0" in found[0].message
    text = odd_text(tmp_path / "ling.gguf", "bailingmoe3", 96, "bailingmoe3.rope.dimension_sections", "8,12,12")
    ling = write_mmproj(tmp_path / "ling-mmproj.gguf", "ling3vl", 96)
    assert [f.severity for f in check_pair(text, ling).findings if f.code == CODE] == ["error"]
