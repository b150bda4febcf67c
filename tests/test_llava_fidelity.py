"""LLaVA-1.5 in llama.cpp vs transformers, through ggraft verify's own code.

llama.cpp's llava graph (llama-cpp-python 0.3.36) places CLS after the patches
(ggml-org/llama.cpp#25814), so its output differs from transformers' whatever the file holds.
The test therefore asserts what can be asserted honestly: either the runtime matches
transformers at the bar (a fixed llama.cpp), or verify names that known defect and the file
matches transformers run the way the runtime runs it, at the same bar.
"""
from __future__ import annotations

import json

import pytest

from conftest import BARS, assert_fidelity, run_cli
from ggraft.hf.checkpoint import Checkpoint
from ggraft.mmproj.converter import converter_for
from ggraft.mmproj.writer import convert
from ggraft.jobs.verify import verify


@pytest.mark.parametrize("outtype", list(BARS))
def test_fidelity(llava_fixture, tmp_path, outtype):
    mmproj = convert(converter_for(Checkpoint(llava_fixture / "hf-hub")), tmp_path / "m.gguf", outtype)
    report = verify(llava_fixture / "hf", mmproj, text=llava_fixture / "text.gguf")
    assert_fidelity("llava", outtype, report, tokens=16, defect="25814")  # (56/14)^2 patches, CLS dropped


def test_verify_cli_reports_and_exit_code(llava_fixture, llava_mmproj):
    res = run_cli("verify", llava_fixture / "hf", llava_mmproj, "--json")
    data = json.loads(res.stdout)
    assert res.code == (0 if data["passed"] else 1)
    assert data["projector_type"] == "mlp" and data["outtype"] == "f32" and data["image_size"] == [56, 56]
    human = run_cli("verify", llava_fixture / "hf", llava_mmproj)
    assert "min cosine" in human.stdout and human.code == res.code
