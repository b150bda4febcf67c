"""VisCodex end to end (Jiang et al., 2025, https://arxiv.org/abs/2508.09945), on tiny models built
with transformers' own classes (``fixtures/viscodex.py``): a Qwen2.5-VL VLM, a base Qwen2.5 LLM and
a "code" LLM, with VLM = base + τ_vlm and code = base + τ_code.

1. HF route: ``merge`` in mergekit's modular form (text decoder by task arithmetic, λ = 0.7;
   vision tower and projector passed through from the VLM) → ``convert`` → ``check`` → ``verify``
   → ``run``.
2. GGUF route: the three language models as GGUF, the VLM's under ``qwen2vl`` and the LLMs under
   ``qwen2`` → ``merge`` with ``metadata_source`` and ``--check-with`` the VLM's mmproj → ``run``.

Both routes give the same merged weights (within f16 rounding: the GGUF route writes f16)."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import yaml

from conftest import run_cli
from ggraft.gguf_io import gguf_file

LAMBDA = 0.7


@pytest.fixture(scope="module")
def vx() -> Path:
    from fixtures import viscodex

    return viscodex.build()


@pytest.fixture(scope="module")
def vlm(vx) -> Path:
    from fixtures import viscodex

    return viscodex.vlm()


@pytest.fixture(scope="module")
def mmproj(vlm, tmp_path_factory) -> Path:
    """The VLM's own mmproj (f32), converted with the library API."""
    from ggraft.hf.checkpoint import Checkpoint
    from ggraft.mmproj import writer
    from ggraft.mmproj.converter import converter_for

    return writer.convert(converter_for(Checkpoint(vlm)), tmp_path_factory.mktemp("vlm") / "mmproj.gguf", "f32")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("image") / "cat.png"
    Image.fromarray((np.random.default_rng(0).random((56, 84, 3)) * 255).astype(np.uint8)).save(path)
    return path


def expected_lm(vx: Path, vlm: Path) -> dict[str, np.ndarray]:
    """θ = θ_base + λ(θ_vlm − θ_base) + (1 − λ)(θ_code − θ_base), computed with numpy."""
    from fixtures import common

    b, c = common.saved_tensors(vx / "base"), common.saved_tensors(vx / "code")
    v = common.saved_tensors(vlm)
    return {k: b[k] + LAMBDA * (v[k] - b[k]) + (1 - LAMBDA) * (c[k] - b[k]) for k in b}


@pytest.fixture(scope="module")
def hf_route(vx, vlm, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf-route")
    config = {"merge_method": "task_arithmetic", "base_model": str(vx / "base"),
              "modules": {"text_decoder": {"models": [{"model": str(vlm), "parameters": {"weight": LAMBDA}},
                                                      {"model": str(vx / "code"), "parameters": {"weight": 1 - LAMBDA}}]},
                          "vision_tower": {"merge_method": "passthrough", "models": [{"model": str(vlm)}]},
                          "multi_modal_projector": {"merge_method": "passthrough", "models": [{"model": str(vlm)}]}},
              "parameters": {"lambda": 1.0, "normalize": False}, "metadata_source": str(vlm), "dtype": "float32"}
    (folder / "viscodex.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    res = run_cli("merge", folder / "viscodex.yaml", "-o", folder / "VisCodex-tiny")
    assert res.code == 0, res.stderr
    return folder / "VisCodex-tiny"


@pytest.fixture(scope="module")
def gguf_route(vx, mmproj, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gguf-route")
    config = {"merge_method": "task_arithmetic", "base_model": str(vx / "base.gguf"),
              "models": [{"model": str(vx / "vlm.gguf"), "parameters": {"weight": LAMBDA}},
                         {"model": str(vx / "code.gguf"), "parameters": {"weight": 1 - LAMBDA}}],
              "parameters": {"lambda": 1.0, "normalize": False}, "metadata_source": str(vx / "vlm.gguf")}
    (folder / "viscodex.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    res = run_cli("merge", folder / "viscodex.yaml", "-o", folder / "VisCodex-tiny-f16.gguf", "--outtype", "f16",
                  "--check-with", mmproj)
    assert res.code == 0, (res.stdout, res.stderr)
    assert f"check with {mmproj}: compatible" in res.stdout and "M-RoPE" in res.stdout
    return folder / "VisCodex-tiny-f16.gguf"


def text_gguf_of(hf: Path, out: Path) -> Path:
    """The merged folder's language model as a text GGUF (as llama.cpp's converter writes a
    Qwen2.5-VL text model: architecture qwen2vl)."""
    from fixtures import common, viscodex
    from fixtures.qwen2vl import _vocab

    lm = {k: v for k, v in common.saved_tensors(hf).items() if k.startswith(("model.", "lm_head."))}
    text_config = json.loads((hf / "config.json").read_text())["text_config"]
    return viscodex.write_qwen_gguf(out, lm, text_config, _vocab()[0], gguf.MODEL_ARCH.QWEN2VL, "VisCodex-tiny")


def test_hf_route_merge_convert_check_verify_run(vx, vlm, mmproj, hf_route, image, tmp_path):
    from fixtures import common
    from ggraft.jobs.verify import verify

    merged, original = common.saved_tensors(hf_route), common.saved_tensors(vlm)
    assert sorted(merged) == sorted(original)
    for name, value in expected_lm(vx, vlm).items():
        np.testing.assert_allclose(merged[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    for name in original:
        if name.startswith("visual."):
            assert merged[name].tobytes() == original[name].tobytes(), name
    res = run_cli("convert", hf_route, "-o", tmp_path / "mmproj.gguf", "--outtype", "f32")
    assert res.code == 0, res.stderr
    ours, theirs = gguf.GGUFReader(tmp_path / "mmproj.gguf"), gguf.GGUFReader(mmproj)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours.tensors, theirs.tensors))

    text = text_gguf_of(hf_route, tmp_path / "VisCodex-tiny.gguf")
    res = run_cli("check", text, tmp_path / "mmproj.gguf")
    assert res.code == 0 and "compatible" in res.stdout, (res.stdout, res.stderr)
    report = verify(hf_route, tmp_path / "mmproj.gguf", text=text)
    assert report.passed, report
    res = run_cli("run", text, tmp_path / "mmproj.gguf", "--image", image, "-p", "Write code for this.",
                  "--max-tokens", "4", "--seed", "1")
    assert res.code == 0 and res.stdout.strip(), (res.stdout, res.stderr)


def test_gguf_route_merge_check_run(vx, gguf_route, mmproj, image):
    reader = gguf_file.scan_gguf(gguf_route)
    assert reader.value("general.architecture") == "qwen2vl"  # the VLM's, with its M-RoPE sections
    assert reader.value("qwen2vl.rope.dimension_sections") == [4, 4, 4, 0]
    res = run_cli("check", gguf_route, mmproj)
    assert res.code == 0, (res.stdout, res.stderr)
    res = run_cli("run", gguf_route, mmproj, "--image", image, "-p", "Write code for this.", "--max-tokens", "4",
                  "--seed", "1")
    assert res.code == 0 and res.stdout.strip(), (res.stdout, res.stderr)


def test_both_routes_give_the_same_weights(vx, vlm, hf_route, gguf_route, tmp_path):
    """The HF route's language model (f32) and the GGUF route's (f16), dequantized: equal within
    f16 rounding, and both equal the numpy result."""
    hf = gguf_file.open_gguf(text_gguf_of(hf_route, tmp_path / "hf.gguf"))
    gg = gguf_file.open_gguf(gguf_route)
    assert sorted(t.name for t in hf.tensors) == sorted(t.name for t in gg.tensors)
    for t in hf.tensors:
        a, b = gguf_file.tensor_values(hf, t.name), gguf_file.tensor_values(gg, t.name)
        if b.ndim > 1:  # f16 in the GGUF route (1-D tensors stay f32)
            assert gguf_file.tensor(gg, t.name).tensor_type == gguf.GGMLQuantizationType.F16
        np.testing.assert_allclose(b, a, rtol=2 ** -11, atol=1e-7, err_msg=t.name)
